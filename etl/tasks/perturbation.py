"""perturbation_prediction: a control cell's sentence + a perturbation name -> the perturbed cell's sentence.

The pure part of the task (no I/O): hold-outs, splits, control pools, pairing and sample rendering over what
etl/sources/perturbation.py reads (FileObs); etl/stages/perturbation.py runs the passes and writes the parts.
As in C2S-Scale, each perturbed cell is paired with a control of the same context (default: the same
cell_type), chosen by hash. Splits hold perturbations out so a model is tested on what it never saw:

- single perturbations chosen by hash (--perturbation-holdout) are test-only, alone or inside a combination;
- combinations chosen by hash among those whose genes all have train cells as singles
  (--combination-holdout) are test-only ("unseen combination of seen perturbations");
- every other perturbed cell goes to train or val by a hash of the cell;
- controls are ranked by hash within each context and shared out over the splits in proportion to the
  perturbed cells there; a sample takes its control from its own split's pool, so no cell is in two splits.

Prompts name the perturbation in words ("KLF1 and MAP2K6"), with its kind when the file's
`perturbation_type` column gives a known one ("CRISPRi knockdown of KLF1", "treatment with dexamethasone";
`language.prompts.KIND_PHRASES`); otherwise neutrally ("the perturbation KLF1").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import xxhash

from etl.sources.perturbation import FileObs, PerturbationOptions, parse_label  # noqa: F401 (re-exported)
from etl.tasks.common import Counts, SampleContext, draws, h64, row, unit
from language import templates
from language.organisms import ORGANISMS
from language.phrases import cell_kind
from language.prompts import perturbation_words
from schemas.tasks import SPLITS

TASK = "perturbation_prediction"

_SPLIT_CODE = {s: i for i, s in enumerate(SPLITS)}


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
    names: list[str]  # perturbation labels (genes joined by the separator)
    skipped: dict[str, int] = field(default_factory=dict)
    targets: list[tuple[str, ...]] = field(default_factory=list)  # per name: its genes (or compounds)
    kinds: list[str | None] = field(default_factory=list)  # per name: the file's perturbation_type, if any

    def control_rows(self) -> np.ndarray:
        return np.unique(self.ctrl)


def plan_pairs(f: FileObs, splits: list[str | None], pools: dict, rate: float, seed: int,
               separator: str) -> PairPlan:
    """Pair each perturbed cell (rate samples on average) with a control from its own split's pool of its
    context, chosen by hash; cells whose pool is empty are counted, not paired."""
    cols: tuple[list, ...] = ([], [], [], [], [])
    names: dict[tuple[str, str | None], int] = {}
    targets: list[tuple[str, ...]] = []
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
        key = (separator.join(g), f.kinds[i] if f.kinds is not None else None)
        if key not in names:
            names[key] = len(names)
            targets.append(g)
        name = names[key]
        for d in range(n):
            j = pool[h64("pert_pair", seed, f.dataset_id, f.cell_ids[i], d) % len(pool)]
            for col, v in zip(cols, (i, j, d, _SPLIT_CODE[splits[i]], name), strict=True):
                col.append(v)
    return PairPlan(np.asarray(cols[0], np.int64), np.asarray(cols[1], np.int64), np.asarray(cols[2], np.int32),
                    np.asarray(cols[3], np.int8), np.asarray(cols[4], np.int32), [n for n, _ in names],
                    dict(skipped), targets, [k for _, k in names])


# ---------------------------------------------------------------------------------------------- samples


def gene_cap(ctx: SampleContext) -> int:
    """The most genes one sentence of a pair can show under the budget (what pass 2 keeps per control)."""
    per_gene = 1.0 if ctx.budget.exact else ctx.budget.tokens_per_gene
    return max(1, min(ctx.max_genes, int(ctx.budget.max_tokens / per_gene)))


def _format(t: int, values: dict, control: list[str], perturbed: list[str], ctx: SampleContext,
            ) -> tuple[str, str, int]:
    spec = templates.load(TASK)
    values = {**values, "num_genes": len(perturbed), "cell_sentence": " ".join(control),
              "perturbed_sentence": " ".join(perturbed)}
    prompt, response = templates.fill(spec["prompts"][t], values), templates.fill(spec["response"], values)
    est = ctx.budget.text(prompt) + ctx.budget.text(response)
    if not ctx.budget.exact:  # gene symbols at tokens-per-gene instead of characters
        genes = control + perturbed
        est += round(ctx.budget.genes(genes) - ctx.budget.text(" ".join(genes)))
    return prompt, response, max(est, 1)


def perturbation_sample(control: dict, perturbed: dict, perturbation: str | Sequence[str], split: str, draw: int,
                        ctx: SampleContext, counts: Counts, kind: str | None = None) -> dict | None:
    """One sample: both sentences cut to the same n genes so prompt + response fit ctx.budget. `perturbation`:
    its genes (a label is one name); `kind`: the file's perturbation_type of the cell, if any."""
    sid = xxhash.xxh3_128_hexdigest(
        f"{TASK}|{perturbed['dataset_id']}|{perturbed['cell_id']}|{draw}|{ctx.seed}".encode())
    spec = templates.load(TASK)
    t = h64("template", sid) % len(spec["prompts"])
    targets = (perturbation,) if isinstance(perturbation, str) else tuple(perturbation)
    values = {"organism_name": ORGANISMS.get(perturbed["organism"], perturbed["organism"]),
              "cell_kind": cell_kind(perturbed.get("cell_type")), **perturbation_words(targets, kind)}
    probe = {**values, "num_genes": 100, "cell_sentence": "", "perturbed_sentence": ""}
    fixed = ctx.budget.text(templates.fill(spec["prompts"][t], probe)) + ctx.budget.text(templates.fill(spec["response"], probe))
    sentences = [control["genes"], perturbed["genes"]]
    n = ctx.budget.fit(sentences, fixed, ctx.max_genes)
    floor = min(ctx.min_genes, *(len(s) for s in sentences))
    while n >= max(floor, 1):
        prompt, response, est = _format(t, values, sentences[0][:n], sentences[1][:n], ctx)
        if est <= ctx.budget.max_tokens:  # the fit's estimate can round a token or two under
            return row(TASK, split, [control, perturbed], prompt, response, n, est, t, sid)
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
        name = int(plan.name[k])
        targets = plan.targets[name] if plan.targets else plan.names[name]
        row = perturbation_sample(controls[c], perturbed[p], targets, SPLITS[plan.split[k]], int(plan.draw[k]), ctx,
                                  counts, plan.kinds[name] if plan.kinds else None)
        if row is not None:
            yield row


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


