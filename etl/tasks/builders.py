"""Pure sample builders: cell records in, sample rows (schemas.SAMPLES) out. No Spark here.

Cells arrive sorted by group key (organism, dataset, donor, tissue, split) and then by a per-cell hash, so
groups of 2-20 cells are consecutive runs and the whole stage streams: memory holds one group, never a
dataset. Every choice (which tasks a cell gets, group sizes, template, split) is a hash of stable ids and
the seed, so the output does not depend on partitioning or on the order partitions run in.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import xxhash

from etl.tasks import TASKS, spatial
from etl.tasks.common import (
    GROUP_UNIT,
    Counts,
    SampleContext,
    draws,
    group_key,
    h64,
    render,
    row,
)
from language.phrases import format_lr, format_pairs
from language.prompts import cell_type_list, cell_values, fill, missing_label


def single_cell_samples(cell: dict, ctx: SampleContext, counts: Counts) -> Iterator[dict]:
    for task, rate in ctx.mixture.items():
        if TASKS[task].family != "single":
            continue
        lacking = next((f for f in TASKS[task].labels if missing_label(cell.get(f))), None)
        for d in range(draws(rate, ctx.seed, task, cell["cell_id"])):
            if lacking:  # a missing label is never an answer or a condition
                counts.skip(task, f"missing_{lacking}")
                continue
            sid = xxhash.xxh3_128_hexdigest(f"{task}|{cell['dataset_id']}|{cell['cell_id']}|{d}|{ctx.seed}".encode())
            values = cell_values(cell)
            genes = cell["genes"]
            if task == "gene_interaction_prediction":
                genes = genes[: ctx.interaction_genes]
                if not interacting_pairs(genes, ctx.biogrid.get(cell["organism"], {}), 1):
                    counts.skip(task, "no_biogrid_pair_among_top_genes")
                    continue
                values["pairs"] = "x" * 60  # typical answer length while the budget is fitted
            out = render(task, sid, values, [genes], ctx, counts)
            if out is None:
                continue
            prompt, response, n, est, t = out
            if task == "gene_interaction_prediction":
                pairs = interacting_pairs(genes[:n], ctx.biogrid.get(cell["organism"], {}), ctx.max_pairs)  # shown genes only
                if not pairs:
                    counts.skip(task, "no_biogrid_pair_within_budget")
                    continue
                values["pairs"] = format_pairs(pairs)
                prompt, response, est = fill(task, t, values, [genes[:n]], ctx.budget)
                if est > ctx.budget.max_tokens:
                    counts.skip(task, "over_token_budget")
                    continue
            yield row(task, cell["split"], [cell], prompt, response, n, est, t, sid)


def interacting_pairs(genes: list[str], index: dict[str, frozenset[str]], limit: int) -> list[tuple[str, str]]:
    """BioGRID pairs among `genes`, in order of the first gene's rank, then the second's."""
    rank = {g: i for i, g in enumerate(genes)}
    out = []
    for g in genes:
        partners = index.get(g)
        if not partners:
            continue
        for p in sorted((p for p in partners if p in rank and rank[p] > rank[g]), key=rank.__getitem__):
            out.append((g, p))
            if len(out) >= limit:
                return out
    return out


def expressed_lr(sentences: list[list[str]], ctx: SampleContext) -> list[tuple[str, int, str, int]]:
    """(ligand, cell i, receptor, cell j), i != j, every ligand gene in cell i's sentence and every receptor
    gene in cell j's (1-based cell numbers), at most ctx.max_pairs, in a stable order."""
    sets = [set(s) for s in sentences]
    union = set().union(*sets)
    out = []
    for first in sorted(union & ctx._lr_index.keys()):
        for k in ctx._lr_index[first]:
            lig, rec, lg, rg = ctx.lr_pairs[k]
            senders = [i for i, s in enumerate(sets) if all(g in s for g in lg)]
            if not senders:
                continue
            receivers = [j for j, s in enumerate(sets) if all(g in s for g in rg)]
            for i in senders:
                for j in receivers:
                    if i != j:
                        out.append((lig, i + 1, rec, j + 1))
    out.sort(key=lambda x: (x[1], x[3], x[0], x[2]))
    return out[: ctx.max_pairs]


