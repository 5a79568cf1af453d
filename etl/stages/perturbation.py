"""perturbation_prediction on the driver, one file at a time: pass 1 reads obs only and decides hold-outs,
splits and pairs; pass 2 encodes only the chosen controls; pass 3 streams the perturbed rows and writes
`samples/perturbation_prediction/<split>/perturbation-<k>.parquet` through the samples stage's
writer. Memory: the obs columns plus the controls' cut sentences, never X.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from etl.sources.perturbation import FileObs, PerturbationOptions, check_files, encode_rows, read_obs
from etl.stages.samples import write_samples
from etl.tasks.common import Counts, SampleContext
from etl.tasks.perturbation import (
    TASK,
    assign_splits,
    build_pair_samples,
    control_pools,
    file_stats,
    gene_cap,
    plan_pairs,
)
from language.organisms import normalise_organism


def options_from_config(cfg) -> PerturbationOptions:
    """PerturbationOptions from a BuildConfig ('none' as --perturbation-context pairs across the file)."""
    context = tuple(cfg.perturbation_context) or None
    if context and [c.lower() for c in context] == ["none"]:
        context = ()
    return PerturbationOptions(
        column=cfg.perturbation_column, controls=tuple(cfg.control_label), context=context,
        separator=cfg.combination_separator, holdout=cfg.perturbation_holdout,
        combination_holdout=cfg.combination_holdout, layer=cfg.perturbation_layer,
        organism=normalise_organism(cfg.organism), uppercase=cfg.uppercase, block_cells=cfg.block_cells)


def _cell(fo: FileObs, row: int, genes: list[str], organism: str) -> dict:
    return {"cell_id": fo.cell_ids[row], "organism": organism, "dataset_id": fo.dataset_id, "genes": genes,
            "cell_type": fo.cell_types[row] if fo.cell_types is not None else None}


def run(paths: Sequence[str], opts: PerturbationOptions, ctx: SampleContext, staging) -> tuple[list[dict], dict]:
    """The task over every file: one PartWriter result per file (merge with samples.merge_results) and the
    per-file statistics for the manifest (dataset_id -> stats, plus the hold-outs over all files)."""
    paths = check_files(paths)
    files = [read_obs(p, opts) for p in paths]
    splits, hold = assign_splits(files, opts, ctx.splits.fractions, ctx.seed)
    rate = ctx.mixture.get(TASK, 1.0)
    results, stats = [], {}
    for k, (fo, sp) in enumerate(zip(files, splits, strict=True)):
        pools = control_pools(fo, sp, ctx.seed)
        plan = plan_pairs(fo, sp, pools, rate, ctx.seed, opts.separator)

        def rows(counts: Counts, fo=fo, plan=plan) -> Iterator[dict]:
            if plan.skipped:
                counts.skipped[TASK] = dict(plan.skipped)
            controls = {}
            for _, block in encode_rows(fo.path, plan.control_rows(), opts, seed=ctx.seed, max_genes=gene_cap(ctx)):  # pass 2: chosen controls
                controls.update({r: _cell(fo, r, g, opts.organism) for r, g in block.items()})
            for want, block in encode_rows(fo.path, np.unique(plan.pert), opts, seed=ctx.seed,
                                          max_genes=gene_cap(ctx)):  # pass 3: streamed
                cells = {r: _cell(fo, r, g, opts.organism) for r, g in block.items()}
                lo, hi = np.searchsorted(plan.pert, [want[0], want[-1] + 1])
                yield from build_pair_samples(plan, int(lo), int(hi), cells, controls, ctx, counts)

        results.append(write_samples(staging, f"perturbation-{k:03d}", rows))
        stats[fo.dataset_id] = file_stats(fo, sp, plan, pools, hold, opts.separator)
    return results, {"files": stats, "held_out_perturbations": sorted(hold.singles),
                     "held_out_combinations": sorted(opts.separator.join(c) for c in hold.combinations)}
