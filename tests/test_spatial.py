"""Spatial tasks on an h5ad with obsm['spatial']: every neighbour and niche checked against brute-force
distances over all cells of the section (numpy, here), coordinates against the obsm rows, tiles and
border skips, determinism across Spark and the in-process path, and bad or absent coordinates."""

from __future__ import annotations

import math
import re

import h5py
import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from etl.config import BuildConfig
from etl.pipeline import build
from etl.sources import h5ad
from etl.sources.base import InputError
from etl.tasks.spatial import FAR_FACTOR, make_section
from tests.conftest import corpus_path, version_store, write_h5ad

N = 600
NAN_ROWS = (5, 17, 450)


def _coordinates(seed: int = 7) -> np.ndarray:
    """Two donors on jittered grids (spacing 10) that overlap in space: sections must not mix them."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(np.arange(20), np.arange(15)), -1).reshape(-1, 2).astype(float) * 10
    xy = np.concatenate([grid, grid * 1.5 + 40]) + rng.uniform(-3, 3, (N, 2))
    xy[list(NAN_ROWS)] = np.nan
    return xy


def _config(path: str, out: str, tile_cells: int) -> BuildConfig:
    return BuildConfig(output=out, h5ad=[path], cell_type_column="celltype", label_column=["donor_id=patient"],
                       max_genes=100, spatial_tile_cells=tile_cells,
                       tasks=["neighbor_generation", "niche_prediction", "cell_type_prediction"],
                       mixture=["neighbor_generation=1", "niche_prediction=2"])


@pytest.fixture(scope="module")
def spatial_h5ad(tmp_path_factory) -> tuple[str, np.ndarray]:
    xy = _coordinates()
    path, _ = write_h5ad(tmp_path_factory.mktemp("sp") / "slide.h5ad", n_cells=N, n_genes=150, seed=3,
                         obs_extra={"patient": ["d0"] * (N // 2) + ["d1"] * (N // 2)}, obsm={"spatial": xy})
    return path, xy


@pytest.fixture(scope="module", params=[60, 2000], ids=["tiles", "one_tile"])
def spatial_build(request, spatial_h5ad, tmp_path_factory):
    path, xy = spatial_h5ad
    cfg = _config(path, str(tmp_path_factory.mktemp("out") / "corpus"), request.param)
    return cfg, build(cfg, None), xy


def _samples(out: str, task: str) -> list[dict]:
    st = version_store(out)
    return [r for rel in st.list(f"samples/{task}", ".parquet") for r in pq.read_table(st.path(rel)).to_pylist()]


def _truth(xy: np.ndarray) -> dict:
    """Per cell id: its section's cells (ids, coordinates) and pairwise distances, by brute force."""
    out = {}
    for donor, rows in (("d0", range(N // 2)), ("d1", range(N // 2, N))):
        rows = [i for i in rows if i not in NAN_ROWS]
        pts = xy[rows]
        dist = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1))
        (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
        far = FAR_FACTOR * math.sqrt((x1 - x0) * (y1 - y0) / len(rows))
        ids = [f"cell-{i}" for i in rows]
        for k, cid in enumerate(ids):
            out[cid] = {"donor": donor, "ids": ids, "row": k, "dist": dist, "far": far}
    return out


def _nearest(t: dict, cid: str, k: int) -> set[str]:
    d = t[cid]["dist"][t[cid]["row"]].copy()
    d[t[cid]["row"]] = np.inf
    return {t[cid]["ids"][j] for j in np.argsort(d)[:k]}


def _genes(out: str) -> dict[str, list[str]]:
    t = pads.dataset(corpus_path(out, "sentences"), format="parquet").to_table(columns=["cell_id", "genes"])
    return dict(zip(t["cell_id"].to_pylist(), t["genes"].to_pylist(), strict=True))


def test_sentences_carry_the_obsm_coordinates(spatial_build):
    cfg, _, xy = spatial_build
    t = pads.dataset(corpus_path(cfg.output, "sentences"), format="parquet").to_table(
        columns=["cell_id", "spatial_x", "spatial_y"]).to_pylist()
    assert len(t) == N
    for r in t:
        i = int(r["cell_id"].split("-")[1])
        if i in NAN_ROWS:
            assert r["spatial_x"] is None and r["spatial_y"] is None
        else:
            assert (r["spatial_x"], r["spatial_y"]) == (xy[i, 0], xy[i, 1])


def test_neighbours_are_the_true_nearest_of_the_whole_section(spatial_build):
    cfg, m, xy = spatial_build
    truth, genes = _truth(xy), _genes(cfg.output)
    rows = _samples(cfg.output, "neighbor_generation")
    assert len(rows) > 200
    for r in rows:
        centre, nb = r["cell_ids"]
        assert {nb} == _nearest(truth, centre, 1), f"{nb} is not the nearest cell of {centre}"
        n = r["n_genes"]
        assert n >= 8 and r["est_tokens"] <= cfg.max_tokens
        assert r["completion"] == " " + " ".join(genes[nb][:n]) + "."
        assert " ".join(genes[centre][:n]) + "." in r["prompt"]
    skips = m["samples"]["counts"]["not_made"].get("neighbor_generation", {})
    if cfg.spatial_tile_cells < N // 2:  # several tiles per section: border skips happen and are counted
        assert skips.get("neighbour_may_cross_tile", 0) > 0
        assert m["samples"]["spatial"]["tile_grid_cells"] > 2
    else:
        assert "neighbour_may_cross_tile" not in skips
        assert m["samples"]["spatial"]["sections"] == 2


def test_niches_positives_exact_negatives_far_and_balanced(spatial_build):
    cfg, _, xy = spatial_build
    truth, genes = _truth(xy), _genes(cfg.output)
    rows = _samples(cfg.output, "niche_prediction")
    labels, centre_positions = [], set()
    for r in rows:
        ids = r["cell_ids"]
        assert 3 <= len(ids) <= 8 and len(set(ids)) == len(ids)
        assert len({truth[c]["donor"] for c in ids}) == 1
        n = r["n_genes"]
        shown = "".join(f"Cell {i}:\n{' '.join(genes[c][:n])}.\n" for i, c in enumerate(ids, 1))
        assert shown in r["prompt"] and r["est_tokens"] <= cfg.max_tokens
        answer = re.fullmatch(r" (yes|no)\.", r["completion"]).group(1)
        labels.append(answer)
        if answer == "yes":
            centres = [c for c in ids if _nearest(truth, c, len(ids) - 1) == set(ids) - {c}]
            assert centres, f"no cell of {ids} has the others as its nearest neighbours"
            centre_positions.add(ids.index(centres[0]))
        else:
            far = truth[ids[0]]["far"]
            centres = [c for c in ids if all(truth[c]["dist"][truth[c]["row"], truth[o]["row"]] > far
                                             for o in ids if o != c)]
            assert centres, f"no cell of {ids} is farther than {far} from all the others"
    assert len(labels) > 200
    assert 0.35 < labels.count("yes") / len(labels) < 0.65
    assert len(centre_positions) > 2  # listed in hash order, not centre first


def test_tile_borders_never_hide_a_nearer_cell():
    """The premise of exactness: any cell outside a tile is at least `border` away from a cell inside it."""
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 100, (400, 2))
    sec = make_section(*pts.min(0), *pts.max(0), len(pts), tile_cells=40)
    tiles = [sec.tile(x, y) for x, y in pts]
    assert len(set(tiles)) > 4
    for i, (x, y) in enumerate(pts):
        b = sec.border(x, y)
        other = [j for j in range(len(pts)) if tiles[j] != tiles[i]]
        assert np.hypot(*(pts[other] - pts[i]).T).min() >= b - 1e-9


@pytest.mark.spark
def test_spark_and_in_process_give_the_same_samples(spark, spatial_h5ad, tmp_path):
    path, _ = spatial_h5ad
    local = build(_config(path, str(tmp_path / "local"), 60), None)
    distributed = build(_config(path, str(tmp_path / "spark"), 60), spark)
    assert distributed["content_hash"] == local["content_hash"]
    assert distributed["samples"]["samples_hash"] == local["samples"]["samples_hash"]
    assert distributed["samples"]["counts"] == local["samples"]["counts"]
    assert distributed["samples"]["counts"]["per_task_split"]["niche_prediction"]


def test_without_coordinates_the_tasks_are_skipped_with_the_reason(tmp_path):
    path, _ = write_h5ad(tmp_path / "plain.h5ad", n_cells=80, n_genes=60)
    m = build(BuildConfig(output=str(tmp_path / "o"), h5ad=[path], cell_type_column="celltype", max_genes=50))
    for task in ("neighbor_generation", "niche_prediction"):
        assert m["samples"]["tasks"][task] == {
            "status": "skipped", "reason": "input absent: spatial (no cell has coordinates; h5ad obsm['spatial'])"}
    assert m["samples"]["tasks"]["cell_type_prediction"]["status"] == "built"
    t = pads.dataset(corpus_path(f"{tmp_path}/o", "sentences"), format="parquet").to_table(
        columns=["spatial_x", "spatial_y"])
    assert t["spatial_x"].null_count == t["spatial_y"].null_count == 80


def test_bad_coordinates_name_the_file_and_key(tmp_path):
    path, _ = write_h5ad(tmp_path / "bad.h5ad", n_cells=30, n_genes=20, obsm={"spatial": np.zeros((30, 2))})
    with h5py.File(path, "r+") as f:
        del f["obsm/spatial"]
        f["obsm"].create_dataset("spatial", data=np.arange(30.0))  # 1-D
    with pytest.raises(InputError, match=r"bad\.h5ad: obsm\['spatial'\] has shape \(30,\)"):
        build(BuildConfig(output=str(tmp_path / "o"), h5ad=[path], cell_type_column="celltype"))
    frame = pd.DataFrame({"x": np.zeros(30), "y": np.zeros(30)}, index=[f"cell-{i}" for i in range(30)])
    path2, _ = write_h5ad(tmp_path / "frame.h5ad", n_cells=30, n_genes=20, obsm={"spatial": frame})
    with pytest.raises(InputError, match=r"frame\.h5ad: obsm\['spatial'\] is stored as dataframe"):
        build(BuildConfig(output=str(tmp_path / "o"), h5ad=[path2], cell_type_column="celltype"))
    kw = {"organism": "human", "dataset_ids": None, "cell_type_column": "celltype", "label_columns": {},
          "layer": None, "max_cells": None, "cells_per_task": 100, "seed": 0, "uppercase": True}
    with pytest.raises(InputError, match=r"frame\.h5ad: no obsm\['X_xy'\] \(--spatial-key\)"):
        h5ad.plan([path2], spatial_key="X_xy", **kw)
    with pytest.raises(InputError, match="spatial-tile-cells"):
        BuildConfig(spatial_tile_cells=5)