def multi_cell_samples(group: list[dict], ctx: SampleContext, counts: Counts) -> Iterator[dict]:
    key = "|".join(c["cell_id"] for c in group)
    first = group[0]
    for task, rate in ctx.mixture.items():
        if TASKS[task].family != "multi":
            continue
        # rates are per GROUP_UNIT cells, so samples per cell do not change with group sizes (the budget
        # sets them: --max-tokens, --multi-cell-genes)
        labelled, lacking = _labelled_cells(task, group, ctx)
        for d in range(draws(rate * len(group) / GROUP_UNIT, ctx.seed, task, key)):
            if lacking:  # a missing label is never an answer or a condition
                counts.skip(task, f"missing_{lacking}")
                continue
            sid = xxhash.xxh3_128_hexdigest(f"{task}|{first['dataset_id']}|{key}|{d}|{ctx.seed}".encode())
            cells = labelled
            values = {**cell_values(first), "num_cells": len(cells), "cell_types": cell_type_list(cells)}
            if task == "ligand_receptor_prediction":  # 2-4 cells: enough genes per cell to show signalling
                cells = group[: 2 + h64("lr", ctx.seed, key) % 3]
                values = {**values, "num_cells": len(cells), "cell_types": cell_type_list(cells)}
            sentences = [c["genes"] for c in cells]
            if task in ("abstract_conditional_generation", "dataset_interpretation"):
                abstract = ctx.abstracts.get(first["dataset_id"])
                if not abstract:
                    counts.skip(task, "dataset_without_abstract")
                    continue
                values["abstract"] = abstract
            if task == "ligand_receptor_prediction":
                values["pairs"] = "x" * 80  # typical answer length while the budget is fitted
            out = render(task, sid, values, sentences, ctx, counts)
            if out is None:
                continue
            prompt, response, n, est, t = out
            if task == "ligand_receptor_prediction":
                shown = [s[:n] for s in sentences]
                pairs = expressed_lr(shown, ctx)  # only genes shown in the prompt count as expressed
                if not pairs:
                    counts.skip(task, "no_expressed_ligand_receptor_pair")
                    continue
                values["pairs"] = format_lr(pairs)
                prompt, response, est = fill(task, t, values, shown, ctx.budget)
                if est > ctx.budget.max_tokens:
                    counts.skip(task, "over_token_budget")
                    continue
            yield row(task, first["split"], cells, prompt, response, n, est, t, sid)


def _labelled_cells(task: str, group: list[dict], ctx: SampleContext) -> tuple[list[dict], str | None]:
    """The cells of a group a task's sample can show, and the label that rules the sample out (None: none).
    A group shares its tissue (the grouping key): without it, no sample. Per-cell labels (cell types): the
    cells that have theirs, if at least group_min of them do."""
    fields = TASKS[task].labels
    for f in fields:
        if f != "cell_type" and missing_label(group[0].get(f)):
            return group, f
    if "cell_type" in fields:
        known = [c for c in group if not missing_label(c.get("cell_type"))]
        if len(known) < min(ctx.group_min, len(group)) or not known:
            return group, "cell_type"
        return known, None
    return group, None


def group_size(ctx: SampleContext, key: str, index: int) -> int:
    return ctx.group_min + h64("group", ctx.seed, key, index) % (ctx.group_max - ctx.group_min + 1)


def build_samples(cells: Iterable[dict], ctx: SampleContext, counts: Counts) -> Iterator[dict]:
    """Samples of a stream of cells sorted by (group_key, cell_order): single-cell tasks per cell, and
    multi-cell tasks per consecutive group of the same key (sizes drawn in [group_min, group_max]), and
    spatial tasks per tile (cells with coordinates: the key has their tile appended, etl/tasks/spatial.py)."""
    has_multi = any(TASKS[t].family == "multi" for t in ctx.mixture)
    has_spatial = bool(ctx.spatial) and any(TASKS[t].family == "spatial" for t in ctx.mixture)
    buf: list[dict] = []
    key, index, target = None, 0, 0
    tile: list[dict] = []
    tkey = None

    def flush():
        nonlocal buf
        if len(buf) >= ctx.group_min:
            counts.groups += 1
            yield from multi_cell_samples(buf, ctx, counts)
        else:
            counts.ungrouped_cells += len(buf)
        buf = []

    for c in cells:
        counts.cells += 1
        yield from single_cell_samples(c, ctx, counts)
        tk = spatial.tile_key(c, ctx.spatial)
        if has_spatial:
            if tk != tkey:
                yield from spatial.spatial_samples(tile, ctx, counts)
                tile, tkey = [], tk
            if tk is not None:
                tile.append(c)
        if not has_multi:
            continue
        k = tk or group_key(c)  # the stage's sort key: groups never straddle a tile (one partition each)
        if k != key:
            yield from flush()
            key, index = k, 0
            target = group_size(ctx, k, index)
        buf.append(c)
        if len(buf) == target:
            yield from flush()
            index += 1
            target = group_size(ctx, k, index)
    if has_spatial:
        yield from spatial.spatial_samples(tile, ctx, counts)
    if has_multi:
        yield from flush()


def knowledge_samples(gene_sets: list[tuple[str, list[str]]], ctx: SampleContext, counts: Counts,
                      ) -> Iterator[dict]:
    """Gene-set tasks: per set, `rate` samples each, each draw of a set with another template (no two samples
    alike while there are templates left); a set's samples share a split (hash of its name)."""
    for task in ("gene_set_enumeration", "gene_set_naming"):
        if task not in ctx.mixture:
            continue
        for name, genes in gene_sets:
            split = ctx.splits.by_fraction("split", ctx.seed, "gene_set", name)
            first = h64("template", task, name, ctx.seed)
            for d in range(draws(ctx.mixture[task], ctx.seed, task, name)):
                sid = xxhash.xxh3_128_hexdigest(f"{task}|{name}|{d}|{ctx.seed}".encode())
                n = len(genes)
                values = {"gene_set": name, "genes": " ".join(genes)}
                out = render(task, sid, values, None, ctx, counts, template=first + d)
                if out is None:
                    continue
                prompt, response, _, est, t = out
                if est > ctx.budget.max_tokens:
                    counts.skip(task, "over_token_budget")
                    continue
                yield row(task, split, [], prompt, response, n, est, t, sid)
