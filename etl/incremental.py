"""Incremental builds: rebuild only the datasets whose source or plan changed, reuse the rest where it lies.

Every sentences build records a *dataset key* per `organism/dataset_id`: a digest of everything that decides
that dataset's rows (its source version: the Census `dataset_version_id`, or an h5ad file's content hash; its
planned tasks and their cells; its var table's words; the output-shaping options; the encoder and row-hash
formats). A later build over a changed source (`jobs/refresh.py`, or `c2s build --incremental`) compares the
new keys with the latest version's:

- equal key: the dataset's parts are reused where an earlier version wrote them (the manifest's file entry
  names that version; nothing is copied), with their counts, fit statistics and per-gene cell counts;
- new or changed key: the dataset's tasks run again, into the new version;
- a key of the old version that is gone: the dataset was withdrawn (or left the selection) and is dropped.

Equal keys mean equal rows, so the new version's `content_hash` (an order-free sum of row hashes) equals a
full build's. The vocabulary's `n_cells` is the old one, less the dropped and rebuilt datasets' share (their
parts' `stats/genes` counts), plus what the rebuilt tasks counted: again what a full build counts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass, field

import numpy as np

from etl.manifest import formats
from etl.sources.base import SourcePlan, Task
from etl.storage import Store
from language.fit import FitStats
from schemas.layout import CorpusVersion, gene_counts_rel, parse_sentence_rel, part_path

log = logging.getLogger("etl.incremental")

# task options that name where a source is, not what it holds (a copied or re-released collection)
_LOCATION_OPTIONS = {"fingerprint", "s3_region"}


def dataset_name(organism: str, dataset_id: str) -> str:
    return f"{organism}/{dataset_id}"


def _task_record(t: Task) -> list:
    ids = None
    if t.joinids is not None:
        ids = hashlib.sha256(np.asarray(t.joinids, np.int64).tobytes()).hexdigest()
    opts = {k: v for k, v in t.options.items() if k not in _LOCATION_OPTIONS}
    return [t.index, t.lo, t.hi, t.n_cells, ids, opts]


def dataset_keys(plan: SourcePlan, options: dict) -> dict[str, str]:
    """`organism/dataset_id` -> the digest of what decides that dataset's rows (see the module docstring)."""
    known = formats()
    kept = {k: known[k] for k in ("schema", "encoder", "row_hash")}
    var_digest = {key: hashlib.sha256(json.dumps([v.feature_ids, v.words]).encode()).hexdigest()
                  for key, v in plan.vars.items()}
    by: dict[str, list[Task]] = {}
    for t in plan.tasks:
        by.setdefault(dataset_name(t.organism, t.dataset_id), []).append(t)
    keys = {}
    for name, tasks in sorted(by.items()):
        identity = plan.identities.get(name)
        if identity is None:  # no per-dataset version: the whole source is the identity
            identity = json.dumps(plan.description, sort_keys=True, default=str)
        blob = {"formats": kept, "options": options, "identity": identity,
                "var": sorted({var_digest[t.var_key] for t in tasks}),
                "tasks": [_task_record(t) for t in sorted(tasks, key=lambda t: t.index)]}
        keys[name] = hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()
    return keys


@dataclass
class Reuse:
    """What a build takes from the version it refreshes."""

    base: CorpusVersion
    unchanged: list[str] = field(default_factory=list)  # datasets reused as they are
    rebuilt: list[str] = field(default_factory=list)  # new or changed datasets, built again
    removed: list[str] = field(default_factory=list)  # datasets of the base that are gone

    def reused(self, task: Task) -> bool:
        return dataset_name(task.organism, task.dataset_id) in self._unchanged

    @functools.cached_property
    def _unchanged(self) -> frozenset[str]:
        return frozenset(self.unchanged)


def plan_reuse(base: CorpusVersion | None, keys: dict[str, str]) -> Reuse | None:
    """The datasets `keys` shares with `base`; None when `base` cannot be refreshed (none, or built before
    dataset keys and per-part gene counts were recorded: a full build then)."""
    if base is None:
        return None
    old = base.manifest.get("dataset_keys")
    if not old or not base.manifest.get("gene_counts"):
        log.info("version %s has no dataset keys (built by an older release): a full build", base.version)
        return None
    return Reuse(base, unchanged=sorted(k for k in keys if old.get(k) == keys[k]),
                 rebuilt=sorted(k for k in keys if old.get(k) != keys[k]),
                 removed=sorted(k for k in old if k not in keys))


def _location(manifest: dict, rel: str) -> str:
    return manifest["files"][rel].get("version") or manifest.get("sentences_version") or manifest["version"]


def reused_files(reuse: Reuse) -> dict[str, dict]:
    """The base's file entries of the unchanged datasets, each naming the version that holds the part."""
    m, keep = reuse.base.manifest, set(reuse.unchanged)
    out = {}
    for rel, info in m["files"].items():
        if dataset_name(*parse_sentence_rel(rel)) in keep:
            out[rel] = {**info, "version": _location(m, rel)}
    return out


def reused_counts(reuse: Reuse) -> dict[tuple[str, str], tuple[dict, FitStats]]:
    """(organism, dataset) -> (its counts entry, its fit statistics) from the base, for unchanged datasets."""
    m = reuse.base.manifest
    fits = Store(reuse.base.sentences_root).read_table("stats/inverse_transform.parquet").to_pylist()
    fit = {(r["organism"], r["dataset_id"]): FitStats(int(r["n_cells"]), float(r["n_points"]), r["sum_x"], r["sum_y"],
                                                       r["sum_xx"], r["sum_xy"], r["sum_yy"]) for r in fits}
    out = {}
    for name in reuse.unchanged:
        org, ds = name.split("/", 1)
        out[(org, ds)] = (m["counts"]["organisms"][org]["datasets"][ds], fit[(org, ds)])
    return out


def reused_token_cells(reuse: Reuse, organism: str, symbols: list[str]) -> np.ndarray:
    """Cells per token (of the new vocabulary `symbols`) in the unchanged datasets of `organism`: the base's
    vocabulary counts less the share of its datasets that are dropped or rebuilt."""
    m = reuse.base.manifest
    out = np.zeros(len(symbols), np.int64)
    if organism not in m["counts"]["organisms"]:
        return out
    root = Store(reuse.base.sentences_root)
    vocab = root.read_table(f"vocab/{organism}.parquet", columns=["gene_symbol", "n_cells"])
    counts = dict(zip(vocab["gene_symbol"].to_pylist(), vocab["n_cells"].to_numpy(), strict=True))
    keep = set(reuse.unchanged)
    for rel in m["files"]:
        org, ds = parse_sentence_rel(rel)
        if org != organism or dataset_name(org, ds) in keep:
            continue
        t = root.read_table(part_path(m, rel, gene_counts_rel(rel)))
        for sym, n in zip(t["gene_symbol"].to_pylist(), t["n_cells"].to_numpy(), strict=True):
            counts[sym] -= n
    index = {s: i for i, s in enumerate(symbols)}
    for sym, n in counts.items():
        if n < 0:
            raise RuntimeError(f"{reuse.base.root}: vocab/{organism} n_cells of {sym} is below its parts' counts")
        if n:
            if sym not in index:
                raise RuntimeError(f"{sym} is expressed in an unchanged dataset but not in the new vocabulary")
            out[index[sym]] = n
    return out
