"""Perturbation AnnData files (Perturb-seq style) as read for perturbation_prediction.

One obs column names each cell's perturbation; control cells carry a control label; combinations join genes
with a separator ("KLF1+MAP2K6"). An obs column `perturbation_type` (CRISPRi, CRISPRa, knockout, drug...),
when a file has one, is read as it is, per cell, for the prompts to name the kind of perturbation. Pass 1 reads obs only (`read_obs`); the later passes encode only the rows
asked for, block by block (`encode_rows`), with the sentences stage's Encoder. The task's pure logic is in
etl/tasks/perturbation.py, the passes and writes in etl/stages/perturbation.py.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from etl.sources.base import InputError, safe_name
from etl.sources.h5ad import (
    column_names,
    label_text,
    matrix_paths,
    open_h5ad,
    read_column,
    read_index,
    read_rows,
    unique_names,
)
from language.encode import Encoder, Vocabulary
from language.symbols import var_words


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
    kinds: list[str] | None = None  # the perturbation_type column, when the file has one


TYPE_COLUMN = "perturbation_type"  # read when present: the kind of each cell's perturbation


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
    with open_h5ad(path) as f:
        mpath, vpath = matrix_paths(opts.layer)
        if "obs" not in f or vpath not in f:
            raise InputError(f"{path}: not an AnnData file (no obs/var groups)")
        if mpath not in f:
            raise InputError(f"{path}: no matrix {mpath!r} (--perturbation-layer {opts.layer!r})")
        obs = f["obs"]
        cols = set(column_names(obs)) - {obs.attrs.get("_index")}
        if opts.column not in cols:
            raise InputError(f"{path}: obs has no column {opts.column!r} (--perturbation-column); "
                             f"obs columns: {sorted(cols)}")
        context = opts.context if opts.context is not None else (("cell_type",) if "cell_type" in cols else ())
        for c in context:
            if c not in cols:
                raise InputError(f"{path}: obs has no context column {c!r} (--perturbation-context); "
                                 f"obs columns: {sorted(cols)}")
        ids, _ = unique_names(read_index(obs, path), path)
        n = len(ids)
        raw = read_column(obs, opts.column, 0, n, path)
        controls = frozenset(opts.controls)
        genes = [parse_label(v, controls, opts.separator) for v in raw]
        if not any(g == () for g in genes):
            raise InputError(f"{path}: no cell has the control label(s) {sorted(controls)} in obs column "
                             f"{opts.column!r} (--control-label); most common labels: {_labels_hint(raw)}")
        if not any(genes):
            raise InputError(f"{path}: every labelled cell in obs column {opts.column!r} is a control "
                             f"({sorted(controls)}): no perturbed cell")
        ctx_cols = [label_text(read_column(obs, c, 0, n, path)) for c in context]
        contexts = list(zip(*ctx_cols, strict=True)) if ctx_cols else [()] * n
        cell_types = label_text(read_column(obs, "cell_type", 0, n, path)) if "cell_type" in cols else None
        kinds = label_text(read_column(obs, TYPE_COLUMN, 0, n, path)) if TYPE_COLUMN in cols else None
    return FileObs(path, safe_name(Path(path).stem), [str(x) for x in ids], genes, contexts, cell_types,
                   tuple(context), kinds)


def _encoder(f, vpath: str, opts: PerturbationOptions, seed: int, max_genes: int):
    var = f[vpath]
    ids = read_index(var, f.filename)
    names = (read_column(var, "feature_name", 0, len(ids), f.filename) if "feature_name" in column_names(var)
             else ids)
    words, _ = var_words(ids, names, uppercase=opts.uppercase, source=f"{f.filename} {vpath}")
    voc = Vocabulary.from_sources([([str(x) for x in ids], words)])
    enc = Encoder(voc.col_token(words), voc.symbols, seed=seed, max_genes=max_genes)
    return enc, voc.symbols.to_pylist()


def encode_rows(path: str, rows: np.ndarray, opts: PerturbationOptions, *, seed: int, max_genes: int,
                ) -> Iterator[tuple[np.ndarray, dict[int, list[str]]]]:
    """(rows of the block, row -> ranked genes cut to max_genes) for the given sorted rows, one block per
    window of --block-cells file rows that holds any; rows with no expressed gene (or invalid values) have
    no entry."""
    mpath, vpath = matrix_paths(opts.layer)
    rows = np.asarray(rows, np.int64)
    with open_h5ad(path) as f:
        enc, symbols = _encoder(f, vpath, opts, seed, max_genes)
        i = 0
        while i < len(rows):
            j = int(np.searchsorted(rows, rows[i] + opts.block_cells))
            want = rows[i:j]
            m = read_rows(f, mpath, int(want[0]), int(want[-1]) + 1)[want - want[0]]
            m.sort_indices()
            e = enc.encode(m.indptr, m.indices, m.data, want)
            yield want, {int(want[p]): [symbols[t] for t in e.tokens[e.offsets[k]:e.offsets[k + 1]]]
                         for k, p in enumerate(e.kept)}
            i = j
