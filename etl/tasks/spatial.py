"""Spatial tasks from cells with coordinates (h5ad obsm): `neighbor_generation` and `niche_prediction`.

A section is the cells with coordinates of one (organism, dataset, donor, tissue); samples stay inside one
split, as the stage's groups do. To stream with bounded memory the driver cuts each section into square
tiles of about --spatial-tile-cells cells (the side from the section's extent and count, a small aggregate)
and a cell's group key gets its tile appended, so a tile is a run of consecutive rows after the stage's one
shuffle and the builder holds one tile at a time.

Answers are exact, never approximate: the k nearest neighbours a centre finds inside its tile are the
nearest of the whole section only when the k-th distance is below the centre's distance to every tile
border with section cells beyond it; other centres are skipped and counted (`neighbour_may_cross_tile`).
Equal distances are ordered by a per-cell hash, the same order whatever the tiles. Far cells (niche
negatives) need no such care: a pair farther apart than the section's far radius is far whatever the tiles.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash
from scipy.spatial import cKDTree

from etl.tasks import TASKS
from etl.tasks.common import (
    Counts,
    SampleContext,
    cell_order,
    draws,
    group_key,
    h64,
    render,
    row,
    unit,
)
from language.prompts import cell_values, fill

SPATIAL_COLUMNS = ("spatial_x", "spatial_y")
SECTION_FIELDS = ("organism", "dataset_id", "donor_id", "tissue")
NICHE_K = (3, 8)  # cells per niche_prediction sample, drawn by hash in this range
FAR_FACTOR = 5.0  # niche negatives lie farther than FAR_FACTOR x sqrt(section bbox area / cells) (a spacing)
SLACK = 8  # neighbours queried beyond the k needed, so ties at the k-th distance are seen


class Section(NamedTuple):
    """One section's extent and tiling, computed on the driver and shipped in SampleContext.spatial."""

    x0: float
    y0: float
    x1: float
    y1: float
    n: int  # cells with coordinates
    side: float  # tile side; inf: the whole section is one tile
    far: float  # far radius of niche negatives

    def tile(self, x: float, y: float) -> tuple[int, int]:
        if math.isinf(self.side):
            return 0, 0
        return math.floor((x - self.x0) / self.side), math.floor((y - self.y0) / self.side)

    def border(self, x: float, y: float) -> float:
        """Distance from (x, y) to the nearest border of its tile that has section cells possibly beyond it
        (inf when none). Computed in the same tile units as `tile`, so a cell is beyond a border exactly
        when `tile` puts it in another tile."""
        if math.isinf(self.side):
            return math.inf
        u, v = (x - self.x0) / self.side, (y - self.y0) / self.side
        nx, ny = math.floor((self.x1 - self.x0) / self.side), math.floor((self.y1 - self.y0) / self.side)
        ix, iy = math.floor(u), math.floor(v)
        d = math.inf
        for pos, i, last in ((u, ix, nx), (v, iy, ny)):
            if i > 0:
                d = min(d, (pos - i) * self.side)
            if i < last:
                d = min(d, (i + 1 - pos) * self.side)
        return d

    @property
    def margin(self) -> float:
        """Rounding allowance of border and distance arithmetic (scaled to the coordinates)."""
        side = 0.0 if math.isinf(self.side) else self.side
        return 1e-9 * (abs(self.x0) + abs(self.x1) + abs(self.y0) + abs(self.y1) + side)


def make_section(x0: float, y0: float, x1: float, y1: float, n: int, tile_cells: int) -> Section:
    """Tile side so a tile holds about `tile_cells` cells at the section's mean density; far radius from
    the mean spacing sqrt(area / n) (cells on a line: length / (n - 1))."""
    w, h = x1 - x0, y1 - y0
    area = w * h
    spacing = math.sqrt(area / n) if area > 0 else max(w, h) / max(n - 1, 1)
    if n <= tile_cells or spacing == 0:
        side = math.inf
    elif area > 0:
        side = math.sqrt(area * tile_cells / n)
    else:
        side = max(w, h) * tile_cells / n
    return Section(float(x0), float(y0), float(x1), float(y1), int(n), side, FAR_FACTOR * spacing)


