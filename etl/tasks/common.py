"""What every sample builder shares: hashing, splits, the context shipped to workers, counts, rendering.

Pure, no I/O and no Spark. The builders (builders.py: single-cell, multi-cell, knowledge; spatial.py;
perturbation.py) import this module and never each other's private helpers, so the task modules form no
import cycle.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import xxhash

from language.budget import TokenBudget
from language.packs import TemplatePack
from language.prompts import Rendered, bare, prompt_for
from schemas.tasks import TASKS

GROUP_UNIT = 8  # multi-cell mixture rates are samples per this many grouped cells
CELL_FIELDS = ("cell_id", "organism", "dataset_id", "donor_id", "tissue", "cell_type", "disease", "sex",
               "development_stage", "assay", "cell_type_ontology_term_id", "tissue_ontology_term_id")


def h64(*parts) -> int:
    return xxhash.xxh64_intdigest("\x1f".join(str(p) for p in parts).encode())


def unit(*parts) -> float:
    """A uniform number in [0, 1) from stable ids."""
    return h64(*parts) / 2.0**64


@dataclass(frozen=True)
class SplitConfig:
    """Deterministic splits from a hash of a key; whole datasets held out as test_ood."""

    key: str = "donor"  # donor (dataset + donor) | dataset | cell
    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)  # train, val, test
    ood_datasets: frozenset[str] = frozenset()
    seed: int = 0
    assigned: dict[str, str] = field(default_factory=dict)  # key -> split, from assign() (donor/dataset keys)

    def key_of(self, dataset_id: str, donor_id: str, cell_id: str = "") -> str:
        return {"donor": f"{dataset_id}/{donor_id}", "dataset": dataset_id, "cell": f"{dataset_id}/{cell_id}"}[self.key]

    def split(self, dataset_id: str, donor_id: str, cell_id: str, whole_donor: bool = False) -> str:
        """The cell's split. `whole_donor`: keep the donor's cells together even when splitting by cell (a
        spatial section: neighbours are searched within one split, so a section must not be cut)."""
        if dataset_id in self.ood_datasets:
            return "test_ood"
        k = self.key_of(dataset_id, donor_id, cell_id) if not (whole_donor and self.key == "cell") else \
            f"{dataset_id}/{donor_id}"
        if k in self.assigned:
            return self.assigned[k]
        return self.by_fraction("split", self.seed, k)

    def by_fraction(self, *key) -> str:
        """train/val/test by where a hash of `key` falls among the fractions (for keys not assigned)."""
        u = unit(*key)
        tr, va, _ = self.fractions
        return "train" if u < tr else "val" if u < tr + va else "test"

    def assign(self, keys: Iterable[str]) -> SplitConfig:
        """Splits by rank of hash over the known keys: the fractions hold exactly, and val and test get at
        least one key each when there are three or more (small corpora still have a validation split)."""
        ks = sorted(set(keys), key=lambda k: (h64("split", self.seed, k), k))
        n = len(ks)
        n_val = max(1 if n >= 3 else 0, round(self.fractions[1] * n)) if self.fractions[1] > 0 else 0
        n_test = max(1 if n >= 3 else 0, round(self.fractions[2] * n)) if self.fractions[2] > 0 else 0
        out = {k: "val" for k in ks[:n_val]} | {k: "test" for k in ks[n_val : n_val + n_test]}
        out |= {k: "train" for k in ks[n_val + n_test :]}
        return SplitConfig(self.key, self.fractions, self.ood_datasets, self.seed, out)


def choose_ood(datasets: Iterable[str], fraction: float, seed: int) -> frozenset[str]:
    """round(fraction × n) datasets, chosen by hash (at least one when fraction > 0 and n ≥ 3)."""
    ds = sorted(set(datasets))
    if fraction <= 0 or not ds:
        return frozenset()
    n = max(1 if len(ds) >= 3 else 0, round(fraction * len(ds)))
    return frozenset(sorted(ds, key=lambda d: h64("ood", seed, d))[:n])


@dataclass
class SampleContext:
    """Everything a builder needs, shipped once to each worker."""

    mixture: dict[str, float]  # active tasks only
    budget: TokenBudget = field(default_factory=TokenBudget)
    splits: SplitConfig = field(default_factory=SplitConfig)
    seed: int = 0
    abstracts: dict[str, str] = field(default_factory=dict)  # dataset_id -> abstract
    lr_pairs: list[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = field(default_factory=list)
    biogrid: dict[str, dict[str, frozenset[str]]] = field(default_factory=dict)  # organism -> symbol -> partners
    group_max: int = 20
    group_min: int = 2
    min_genes: int = 8  # fewer genes per cell than this after the budget: the sample is not written
    max_genes: int = 1024  # genes per cell in any prompt (before the budget)
    interaction_genes: int = 100  # top genes of a cell searched for BioGRID pairs
    max_pairs: int = 10
    spatial: dict = field(default_factory=dict)  # section key -> spatial.Section; empty: no spatial tasks
    templates: TemplatePack | None = None  # a pack wording some tasks (None: this project's templates)

    def __post_init__(self):
        self._lr_index: dict[str, list[int]] = {}
        for i, (_, _, lg, _) in enumerate(self.lr_pairs):
            self._lr_index.setdefault(lg[0], []).append(i)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_lr_index"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__post_init__()


def _bump(d: dict, a: str, b: str, n: int = 1) -> None:
    inner = d.setdefault(a, {})
    inner[b] = inner.get(b, 0) + n


class Counts:
    """Samples per (task, split), est_tokens per task, and why samples were not made, per task."""

    def __init__(self):
        self.samples: dict[str, dict[str, int]] = {}
        self.tokens: dict[str, int] = {}
        self.skipped: dict[str, dict[str, int]] = {}
        self.cells = 0
        self.groups = 0
        self.ungrouped_cells = 0

    def add(self, row: dict) -> None:
        _bump(self.samples, row["task"], row["split"])
        self.tokens[row["task"]] = self.tokens.get(row["task"], 0) + row["est_tokens"]

    def skip(self, task: str, reason: str) -> None:
        _bump(self.skipped, task, reason)

    def merge(self, other: Counts) -> Counts:
        for mine, theirs in ((self.samples, other.samples), (self.skipped, other.skipped)):
            for a, d in theirs.items():
                for b, n in d.items():
                    _bump(mine, a, b, n)
        for t, n in other.tokens.items():
            self.tokens[t] = self.tokens.get(t, 0) + n
        self.cells += other.cells
        self.groups += other.groups
        self.ungrouped_cells += other.ungrouped_cells
        return self

    def as_dict(self) -> dict:
        return {"samples": self.samples, "est_tokens": self.tokens, "skipped": self.skipped, "cells": self.cells,
                "groups": self.groups, "ungrouped_cells": self.ungrouped_cells}

    @classmethod
    def from_dict(cls, d: dict) -> Counts:
        c = cls()
        c.samples, c.tokens, c.skipped = d["samples"], d["est_tokens"], d["skipped"]
        c.cells, c.groups, c.ungrouped_cells = d["cells"], d["groups"], d["ungrouped_cells"]
        return c


def draws(rate: float, *key) -> int:
    """floor(rate) samples, plus one more with probability frac(rate), decided by hash."""
    n = int(rate)
    return n + (unit("draw", *key) < rate - n)


# Prediction tasks: the label is the completion's bare answer; where it is one cell field with an ontology id,
# the id comes from the cell (never parsed from text).
LABEL_TASKS = frozenset(name for name, spec in TASKS.items() if spec.output == "label")
LABEL_ID_FIELD = {"cell_type_prediction": "cell_type_ontology_term_id", "tissue_prediction": "tissue_ontology_term_id",
                  "multi_cell_tissue_prediction": "tissue_ontology_term_id"}


def row(task, split, cells, prompt, completion, n_genes, est, t_index, sample_id) -> dict:
    first = cells[0] if cells else {}
    label_id = first.get(LABEL_ID_FIELD[task]) if task in LABEL_ID_FIELD else None
    return {"sample_id": sample_id, "task": task, "split": split, "prompt": prompt, "completion": completion,
            "label": bare(completion) if task in LABEL_TASKS else None,
            "label_id": label_id if label_id and label_id != "unknown" else None,
            "organism": first.get("organism", ""), "dataset_id": first.get("dataset_id", ""),
            "cell_ids": [c["cell_id"] for c in cells], "n_genes": n_genes, "est_tokens": est, "template": t_index}


def render(task: str, sample_id: str, values: dict, sentences: list[list[str]] | None, ctx: SampleContext,
           counts: Counts, template: int | None = None) -> Rendered | None:
    """The sample's prompt (`language.prompts.prompt_for`) with a template chosen by hash of the sample id (or
    `template`) and the context's budget; None, counted as over_token_budget, when the cells do not fit."""
    t = h64("template", sample_id) if template is None else template
    out = prompt_for(task, values, sentences, ctx.budget, template=t, max_genes=ctx.max_genes,
                     min_genes=ctx.min_genes, pack=ctx.templates)
    if out is None:
        counts.skip(task, "over_token_budget")
    return out


def group_key(c: dict) -> str:
    return "|".join((c["organism"], c["dataset_id"], c["donor_id"], c["tissue"], c["split"]))


def cell_order(c: dict, seed: int) -> int:
    return h64("order", seed, c["dataset_id"], c["cell_id"])
