"""Reading .h5ad files in row blocks, without loading them: the one reader of AnnData files that both the
corpus builder (its h5ad source) and the model side (a user's cells to annotate or to rank) use, so a cell
gets the same numbers, names and refusals on either side. It needs h5py, anndata and scipy (the `language`
extra), imported when a file is read: importing the module needs none of them.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import numpy as np

from schemas.errors import InputError
from schemas.extras import require

if TYPE_CHECKING:
    import scipy.sparse as sp

log = logging.getLogger(__name__)


def open_h5ad(path: str):
    if os.path.isdir(path):
        raise InputError(f"cannot read h5ad {path!r}: a directory; give the .h5ad files (--h5ad a.h5ad --h5ad b.h5ad)")
    try:
        return require("h5py", "reading .h5ad files").File(path, "r")
    except (OSError, FileNotFoundError) as e:
        text = str(e).splitlines()[0]
        why = "not an HDF5 file (an .h5ad is HDF5; is this a .loom, .zarr, .csv or a truncated download?)" \
            if "signature" in text else text
        raise InputError(f"cannot read h5ad {path!r}: {why}") from e


def matrix_paths(layer: str | None) -> tuple[str, str]:
    """(matrix element, var element) inside the file for X, raw or a layer."""
    if layer in (None, "", "X"):
        return "X", "var"
    if layer == "raw":
        return "raw/X", "raw/var"
    return f"layers/{layer}", "var"


def _text(values: np.ndarray, where: str) -> np.ndarray:
    """Byte strings decoded as UTF-8 (an InputError naming `where` when they are not)."""
    if values.dtype.kind not in "SO":
        return values
    try:
        return np.asarray([v.decode() if isinstance(v, bytes) else v for v in values], dtype=object)
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: holds bytes that are not UTF-8 text ({e.reason} at byte {e.start} of "
                         f"{e.object[:40]!r}); re-save the file with text in UTF-8") from None


def read_index(group, path: str = "") -> np.ndarray:
    return np.asarray(read_column(group, group.attrs["_index"], 0, None, path), dtype=object)


def read_column(group, name: str, lo: int, hi: int | None, path: str = "") -> np.ndarray:
    """Rows lo:hi of one obs/var column (categorical, nullable, string or numeric), without reading the rest;
    missing values (a -1 category code, a masked nullable value) are None."""
    el = group[name]
    where = f"{path} {group.name}/{name}"
    if hasattr(el, "keys"):
        enc = el.attrs.get("encoding-type", "a group")
        if "codes" in el and "categories" in el:  # categorical
            codes = el["codes"][lo:hi]
            try:
                cats = np.asarray(require("anndata.io", "reading .h5ad files").read_elem(el["categories"]),
                                  dtype=object)
            except UnicodeDecodeError as e:
                raise InputError(f"{where}: categories hold bytes that are not UTF-8 text ({e.reason}); re-save "
                                 "the file with text in UTF-8") from None
            out = np.empty(len(codes), dtype=object)
            ok = codes >= 0
            out[ok] = _text(cats, where)[codes[ok]]
            out[~ok] = None
            return out
        if "values" in el and "mask" in el:  # nullable-integer, nullable-boolean, nullable-string-array
            out = _text(np.asarray(el["values"][lo:hi]), where).astype(object)
            out[np.asarray(el["mask"][lo:hi], bool)] = None
            return out
        raise InputError(f"{where}: stored as {enc!r}, which is not a column this reader knows (categorical, "
                         "nullable, string or numeric)")
    return _text(el[lo:hi], where)


def column_names(group) -> list[str]:
    return [k for k in group if not k.startswith("__")] + list(group.attrs.get("column-order", []))


def matrix_shape(el) -> tuple[int, ...]:
    if hasattr(el, "keys"):
        return tuple(int(x) for x in el.attrs.get("shape", (-1, -1)))
    return tuple(int(x) for x in el.shape)


PROBE_CELLS = 500  # rows of the matrix looked at on the driver to tell raw counts from normalised data


def probe_values(f, mpath: str, n_obs: int, path: str, layer: str | None) -> str:
    """What the first cells' values look like: "counts" (non-negative integers), or "non-integer" (warned:
    normalised data rank the same but the inverse-transform fit assumes counts). Mostly negative values
    (scaled, z-scored data) are refused: every cell would be skipped as invalid."""
    m = read_rows(f, mpath, 0, min(n_obs, PROBE_CELLS))
    d = np.asarray(m.data, np.float64)
    d = d[np.isfinite(d) & (d != 0)]
    if not len(d):
        return "counts"
    # the matrices other than the one in use (suggesting the one that was just tried helps nobody)
    others = sorted((({"raw"} if "raw" in f and "X" in f["raw"] else set()) | set(f.get("layers", {}).keys()))
                    - {layer or "X"})
    hint = (f"the file also has: {', '.join(others)}; pass --h5ad-layer NAME for the raw counts" if others
            else "this file holds no other matrix: rank the raw counts from the file that holds them (e.g. the "
                 "filtered_feature_bc_matrix.h5 of Cell Ranger)")
    n_neg = int((d < 0).sum())
    neg = n_neg / len(d)
    if n_neg >= 20 and neg >= 0.05:  # a few stray negatives are per-cell skips; this many is a scaled matrix
        what = mpath if layer in (None, "", "X") else f"{mpath} (--h5ad-layer {layer})"
        raise InputError(f"{path}: {what} holds negative values ({neg:.0%} of the nonzero entries "
                         f"of the first {min(n_obs, PROBE_CELLS)} cells, e.g. {d[d < 0][0]:.3g}): it looks scaled "
                         f"(z-scored), not raw counts; {hint}")
    frac = d != np.round(d)
    if frac.any():
        log.warning("%s: %s holds non-integer values (e.g. %.4g in %.0f%% of the first cells' entries): it looks "
                    "normalised, not raw counts. Ranks within a cell are the same, but the inverse-transform fit "
                    "(expression from rank) assumes counts; %s", path, mpath, float(d[frac][0]),
                    100 * float(frac.mean()), hint)
        return "non-integer"
    return "counts"


def read_rows(f, mpath: str, lo: int, hi: int) -> sp.csr_matrix:
    el = f[mpath]
    sparse = require("scipy.sparse", "reading .h5ad files")
    if hasattr(el, "keys"):
        return sparse.csr_matrix(require("anndata.io", "reading .h5ad files").sparse_dataset(el)[lo:hi])
    return sparse.csr_matrix(el[lo:hi])


def obs_values(paths: list[str], column: str, names: set[str]) -> dict[str, str]:
    """obs name -> the value of `column`, for the cells named, over the files that exist and have the column."""
    out: dict[str, str] = {}
    for path in paths:
        if not os.path.exists(path):
            continue
        with open_h5ad(path) as f:
            obs = f["obs"]
            if column not in column_names(obs):
                continue
            index, values = read_index(obs, path), read_column(obs, column, 0, None, path)
            out.update({str(n): str(v) for n, v in zip(index, values, strict=True) if str(n) in names})
    return out