def section_key(c: Mapping) -> str:
    return "|".join(str(c[f]) for f in SECTION_FIELDS)


def extents(table: pa.Table) -> list[dict]:
    """Per section: cells with both coordinates (n) and their min/max x and y (x0, x1, y0, y1). The
    in-process twin of the stage's Spark aggregate; small output (one row per section)."""
    t = table.filter(pc.and_(pc.is_valid(table["spatial_x"]), pc.is_valid(table["spatial_y"])))
    if t.num_rows == 0:
        return []
    g = t.group_by(list(SECTION_FIELDS)).aggregate(
        [("spatial_x", "count"), ("spatial_x", "min"), ("spatial_x", "max"), ("spatial_y", "min"),
         ("spatial_y", "max")])  # fmt: skip
    names = {"spatial_x_count": "n", "spatial_x_min": "x0", "spatial_x_max": "x1", "spatial_y_min": "y0",
             "spatial_y_max": "y1"}
    return g.rename_columns([names.get(c, c) for c in g.column_names]).to_pylist()


def sections(rows: list[dict], tile_cells: int) -> dict[str, Section]:
    """Section key -> Section from the aggregate rows (organism, dataset_id, donor_id, tissue, n, x0..y1)."""
    return {section_key(r): make_section(r["x0"], r["y0"], r["x1"], r["y1"], r["n"], tile_cells)
            for r in rows if r["n"]}


def summary(secs: Mapping[str, Section], tile_cells: int) -> dict:
    """What the manifest records of the spatial tiling ({} when no spatial task ran)."""
    if not secs:
        return {}
    grid = [1 if math.isinf(s.side) else (math.floor((s.x1 - s.x0) / s.side) + 1) *
            (math.floor((s.y1 - s.y0) / s.side) + 1) for s in secs.values()]
    return {"sections": len(secs), "cells_with_coordinates": sum(s.n for s in secs.values()),
            "tile_cells": tile_cells, "tile_grid_cells": sum(grid), "niche_cells": list(NICHE_K),
            "far_radius": f"{FAR_FACTOR} x sqrt(bbox area / cells) of the section"}


def tile_key(c: Mapping, secs: Mapping[str, Section]) -> str | None:
    """The group key with the cell's tile appended, or None (no coordinates, or no spatial tasks)."""
    x, y = c.get("spatial_x"), c.get("spatial_y")
    if x is None or y is None or not secs:
        return None
    sec = secs.get(section_key(c))
    if sec is None:
        return None
    ix, iy = sec.tile(x, y)
    return f"{group_key(c)}|tile={ix},{iy}"


def run_key(c: Mapping, secs: Mapping[str, Section]) -> str:
    """The key the stage sorts and groups by: the tile key for a cell with coordinates, else the group key."""
    return tile_key(c, secs) or group_key(c)


class TileIndex:
    """Exact neighbour queries over one tile's cells (one KD-tree, one batched query per tile)."""

    def __init__(self, tile: list[dict], sec: Section, seed: int):
        self.sec = sec
        self.pts = np.array([(c["spatial_x"], c["spatial_y"]) for c in tile], dtype=np.float64)
        self.keys = [(cell_order(c, seed), c["cell_id"]) for c in tile]
        n = len(tile)
        self.q = min(NICHE_K[1] + SLACK, n)  # self + up to NICHE_K[1] - 1 neighbours + slack
        dist, idx = cKDTree(self.pts).query(self.pts, k=self.q)
        self.dist, self.idx = dist.reshape(n, self.q), idx.reshape(n, self.q)
        self.border = [sec.border(x, y) for x, y in self.pts]

    def nearest(self, i: int, k: int) -> list[int] | str:
        """The k nearest cells of cell i in its whole section (tile positions), or why that is not known."""
        row = sorted((float(d), self.keys[j], int(j)) for d, j in zip(self.dist[i], self.idx[i], strict=True)
                     if j != i)[: self.q - 1]
        if len(row) < k:
            return "section_too_small" if math.isinf(self.border[i]) else "neighbour_may_cross_tile"
        dk = row[k - 1][0]
        if self.q < len(self.pts) and self.dist[i, -1] <= dk:
            return "tied_neighbour_distance"  # more cells at the k-th distance than were queried
        if dk >= self.border[i] - self.sec.margin:
            return "neighbour_may_cross_tile"
        return [j for _, _, j in row[:k]]

    def far(self, i: int, k: int, rng: np.random.Generator) -> list[int] | None:
        """k cells of the tile farther than the section's far radius from cell i, drawn with `rng`."""
        d = np.hypot(self.pts[:, 0] - self.pts[i, 0], self.pts[:, 1] - self.pts[i, 1])
        cand = np.flatnonzero(d > self.sec.far)
        if len(cand) < k:
            return None
        return [int(j) for j in rng.choice(cand, size=k, replace=False)]


