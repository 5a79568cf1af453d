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
import scipy.sparse as sp

from etl.encode import var_words
from etl.sources.base import (
    Block,
    InputError,
    SourcePlan,
    Task,
    VarTable,
    normalise_organism,
    safe_name,
    split_sorted,
)
from schemas import LABEL_COLUMNS, UNKNOWN

log = logging.getLogger(__name__)


def _open(path: str):
    import h5py

    try:
        return h5py.File(path, "r")
    except (OSError, FileNotFoundError) as e:
        raise InputError(f"cannot read h5ad {path!r}: {e}") from e


def _matrix_paths(layer: str | None) -> tuple[str, str]:
    """(matrix element, var element) inside the file for X, raw or a layer."""
    if layer in (None, "", "X"):
        return "X", "var"
    if layer == "raw":
        return "raw/X", "raw/var"
    return f"layers/{layer}", "var"


def _index(group) -> np.ndarray:
    from anndata.io import read_elem

    return np.asarray(read_elem(group[group.attrs["_index"]]), dtype=object)


def _column(group, name: str, lo: int, hi: int) -> np.ndarray:
    """Rows lo:hi of one obs/var column (categorical, string or numeric), without reading the rest."""
    from anndata.io import read_elem

    el = group[name]
    if hasattr(el, "keys"):  # categorical group: codes + categories
        codes = el["codes"][lo:hi]
        cats = np.asarray(read_elem(el["categories"]), dtype=object)
        out = np.empty(len(codes), dtype=object)
        ok = codes >= 0
        out[ok] = cats[codes[ok]]
        out[~ok] = None
        return out
    values = el[lo:hi]
    if values.dtype.kind in "SO":
        values = np.asarray([v.decode() if isinstance(v, bytes) else v for v in values], dtype=object)
    return values


def _columns(group) -> list[str]:
    return [k for k in group if not k.startswith("__")] + list(group.attrs.get("column-order", []))


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
                f"{path}: obs has no column {col!r} (asked for as {field}); obs columns: {sorted(obs_columns)}"
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
    files = []
    for k, path in enumerate(paths):
        path = str(Path(path).resolve())
        if not os.path.exists(path):
            raise InputError(f"h5ad file not found: {path!r}")
        dataset_id = safe_name(dataset_ids[k] if dataset_ids else Path(path).stem)
        if dataset_id in planned[organism]:
            raise InputError(f"two h5ad inputs share dataset id {dataset_id!r}; pass --dataset-id per file")
        mpath, vpath = _matrix_paths(layer)
        with _open(path) as f:
            if mpath not in f:
                raise InputError(f"{path}: no matrix {mpath!r} (--h5ad-layer {layer!r})")
            if "obs" not in f or vpath not in f:
                raise InputError(f"{path}: not an AnnData file (no obs/var groups)")
            obs_cols = set(_columns(f["obs"]))
            mapping = label_mapping(path, obs_cols, cell_type_column, label_columns)
            n_obs = len(_index(f["obs"]))
            spatial = spatial_element(f, path, spatial_key, n_obs)
            var = f[vpath]
            ids = _index(var)
            names = _column(var, "feature_name", 0, len(ids)) if "feature_name" in _columns(var) else ids
            enc = f[mpath].attrs.get("encoding-type", "array")
            if enc == "csc_matrix":
                log.warning("%s: %s is CSC; row reads will be slow (rewrite it as CSR)", path, mpath)
        words, missing = var_words(ids, names, uppercase=uppercase)
        vars_[path] = VarTable(organism, [str(x) for x in ids], words, missing)
        rows = np.arange(n_obs, dtype=np.int64)
        sampled = bool(max_cells and n_obs > max_cells)
        if sampled:
            rows = np.sort(np.random.default_rng(seed).choice(n_obs, size=max_cells, replace=False))
        planned[organism][dataset_id] = len(rows)
        files.append({"path": path, "bytes": os.path.getsize(path), "mtime": os.path.getmtime(path),
                      "dataset_id": dataset_id, "n_obs": n_obs, "labels": mapping, "spatial_key": spatial})
        for i, chunk in enumerate(split_sorted(rows, cells_per_task)):
            tasks.append(Task(
                task_id=f"{organism}/{dataset_id}/{i:05d}", kind="h5ad", uri=path, organism=organism,
                dataset_id=dataset_id, index=i, lo=int(chunk[0]), hi=int(chunk[-1]), n_cells=len(chunk),
                var_key=path, joinids=tuple(int(x) for x in chunk) if sampled else None,
                options={"layer": layer, "labels": mapping, "spatial_key": spatial},
            ))  # fmt: skip
    desc = {"kind": "h5ad", "files": files, "organism": organism, "layer": layer or "X"}
    return SourcePlan(tasks=tasks, vars=vars_, description=desc, planned=planned)


def _rows(f, mpath: str, lo: int, hi: int) -> sp.csr_matrix:
    from anndata.io import sparse_dataset

    el = f[mpath]
    if hasattr(el, "keys"):
        return sp.csr_matrix(sparse_dataset(el)[lo:hi])
    return sp.csr_matrix(el[lo:hi])


def read_task(task: Task, *, block_size: int, **_: object) -> Iterator[Block]:
    """Whole-cell blocks of one task, in row order."""
    mpath, _ = _matrix_paths(task.options.get("layer"))
    mapping: dict[str, str | None] = task.options["labels"]
    with _open(task.uri) as f:
        obs = f["obs"]
        index_name = obs.attrs["_index"]
        for lo in range(task.lo, task.hi + 1, block_size):
            hi = min(lo + block_size, task.hi + 1)
            m = _rows(f, mpath, lo, hi)
            rows = np.arange(lo, hi, dtype=np.int64)
            if task.joinids is not None:
                keep = np.asarray([j for j in task.joinids if lo <= j < hi], dtype=np.int64)
                if not len(keep):
                    continue
                m, rows = m[keep - lo], keep
            sel = rows - lo
            cols: dict[str, pa.Array] = {
                "soma_joinid": pa.array(rows),
                "cell_id": pa.array(_column(obs, index_name, lo, hi)[sel].astype(str), pa.string()),
            }
            for field, col in mapping.items():
                if col is None:
                    cols[field] = pa.array([UNKNOWN] * len(rows), pa.string())
                else:
                    v = _column(obs, col, lo, hi)[sel]
                    cols[field] = pa.array([UNKNOWN if x is None else str(x) for x in v], pa.string())
            cols["is_primary_data"] = pa.array(np.ones(len(rows), dtype=bool))
            if task.options.get("spatial_key"):
                cols["spatial_x"], cols["spatial_y"] = _coordinates(f, task.options["spatial_key"], lo, hi, sel)
            m.sort_indices()
            yield Block(obs=pa.table(cols), indptr=m.indptr, indices=m.indices, data=m.data, joinids=rows)
