"""perturbation_prediction: a control cell's sentence + a perturbation name -> the perturbed cell's sentence.

From perturbation AnnData files (Perturb-seq style: one obs column names each cell's perturbation, control
cells carry a control label, combinations join genes with a separator as in "KLF1+MAP2K6"). As in C2S-Scale,
each perturbed cell is paired with a control of the same context (default: the same cell_type), chosen by
hash. Splits hold perturbations out so a model is tested on what it never saw:

- single perturbations chosen by hash (--perturbation-holdout) are test-only, alone or inside a combination;
- combinations chosen by hash among those whose genes all have train cells as singles
  (--combination-holdout) are test-only ("unseen combination of seen perturbations");
- every other perturbed cell goes to train or val by a hash of the cell;
- controls are ranked by hash within each context and shared out over the splits in proportion to the
  perturbed cells there; a sample takes its control from its own split's pool, so no cell is in two splits.

The pure core (label parsing, hold-outs, splits, pairing, sample rendering) works on plain Python/numpy
data; `run` is the thin driver: pass 1 reads obs only, pass 2 encodes the chosen controls (block by block),
pass 3 streams the perturbed rows and writes parts through the samples stage's PartWriter. It runs on the
driver, one file at a time; memory is the obs columns plus the chosen controls' (cut) sentences.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from etl.sources.base import ORGANISMS, InputError, normalise_organism, safe_name
from etl.tasks import templates as tpl
from etl.tasks.builders import SPLITS, Counts, SampleContext, _row, draws, h64, unit

TASK = "perturbation_prediction"
NO_CELL_TYPE = "cell"  # {cell_type} when the file has no cell_type column: "a Homo sapiens cell"
_SPLIT_CODE = {s: i for i, s in enumerate(SPLITS)}


@dataclass(frozen=True)
class PerturbationOptions:
    """The options of the perturbation files (plain data; they enter the run key through the config)."""

    column: str = "perturbation"
    controls: tuple[str, ...] = ("control",)
    context: tuple[str, ...] | None = None  # None: ("cell_type",) when that column exists, else ()
    separator: str = "+"
    holdout: float = 0.1
    combination_holdout: float = 0.2
    layer: str | None = None  # X | raw | a layer name
    organism: str = "homo_sapiens"
    uppercase: bool = True
    block_cells: int = 4096


# ---------------------------------------------------------------------------------------------- labels


def parse_label(label, controls: frozenset[str], separator: str) -> tuple[str, ...] | None:
    """The genes of a perturbation label: () for a control, None for a missing label.

    Parts equal to a control label are dropped ("KLF1+ctrl" is the single KLF1, GEARS style); the genes of a
    combination are sorted, so "MAP2K6+KLF1" and "KLF1+MAP2K6" are one combination."""
    if label is None or (isinstance(label, float) and math.isnan(label)):
        return None
    text = str(label).strip()
    if not text or text.lower() == "nan":
        return None
    if text in controls:
        return ()
    genes = {p.strip() for p in text.split(separator)} - controls - {""}
    return tuple(sorted(genes))


def choose_by_hash(items, fraction: float, seed: int, salt: str) -> frozenset:
    """round(fraction × n) items ranked by hash (at least one when fraction > 0 and n >= 3)."""
    pool = sorted(set(items))
    if fraction <= 0 or not pool:
        return frozenset()
    n = max(1 if len(pool) >= 3 else 0, round(fraction * len(pool)))
    return frozenset(sorted(pool, key=lambda x: (h64(salt, seed, _key(x)), x))[:n])


def _key(x) -> str:
    return "+".join(x) if isinstance(x, tuple) else str(x)


# ---------------------------------------------------------------------------------------------- splits


@dataclass
class FileObs:
    """What pass 1 reads of one file: obs only."""

    path: str
    dataset_id: str
    cell_ids: list[str]
    genes: list[tuple[str, ...] | None]  # parsed label per cell
    contexts: list[tuple[str, ...]]  # context values per cell
    cell_types: list[str] | None  # the cell_type column, when the file has one
    context_columns: tuple[str, ...]


@dataclass(frozen=True)
class Holdout:
    singles: frozenset[str]
    combinations: frozenset[tuple[str, ...]]


def train_val(seed: int, dataset_id: str, cell_id: str, fractions: Sequence[float]) -> str:
    """train or val by a hash of the cell, with the train/val fractions renormalised over the two."""
    tr, va = fractions[0], fractions[1]
    share = tr / (tr + va) if tr + va > 0 else 1.0
    return "train" if unit("pert_split", seed, dataset_id, cell_id) < share else "val"


def assign_splits(files: Sequence[FileObs], opts: PerturbationOptions, fractions: Sequence[float],
                  seed: int) -> tuple[list[list[str | None]], Holdout]:
    """Split of every cell of every file (None for controls and unlabelled cells) and the hold-outs.

    Hold-outs are chosen over all files together, so a gene held out in one file is not trained on in
    another."""
    singles = {g[0] for f in files for g in f.genes if g and len(g) == 1}
    held = choose_by_hash(singles, opts.holdout, seed, "pert_single")
    out: list[list[str | None]] = []
    seen_train: set[str] = set()
    for f in files:
        splits: list[str | None] = []
        for cid, g in zip(f.cell_ids, f.genes, strict=True):
            if not g:
                splits.append(None)
            elif held.intersection(g):
                splits.append("test")
            elif len(g) == 1:
                s = train_val(seed, f.dataset_id, cid, fractions)
                splits.append(s)
                if s == "train":
                    seen_train.add(g[0])
            else:
                splits.append("?")  # a combination: decided below
        out.append(splits)
    combos = {g for f in files for g in f.genes if g and len(g) > 1 and not held.intersection(g)}
    eligible = {c for c in combos if seen_train.issuperset(c)}
    held_combos = choose_by_hash(eligible, opts.combination_holdout, seed, "pert_combo")
    for f, splits in zip(files, out, strict=True):
        for i, s in enumerate(splits):
            if s == "?":
                splits[i] = "test" if f.genes[i] in held_combos else train_val(seed, f.dataset_id, f.cell_ids[i],
                                                                               fractions)
    return out, Holdout(held, held_combos)


def apportion(n: int, demand: dict[str, int]) -> dict[str, int]:
    """Share n controls over the splits in proportion to their perturbed cells (largest remainder), at
    least one per split that has perturbed cells when n allows (the splits with most demand first)."""
    wanted = sorted((s for s in SPLITS if demand.get(s, 0) > 0), key=lambda s: (-demand[s], _SPLIT_CODE[s]))
    if n <= len(wanted):
        return {s: 1 for s in wanted[:n]}
    share = dict.fromkeys(wanted, 1)
    rest, total = n - len(wanted), sum(demand[s] for s in wanted)
    quota = {s: rest * demand[s] / total for s in wanted}
    for s in wanted:
        share[s] += int(quota[s])
    left = n - sum(share.values())
    for s in sorted(wanted, key=lambda s: (-(quota[s] - int(quota[s])), _SPLIT_CODE[s]))[:left]:
        share[s] += 1
    return share


def control_pools(f: FileObs, splits: list[str | None], seed: int) -> dict[tuple[tuple[str, ...], str], list[int]]:
    """(context, split) -> control rows: within each context, controls ranked by hash and cut over the
    splits in proportion to the perturbed cells of that context in each split."""
    demand: dict[tuple[str, ...], Counter] = {}
    controls: dict[tuple[str, ...], list[int]] = {}
    for i, g in enumerate(f.genes):
        if g == ():
            controls.setdefault(f.contexts[i], []).append(i)
        elif g is not None:
            demand.setdefault(f.contexts[i], Counter())[splits[i]] += 1
    pools: dict[tuple[tuple[str, ...], str], list[int]] = {}
    for ctx_key, rows in controls.items():
        rows = sorted(rows, key=lambda r: (h64("pert_control", seed, f.dataset_id, f.cell_ids[r]), r))
        share = apportion(len(rows), dict(demand.get(ctx_key, {})))
        at = 0
        for s in SPLITS:  # fixed order: the cut is a function of the hash ranking and the demand only
            k = share.get(s, 0)
            if k:
                pools[(ctx_key, s)] = rows[at : at + k]
                at += k
    return pools


@dataclass
class PairPlan:
    """Samples to make from one file, as aligned arrays sorted by perturbed row (compact for large files)."""

    pert: np.ndarray  # int64 perturbed row
    ctrl: np.ndarray  # int64 control row
    draw: np.ndarray  # int32 draw index (mixture rate > 1 gives several samples per perturbed cell)
    split: np.ndarray  # int8 index into SPLITS
    name: np.ndarray  # int32 index into names
    names: list[str]  # perturbation names as shown in prompts (genes joined by the separator)
    skipped: dict[str, int] = field(default_factory=dict)

    def control_rows(self) -> np.ndarray:
        return np.unique(self.ctrl)


def plan_pairs(f: FileObs, splits: list[str | None], pools: dict, rate: float, seed: int,
               separator: str) -> PairPlan:
    """Pair each perturbed cell (rate samples on average) with a control from its own split's pool of its
    context, chosen by hash; cells whose pool is empty are counted, not paired."""
    cols: tuple[list, ...] = ([], [], [], [], [])
    names: dict[str, int] = {}
    skipped: Counter = Counter()
    for i, g in enumerate(f.genes):
        if g is None:
            skipped["missing_perturbation_label"] += 1
            continue
        if not g:
            continue
        pool = pools.get((f.contexts[i], splits[i]))
        n = draws(rate, seed, TASK, f.dataset_id, f.cell_ids[i])
        if not pool:
            skipped["no_control_in_split_and_context"] += n
            continue
        name = names.setdefault(separator.join(g), len(names))
        for d in range(n):
            j = pool[h64("pert_pair", seed, f.dataset_id, f.cell_ids[i], d) % len(pool)]
            for col, v in zip(cols, (i, j, d, _SPLIT_CODE[splits[i]], name), strict=True):
                col.append(v)
    return PairPlan(np.asarray(cols[0], np.int64), np.asarray(cols[1], np.int64), np.asarray(cols[2], np.int32),
                    np.asarray(cols[3], np.int8), np.asarray(cols[4], np.int32), list(names), dict(skipped))


# ---------------------------------------------------------------------------------------------- samples


def gene_cap(ctx: SampleContext) -> int:
    """The most genes one sentence of a pair can show under the budget (what pass 2 keeps per control)."""
    per_gene = 1.0 if ctx.budget.exact else ctx.budget.tokens_per_gene
    return max(1, min(ctx.max_genes, int(ctx.budget.max_tokens / per_gene)))


def _format(t: int, values: dict, control: list[str], perturbed: list[str], ctx: SampleContext,
            ) -> tuple[str, str, int]:
    spec = tpl.load(TASK)
    values = {**values, "num_genes": len(perturbed), "cell_sentence": " ".join(control),
              "perturbed_sentence": " ".join(perturbed)}
    prompt, response = spec["prompts"][t].format(**values), spec["response"].format(**values)
    est = ctx.budget.text(prompt) + ctx.budget.text(response)
    if not ctx.budget.exact:  # gene symbols at tokens-per-gene instead of characters
        genes = control + perturbed
        est += round(ctx.budget.genes(genes) - ctx.budget.text(" ".join(genes)))
    return prompt, response, max(est, 1)


def perturbation_sample(control: dict, perturbed: dict, perturbation: str, split: str, draw: int,
                        ctx: SampleContext, counts: Counts) -> dict | None:
    """One sample: both sentences cut to the same n genes so prompt + response fit ctx.budget."""
    sid = xxhash.xxh3_128_hexdigest(
        f"{TASK}|{perturbed['dataset_id']}|{perturbed['cell_id']}|{draw}|{ctx.seed}".encode())
    spec = tpl.load(TASK)
    t = h64("template", sid) % len(spec["prompts"])
    values = {"organism_name": ORGANISMS.get(perturbed["organism"], perturbed["organism"]),
              "perturbation": perturbation, "cell_type": perturbed.get("cell_type") or NO_CELL_TYPE}
    probe = {**values, "num_genes": 100, "cell_sentence": "", "perturbed_sentence": ""}
    fixed = ctx.budget.text(spec["prompts"][t].format(**probe)) + ctx.budget.text(spec["response"].format(**probe))
    sentences = [control["genes"], perturbed["genes"]]
    n = ctx.budget.fit(sentences, fixed, ctx.max_genes)
    floor = min(ctx.min_genes, *(len(s) for s in sentences))
    while n >= max(floor, 1):
        prompt, response, est = _format(t, values, sentences[0][:n], sentences[1][:n], ctx)
        if est <= ctx.budget.max_tokens:  # the fit's estimate can round a token or two under
            return _row(TASK, split, [control, perturbed], prompt, response, n, est, t, sid)
        n -= 1
    counts.skip(TASK, "over_token_budget")
    return None


def build_pair_samples(plan: PairPlan, lo: int, hi: int, perturbed: dict[int, dict], controls: dict[int, dict],
                       ctx: SampleContext, counts: Counts) -> Iterator[dict]:
    """Samples of plan entries [lo, hi) given the perturbed cells (row -> cell) and controls (row -> cell);
    a cell missing from either map had no expressed genes and is counted."""
    for k in range(lo, hi):
        p, c = int(plan.pert[k]), int(plan.ctrl[k])
        if p not in perturbed:
            counts.skip(TASK, "perturbed_cell_without_expressed_genes")
            continue
        if c not in controls:
            counts.skip(TASK, "control_cell_without_expressed_genes")
            continue
        row = perturbation_sample(controls[c], perturbed[p], plan.names[plan.name[k]], SPLITS[plan.split[k]],
                                  int(plan.draw[k]), ctx, counts)
        if row is not None:
            yield row


# ---------------------------------------------------------------------------------------------- reading


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


def check_files(paths: Sequence[str]) -> list[str]:
    """Absolute paths, each an existing file with a dataset id (file stem) of its own."""
    out, ids = [], {}
    for p in paths:
        if not os.path.isfile(p):
            raise InputError(f"--perturbation-h5ad: file not found: {p!r}")
        ds = safe_name(Path(p).stem)
        if ds in ids:
            raise InputError(f"--perturbation-h5ad: {p!r} and {ids[ds]!r} share the dataset id {ds!r} "
                             "(the file name): rename one")
        ids[ds] = p
        out.append(str(Path(p).resolve()))
    return out


def _labels_hint(raw: np.ndarray) -> str:
    common = Counter("<missing>" if v is None else str(v) for v in raw).most_common(8)
    return ", ".join(f"{v!r} ({n})" for v, n in common)


def read_obs(path: str, opts: PerturbationOptions) -> FileObs:
    """Pass 1: the perturbation, context and cell_type columns of one file (never X)."""
    from etl.sources.h5ad import _column, _columns, _index, _matrix_paths, _open

    with _open(path) as f:
        mpath, vpath = _matrix_paths(opts.layer)
        if "obs" not in f or vpath not in f:
            raise InputError(f"{path}: not an AnnData file (no obs/var groups)")
        if mpath not in f:
            raise InputError(f"{path}: no matrix {mpath!r} (--perturbation-layer {opts.layer!r})")
        obs = f["obs"]
        cols = set(_columns(obs)) - {obs.attrs.get("_index")}
        if opts.column not in cols:
            raise InputError(f"{path}: obs has no column {opts.column!r} (--perturbation-column); "
                             f"obs columns: {sorted(cols)}")
        context = opts.context if opts.context is not None else (("cell_type",) if "cell_type" in cols else ())
        for c in context:
            if c not in cols:
                raise InputError(f"{path}: obs has no context column {c!r} (--perturbation-context); "
                                 f"obs columns: {sorted(cols)}")
        ids = _index(obs)
        n = len(ids)
        raw = _column(obs, opts.column, 0, n)
        controls = frozenset(opts.controls)
        genes = [parse_label(v, controls, opts.separator) for v in raw]
        if not any(g == () for g in genes):
            raise InputError(f"{path}: no cell has the control label(s) {sorted(controls)} in obs column "
                             f"{opts.column!r} (--control-label); most common labels: {_labels_hint(raw)}")
        if not any(genes):
            raise InputError(f"{path}: every labelled cell in obs column {opts.column!r} is a control "
                             f"({sorted(controls)}): no perturbed cell")
        ctx_cols = [[("unknown" if v is None else str(v)) for v in _column(obs, c, 0, n)] for c in context]
        contexts = list(zip(*ctx_cols, strict=True)) if ctx_cols else [()] * n
        cell_types = ([("unknown" if v is None else str(v)) for v in _column(obs, "cell_type", 0, n)]
                      if "cell_type" in cols else None)
    return FileObs(path, safe_name(Path(path).stem), [str(x) for x in ids], genes, contexts, cell_types,
                   tuple(context))


def _encoder(f, vpath: str, opts: PerturbationOptions, ctx: SampleContext):
    from etl.encode import Encoder, Vocabulary, var_words
    from etl.sources.h5ad import _column, _columns, _index

    var = f[vpath]
    ids = _index(var)
    names = _column(var, "feature_name", 0, len(ids)) if "feature_name" in _columns(var) else ids
    words, _ = var_words(ids, names, uppercase=opts.uppercase)
    voc = Vocabulary.from_sources([([str(x) for x in ids], words)])
    enc = Encoder(voc.col_token(words), voc.symbols, seed=ctx.seed, max_genes=gene_cap(ctx))
    return enc, voc.symbols.to_pylist()


def encode_rows(path: str, rows: np.ndarray, opts: PerturbationOptions, ctx: SampleContext,
                ) -> Iterator[tuple[np.ndarray, dict[int, list[str]]]]:
    """(rows of the block, row -> ranked genes cut to gene_cap) for the given sorted rows, one block per
    window of --block-cells file rows that holds any; rows with no expressed gene (or invalid values) have
    no entry."""
    from etl.sources.h5ad import _matrix_paths, _open, _rows

    mpath, vpath = _matrix_paths(opts.layer)
    rows = np.asarray(rows, np.int64)
    with _open(path) as f:
        enc, symbols = _encoder(f, vpath, opts, ctx)
        i = 0
        while i < len(rows):
            j = int(np.searchsorted(rows, rows[i] + opts.block_cells))
            want = rows[i:j]
            m = _rows(f, mpath, int(want[0]), int(want[-1]) + 1)[want - want[0]]
            m.sort_indices()
            e = enc.encode(m.indptr, m.indices, m.data, want)
            yield want, {int(want[p]): [symbols[t] for t in e.tokens[e.offsets[k]:e.offsets[k + 1]]]
                         for k, p in enumerate(e.kept)}
            i = j


def _cell(fo: FileObs, row: int, genes: list[str], organism: str) -> dict:
    return {"cell_id": fo.cell_ids[row], "organism": organism, "dataset_id": fo.dataset_id, "genes": genes,
            "cell_type": fo.cell_types[row] if fo.cell_types is not None else None}


def file_stats(fo: FileObs, splits: list[str | None], plan: PairPlan, pools: dict, hold: Holdout,
               separator: str) -> dict:
    """What the manifest records of one file (knowledge counts)."""
    singles = {g for g in fo.genes if g and len(g) == 1}
    combos = {g for g in fo.genes if g and len(g) > 1}
    per_split = Counter(s for s in splits if s is not None)
    return {
        "path": fo.path, "cells": len(fo.cell_ids), "controls": sum(1 for g in fo.genes if g == ()),
        "perturbed_cells": sum(per_split.values()), "perturbations": len(singles), "combinations": len(combos),
        "context_columns": list(fo.context_columns), "contexts": len(set(fo.contexts)),
        "perturbed_cells_per_split": dict(sorted(per_split.items())),
        "controls_per_split": {s: sum(len(v) for (_, sp), v in pools.items() if sp == s) for s in SPLITS
                               if any(sp == s for _, sp in pools)},
        "held_out_perturbations": sorted(g[0] for g in singles if g[0] in hold.singles),
        "held_out_combinations": sorted(separator.join(g) for g in combos if g in hold.combinations),
        "pairs": len(plan.pert), "not_paired": plan.skipped,
    }


def run(paths: Sequence[str], opts: PerturbationOptions, ctx: SampleContext, staging) -> tuple[list[dict], dict]:
    """The task over every file: one PartWriter result per file (merge with samples.merge_results) and the
    per-file statistics for the manifest (dataset_id -> stats, plus the hold-outs over all files)."""
    from etl.stages.samples import write_samples

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
            for _, block in encode_rows(fo.path, plan.control_rows(), opts, ctx):  # pass 2: chosen controls
                controls.update({r: _cell(fo, r, g, opts.organism) for r, g in block.items()})
            for want, block in encode_rows(fo.path, np.unique(plan.pert), opts, ctx):  # pass 3: streamed
                cells = {r: _cell(fo, r, g, opts.organism) for r, g in block.items()}
                lo, hi = np.searchsorted(plan.pert, [want[0], want[-1] + 1])
                yield from build_pair_samples(plan, int(lo), int(hi), cells, controls, ctx, counts)

        results.append(write_samples(staging, f"perturbation-{k:03d}", rows))
        stats[fo.dataset_id] = file_stats(fo, sp, plan, pools, hold, opts.separator)
    return results, {"files": stats, "held_out_perturbations": sorted(hold.singles),
                     "held_out_combinations": sorted(opts.separator.join(c) for c in hold.combinations)}