def _sample_id(task: str, c: dict, d: int, seed: int) -> str:
    return xxhash.xxh3_128_hexdigest(f"{task}|{c['dataset_id']}|{c['cell_id']}|{d}|{seed}".encode())


def _neighbor(c: dict, nb: dict, sid: str, ctx: SampleContext, counts: Counts) -> dict | None:
    """Centre sentence in the prompt, its nearest neighbour's sentence as the response (both cut alike)."""
    task = "neighbor_generation"
    values = {**cell_values(c), "neighbor_sentence": ""}  # the neighbour's genes are fitted as a sentence
    out = render(task, sid, values, [c["genes"], nb["genes"]], ctx, counts)
    if out is None:
        return None
    _, _, n, _, t = out
    values["neighbor_sentence"] = " ".join(nb["genes"][:n])
    prompt, response, est = fill(task, t, values, [c["genes"][:n], nb["genes"][:n]], ctx.budget)
    if est > ctx.budget.max_tokens:
        counts.skip(task, "over_token_budget")
        return None
    return row(task, c["split"], [c, nb], prompt, response, n, est, t, sid)


def _niche(tile: list[dict], i: int, index: TileIndex, sid: str, ctx: SampleContext, counts: Counts
           ) -> dict | None:
    """k cells: the centre and its k-1 nearest (yes) or k-1 far cells (no), listed in hash order.

    Both labels need the centre's exact neighbourhood to be known, so skips at tile borders do not
    unbalance the labels or place negative centres nearer borders than positive ones."""
    task = "niche_prediction"
    k = NICHE_K[0] + h64("niche_k", ctx.seed, sid) % (NICHE_K[1] - NICHE_K[0] + 1)
    near = index.nearest(i, k - 1)
    if isinstance(near, str):
        counts.skip(task, near)
        return None
    positive = unit("niche_label", ctx.seed, sid) < 0.5
    others = near if positive else index.far(i, k - 1, np.random.default_rng(h64("far", ctx.seed, sid)))
    if others is None:
        counts.skip(task, "too_few_far_cells")
        return None
    cells = sorted((tile[j] for j in [i, *others]), key=lambda x: h64("niche_order", sid, x["cell_id"]))
    values = {**cell_values(tile[i]), "num_cells": k, "answer": "yes" if positive else "no"}
    out = render(task, sid, values, [x["genes"] for x in cells], ctx, counts)
    if out is None:
        return None
    prompt, response, n, est, t = out
    return row(task, tile[i]["split"], cells, prompt, response, n, est, t, sid)


def spatial_samples(tile: list[dict], ctx: SampleContext, counts: Counts) -> Iterator[dict]:
    """The spatial samples of one tile (cells of one section and split, one tile): per centre cell,
    `rate` draws of each active spatial task."""
    tasks = [t for t in ctx.mixture if TASKS[t].family == "spatial"]
    if not tile or not tasks:
        return
    index = TileIndex(tile, ctx.spatial[section_key(tile[0])], ctx.seed)
    for i, c in enumerate(tile):
        for task in tasks:
            for d in range(draws(ctx.mixture[task], ctx.seed, task, c["cell_id"])):
                sid = _sample_id(task, c, d, ctx.seed)
                if task == "neighbor_generation":
                    near = index.nearest(i, 1)
                    if isinstance(near, str):
                        counts.skip(task, near)
                        continue
                    row = _neighbor(c, tile[near[0]], sid, ctx, counts)
                else:
                    row = _niche(tile, i, index, sid, ctx, counts)
                if row is not None:
                    yield row
