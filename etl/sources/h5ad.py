"""User AnnData files (.h5ad) as a source.

Each file is one dataset (its id from --dataset-id, else the file name). Workers read only their row range:
the matrix through anndata's sparse_dataset (or an h5py slice when dense), the obs columns they need and
their rows of the obsm coordinates (if any), so memory stays flat however large the file. Paths must be
readable from the executors (local mode, or a shared file system on a cluster).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from etl.sources.base import (
    Block,
    InputError,
    SourcePlan,
    Task,
    VarTable,
    file_digest,
    safe_name,
    split_sorted,
)
from language.h5ad import (
    column_names,
    matrix_paths,
    matrix_shape,
    open_h5ad,
    probe_values,
    read_column,
    read_index,
    read_rows,
)
from language.organisms import normalise_organism
from language.symbols import var_words
from schemas import LABEL_COLUMNS, UNKNOWN

log = logging.getLogger(__name__)


def label_text(values: np.ndarray) -> list[str]:
    """Label values as strings; missing ones (None, NaN) are UNKNOWN, the marker every source uses."""
    return [UNKNOWN if v is None or (isinstance(v, float) and v != v) else str(v) for v in values]


def unique_names(names: np.ndarray, path: str) -> tuple[np.ndarray, dict[int, str]]:
    """Obs names made unique as anndata's obs_names_make_unique does ("name", "name-1", "name-2", ...):
    the names, and row -> new name for the rows renamed (logged and counted by the caller)."""
    import warnings

    import pandas as pd
    from anndata.utils import make_index_unique

    index = pd.Index(names)
    if index.is_unique:
        return names, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fixed = np.asarray(make_index_unique(index), dtype=object)
    renamed = {int(i): str(fixed[i]) for i in np.flatnonzero(fixed != names)}
    log.warning("%s: %d obs names are not unique; made unique as anndata's obs_names_make_unique does "
                "(e.g. %r -> %r); counted in the manifest (duplicate_obs_names)", path, len(renamed),
                str(names[next(iter(renamed))]), next(iter(renamed.values())))
    return fixed, renamed


def label_mapping(path: str, obs_columns: set[str], cell_type_column: str,
                  label_columns: dict[str, str]) -> dict[str, str | None]:
    """Output label -> obs column (None: filled with 'unknown'). Named columns must exist."""
    unknown = set(label_columns) - set(LABEL_COLUMNS)
    if unknown:
        raise InputError(f"--label-column names unknown field(s) {sorted(unknown)}; fields: {list(LABEL_COLUMNS)}")
    mapping: dict[str, str | None] = {}
    wanted = {**label_columns, "cell_type": cell_type_column}
    for field in LABEL_COLUMNS:
        col = wanted.get(field)
        if col is not None and col not in obs_columns:
            raise InputError(
                f"{path}: obs has no column {col!r} (asked for as {field}"
                + (", --cell-type-column" if field == "cell_type" else ", --label-column FIELD=COLUMN")
                + f"); obs columns: {sorted(obs_columns)}"
            )
        mapping[field] = col if col is not None else (field if field in obs_columns else None)
    return mapping


DEFAULT_SPATIAL_KEY = "spatial"


def spatial_element(f, path: str, key: str, n_obs: int) -> str | None:
    """The obsm key coordinates are read from, or None when the file has none (the default key absent).

    Why so strict: a wrong layout would give every cell wrong neighbours silently. AnnData writes numpy
    obsm arrays as a dense (n_obs, d) dataset; a dataframe or sparse obsm entry is refused by name.
    """
    obsm = f.get("obsm")
    if obsm is None or key not in obsm:
        if key != DEFAULT_SPATIAL_KEY:
            keys = sorted(obsm) if obsm is not None else []
            raise InputError(f"{path}: no obsm[{key!r}] (--spatial-key); obsm keys: {keys}")
        return None
    el = obsm[key]
    if hasattr(el, "keys"):
        enc = el.attrs.get("encoding-type", "a group")
        raise InputError(f"{path}: obsm[{key!r}] is stored as {enc}; coordinates must be a dense numeric "
                         f"array of shape ({n_obs}, 2 or more)")
    if el.ndim != 2 or el.shape[0] != n_obs or el.shape[1] < 2 or el.dtype.kind not in "iuf":
        raise InputError(f"{path}: obsm[{key!r}] has shape {el.shape} and dtype {el.dtype}; coordinates must "
                         f"be a numeric array of shape ({n_obs}, 2 or more)")
    return key


def _coordinates(f, key: str, lo: int, hi: int, sel: np.ndarray) -> tuple[pa.Array, pa.Array]:
    """Rows lo:hi of obsm[key][:, :2] (only those rows are read); non-finite rows become nulls."""
    xy = np.asarray(f["obsm"][key][lo:hi, :2], dtype=np.float64)[sel]
    bad = ~np.isfinite(xy).all(axis=1)
    return pa.array(xy[:, 0], pa.float64(), mask=bad), pa.array(xy[:, 1], pa.float64(), mask=bad)


def plan(
    paths: list[str],
    *,
    organism: str,
    dataset_ids: list[str] | None,
    cell_type_column: str,
    label_columns: dict[str, str],
    layer: str | None,
    max_cells: int | None,
    cells_per_task: int,
    seed: int,
    uppercase: bool,
    spatial_key: str = DEFAULT_SPATIAL_KEY,
) -> SourcePlan:
    organism = normalise_organism(organism)
    if dataset_ids and len(dataset_ids) != len(paths):
        raise InputError(f"{len(dataset_ids)} --dataset-id values for {len(paths)} --h5ad files")
    tasks: list[Task] = []
    vars_: dict[str, VarTable] = {}
    planned: dict[str, dict[str, int]] = {organism: {}}
    identities: dict[str, str] = {}
    files = []
    for k, path in enumerate(paths):
        path = str(Path(path).resolve())
        if not os.path.exists(path):
            raise InputError(f"h5ad file not found: {path!r}")
        dataset_id = safe_name(dataset_ids[k] if dataset_ids else Path(path).stem)
        if dataset_id in planned[organism]:
            raise InputError(f"two h5ad inputs share dataset id {dataset_id!r}; pass --dataset-id per file")
        mpath, vpath = matrix_paths(layer)
        with open_h5ad(path) as f:
            if mpath not in f:
                have = (["X"] if "X" in f else []) + (["raw"] if "raw" in f and "X" in f["raw"] else []) + \
                    sorted(f.get("layers", {}).keys())
                raise InputError(f"{path}: no matrix {mpath!r} (--h5ad-layer {layer!r}); the file has: "
                                 f"{', '.join(have) or 'none'}")
            if "obs" not in f or vpath not in f:
                raise InputError(f"{path}: not an AnnData file (no obs/var groups)")
            obs_cols = set(column_names(f["obs"]))
            mapping = label_mapping(path, obs_cols, cell_type_column, label_columns)
            obs_names = read_index(f["obs"], path)
            n_obs = len(obs_names)
            if n_obs == 0:
                raise InputError(f"{path}: obs is empty (0 cells); nothing to encode")
            obs_names, renamed = unique_names(obs_names, path)
            spatial = spatial_element(f, path, spatial_key, n_obs)
            var = f[vpath]
            ids = read_index(var, path)
            if len(ids) == 0:
                raise InputError(f"{path}: {vpath} is empty (0 genes); nothing to rank")
            names = read_column(var, "feature_name", 0, len(ids), path) if "feature_name" in column_names(var) else ids
            shape = matrix_shape(f[mpath])
            if shape != (n_obs, len(ids)):
                raise InputError(f"{path}: {mpath} has shape {shape}, but obs has {n_obs} rows and {vpath} "
                                 f"{len(ids)} (a damaged file, or --h5ad-layer names a matrix of another shape)")
            enc = f[mpath].attrs.get("encoding-type", "array")
            if enc == "csc_matrix":
                log.warning("%s: %s is CSC; row reads will be slow (rewrite it as CSR)", path, mpath)
            values = probe_values(f, mpath, n_obs, path, layer)
        words, symbol_counts = var_words(ids, names, uppercase=uppercase, source=f"{path} {vpath}")
        vars_[path] = VarTable(organism, [str(x) for x in ids], words, symbol_counts)
        rows = np.arange(n_obs, dtype=np.int64)
        sampled = bool(max_cells and n_obs > max_cells)
        if sampled:
            rows = np.sort(np.random.default_rng(seed).choice(n_obs, size=max_cells, replace=False))
        planned[organism][dataset_id] = len(rows)
        digest = file_digest(path)
        identities[f"{organism}/{dataset_id}"] = f"xxh3_128:{digest}"
        files.append({"path": path, "bytes": os.path.getsize(path), "mtime": os.path.getmtime(path), "xxh3_128": digest,
                      "dataset_id": dataset_id, "n_obs": n_obs, "labels": mapping, "spatial_key": spatial,
                      "duplicate_obs_names": len(renamed), "values": values})
        for i, chunk in enumerate(split_sorted(rows, cells_per_task)):
            lo, hi = int(chunk[0]), int(chunk[-1])
            tasks.append(Task(
                task_id=f"{organism}/{dataset_id}/{i:05d}", kind="h5ad", uri=path, organism=organism,
                dataset_id=dataset_id, index=i, lo=lo, hi=hi, n_cells=len(chunk),
                var_key=path, joinids=tuple(int(x) for x in chunk) if sampled else None,
                options={"layer": layer, "labels": mapping, "spatial_key": spatial,
                         "renamed": {r: n for r, n in renamed.items() if lo <= r <= hi}},
            ))  # fmt: skip
    desc = {"kind": "h5ad", "files": files, "organism": organism, "layer": layer or "X"}
    return SourcePlan(tasks=tasks, vars=vars_, description=desc, planned=planned, identities=identities)


def read_task(task: Task, *, block_size: int, **_: object) -> Iterator[Block]:
    """Whole-cell blocks of one task, in row order."""
    mpath, _ = matrix_paths(task.options.get("layer"))
    mapping: dict[str, str | None] = task.options["labels"]
    renamed: dict[int, str] = task.options.get("renamed") or {}
    with open_h5ad(task.uri) as f:
        obs = f["obs"]
        index_name = obs.attrs["_index"]
        for lo in range(task.lo, task.hi + 1, block_size):
            hi = min(lo + block_size, task.hi + 1)
            try:
                m = read_rows(f, mpath, lo, hi)
            except (OSError, KeyError, ValueError, TypeError) as e:
                raise InputError(f"{task.uri}: cannot read rows {lo}-{hi - 1} of {mpath} ({e}); the file may be "
                                 "truncated or damaged") from None
            rows = np.arange(lo, hi, dtype=np.int64)
            if task.joinids is not None:
                keep = np.asarray([j for j in task.joinids if lo <= j < hi], dtype=np.int64)
                if not len(keep):
                    continue
                m, rows = m[keep - lo], keep
            sel = rows - lo
            names = np.asarray([str(v) for v in read_column(obs, index_name, lo, hi, task.uri)[sel]], dtype=object)
            for r in (renamed and [r for r in rows.tolist() if r in renamed]):
                names[int(np.searchsorted(rows, r))] = renamed[r]
            cols: dict[str, pa.Array] = {"soma_joinid": pa.array(rows), "cell_id": pa.array(names, pa.string())}
            for field, col in mapping.items():
                if col is None:
                    cols[field] = pa.array([UNKNOWN] * len(rows), pa.string())
                else:
                    cols[field] = pa.array(label_text(read_column(obs, col, lo, hi, task.uri)[sel]), pa.string())
            cols["is_primary_data"] = pa.array(np.ones(len(rows), dtype=bool))
            if task.options.get("spatial_key"):
                cols["spatial_x"], cols["spatial_y"] = _coordinates(f, task.options["spatial_key"], lo, hi, sel)
            m.sort_indices()
            yield Block(obs=pa.table(cols), indptr=m.indptr, indices=m.indices, data=m.data, joinids=rows)
