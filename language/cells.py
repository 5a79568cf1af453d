"""A user's own cells as sentences: the counts rows of an .h5ad file (read in blocks by the one h5ad reader)
or of an in-memory AnnData, ranked by the corpus builder's encoder, so `c2s.to_sentences` and `c2s annotate`
give a cell exactly the sentence a build of the same file with the same options writes."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from language import h5ad
from language.encode import SKIP_REASONS, Encoder, Vocabulary
from language.symbols import var_words
from schemas.errors import InputError


class Cells:
    """The counts matrix (X, raw or a layer) of an .h5ad file, read in row blocks by the corpus builder's h5ad
    reader, or of an in-memory AnnData; with its var words (the builder's symbol rule)."""

    def __init__(self, source: Any, layer: str | None = None):
        self._file = None
        if isinstance(source, str | os.PathLike):
            self._open_file(os.fspath(source), layer)
        else:
            self._use_anndata(source, layer)

    def _open_file(self, path: str, layer: str | None) -> None:
        if not os.path.isfile(path):
            raise InputError(f"{path}: file not found (give an .h5ad file)")
        self.where = path
        f = self._file = h5ad.open_h5ad(path)
        try:
            mpath, vpath = h5ad.matrix_paths(layer)
            have = (["X"] if "X" in f else []) + (["raw"] if "raw" in f and "X" in f["raw"] else []) \
                + sorted(f.get("layers", {}).keys())
            if mpath not in f:
                raise InputError(f"{path}: no matrix {mpath!r} (--layer {layer!r}); the file has: "
                                    f"{', '.join(have) or 'none'}")
            if "obs" not in f or vpath not in f:
                raise InputError(f"{path}: not an AnnData file (no obs/var groups)")
            self.obs_names = np.asarray([str(x) for x in h5ad.read_index(f["obs"], path)], dtype=object)
            var = f[vpath]
            self.ids = [str(x) for x in h5ad.read_index(var, path)]
            names = h5ad.read_column(var, "feature_name", 0, len(self.ids), path) \
                if "feature_name" in h5ad.column_names(var) else self.ids
            self.names = list(names)
            el = f[mpath]
            shape = tuple(int(x) for x in (el.attrs.get("shape", (-1, -1)) if hasattr(el, "keys") else el.shape))
            if shape != (len(self.obs_names), len(self.ids)):
                raise InputError(f"{path}: {mpath} has shape {shape}, but obs has {len(self.obs_names)} rows and "
                                    f"{vpath} {len(self.ids)}")
            if not len(self.obs_names) or not self.ids:
                raise InputError(f"{path}: {len(self.obs_names)} cells and {len(self.ids)} genes; nothing to rank")
            h5ad.probe_values(f, mpath, len(self.obs_names), path, layer)  # refuses scaled data, warns on normalised
        except KeyError as e:
            self.close()
            raise InputError(f"{path}: not a readable AnnData file (missing {e})") from None
        except BaseException:
            self.close()
            raise
        self._read = lambda lo, hi: h5ad.read_rows(f, mpath, lo, hi)
        self.matrix = f"{mpath}"

    def _use_anndata(self, adata: Any, layer: str | None) -> None:
        if not (hasattr(adata, "obs_names") and hasattr(adata, "var_names") and hasattr(adata, "layers")):
            raise InputError(f"expected an AnnData or an .h5ad path, got {type(adata).__name__}")
        self.where = "AnnData"
        have = ["X", *(["raw"] if adata.raw is not None else []), *adata.layers.keys()]
        if layer in (None, "", "X"):
            matrix, var = adata.X, adata.var
        elif layer == "raw" and adata.raw is not None:
            matrix, var = adata.raw.X, adata.raw.var
        elif layer in adata.layers:
            matrix, var = adata.layers[layer], adata.var
        else:
            raise InputError(f"AnnData: no matrix {layer!r}; it has: {', '.join(have)}")
        if matrix is None or adata.n_obs == 0 or var.shape[0] == 0:
            raise InputError(f"AnnData: {adata.n_obs} cells and {var.shape[0]} genes; nothing to rank")
        self.obs_names = np.asarray([str(x) for x in adata.obs_names], dtype=object)
        self.ids = [str(x) for x in var.index]
        self.names = ([None if pd.isna(v) else v for v in var["feature_name"].astype(object)]
                      if "feature_name" in var.columns else self.ids)
        self._read = lambda lo, hi: matrix[lo:hi]
        self.matrix = layer or "X"

    @property
    def n_obs(self) -> int:
        return len(self.obs_names)

    def rows(self, lo: int, hi: int):
        """Rows lo:hi as a CSR matrix with sorted indices (what the builder hands the encoder)."""
        try:
            m = self._read(lo, hi)
            m = sp.csr_matrix(m) if sp.issparse(m) else sp.csr_matrix(np.asarray(m))
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise InputError(f"{self.where}: cannot read rows {lo}-{hi - 1} of {self.matrix} as numbers ({e}); "
                                "the file may be truncated or damaged") from None
        if m.dtype.kind not in "biuf":
            raise InputError(f"{self.where}: {self.matrix} holds {m.dtype}, not numbers")
        m.sort_indices()
        return m

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class Sentence:
    position: int  # index among the annotated rows
    row: int  # row in the file
    genes: list[str] | None  # None: the encoder skipped the cell
    skipped: str | None = None  # why: no_expressed_genes, nan_or_inf, negative
    n_expressed: int = 0  # distinct expressed symbols before the cap
    raw_sum: float = math.nan


class Ranker:
    """Cell sentences of a Cells' rows with the corpus builder's encoder: the sentence a build of the same file
    with the same options writes for the cell (same symbols, cap, case and tie-break by row number)."""

    def __init__(self, cells: Cells, *, max_genes: int, seed: int, uppercase: bool):
        self.cells = cells
        self.words, _ = var_words(cells.ids, cells.names, uppercase=uppercase, source=f"{cells.where} var")
        vocab = Vocabulary.from_sources([(cells.ids, self.words)])
        self.encoder = Encoder(vocab.col_token(self.words), vocab.symbols, seed=seed, max_genes=max_genes)
        self.symbols = np.asarray(vocab.symbols.to_pylist(), dtype=object)

    def sentences(self, rows: np.ndarray, block_cells: int) -> Iterator[Sentence]:
        pos = 0
        for chunk in _chunks(rows, block_cells):
            lo, hi = int(chunk[0]), int(chunk[-1]) + 1
            m = self.cells.rows(lo, hi)
            if len(chunk) != hi - lo:
                m = m[chunk - lo]
                m.sort_indices()
            enc = self.encoder.encode(m.indptr, m.indices, m.data, np.asarray(chunk, np.int64))
            genes: dict[int, list[str]] = {}
            for k, r in enumerate(enc.kept.tolist()):
                genes[r] = self.symbols[enc.tokens[enc.offsets[k]:enc.offsets[k + 1]]].tolist()
            expressed = dict(zip(enc.kept.tolist(), enc.n_expressed.tolist(), strict=True))
            sums = dict(zip(enc.kept.tolist(), enc.raw_sum.tolist(), strict=True))
            for k, row in enumerate(chunk.tolist()):
                status = int(enc.status[k])
                yield Sentence(pos, row, genes.get(k), SKIP_REASONS[status - 1] if status else None,
                               expressed.get(k, 0), sums.get(k, math.nan))
                pos += 1


def _chunks(rows: np.ndarray, block: int) -> Iterator[np.ndarray]:
    """Runs of sorted rows spanning at most `block` rows of the file each (a read never holds more)."""
    start = 0
    n = len(rows)
    while start < n:
        stop = int(np.searchsorted(rows, rows[start] + block, side="left"))
        yield rows[start:max(stop, start + 1)]
        start = max(stop, start + 1)
