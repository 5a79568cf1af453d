"""`to_sentences`: an AnnData (or .h5ad) as one cell sentence per cell, by the corpus builder's encoder
(language.cells, shared with `c2s annotate`): a sentence is byte for byte the one a build writes for the same
cell. Needs the `language` extra (numba, anndata), not the ETL's."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd

from language.cells import Cells, Ranker
from language.organisms import normalise_organism
from schemas.errors import ConfigError, InputError

__all__ = ["to_sentences"]

PathLike = str | os.PathLike
_BLOCK_CELLS = 4096  # cells encoded at once by to_sentences (memory scales with this, not with the AnnData)


# --------------------------------------------------------------------------------------------------
# to_sentences: an AnnData -> one cell sentence per cell, by the corpus builder's encoder
# --------------------------------------------------------------------------------------------------


def to_sentences(adata: Any, *, max_genes: int = 2048, layer: str | None = None, organism: str = "homo_sapiens",
                 seed: int = 0, uppercase: bool = True) -> pd.DataFrame:
    """One row per cell of `adata` (an AnnData, or the path of an .h5ad file, read backed): its cell sentence.

    The encoding is the corpus builder's (language/encode.py), so a cell gets exactly the sentence a build of the
    same file with the same `max_genes`, `seed` and `uppercase` writes: gene symbols (var `feature_name` if
    present, else var_names) in descending count, symbols shared by several features summed, ties broken by a
    generator seeded from (`seed`, row number). `layer`: the matrix to rank, None/"X", "raw" or a layer name;
    rank raw counts (normalised values order a cell's genes alike, but break ties differently and give the
    inverse-transform fit the wrong scale). `max_genes=0` keeps every expressed gene.

    Returns a pandas DataFrame indexed like `adata.obs` (so `adata.obs.join(df)` lines up), with columns
    `cell_sentence` (symbols joined by spaces), `genes` (the list), `n_expressed` (distinct expressed symbols
    before truncation), `raw_sum`, `organism`, and `skipped`: None, or why the cell has no sentence
    (no_expressed_genes, nan_or_inf, negative), as the builder counts skipped cells.
    """

    if isinstance(max_genes, bool) or not isinstance(max_genes, int) or max_genes < 0:
        raise ConfigError(f"to_sentences(max_genes={max_genes!r}): give an integer >= 0 (0 keeps every expressed "
                          "gene)")
    organism = normalise_organism(organism)
    if not isinstance(adata, str | os.PathLike) and not hasattr(adata, "obs_names"):
        raise InputError(f"to_sentences: expected an AnnData or an .h5ad path, got {type(adata).__name__}")
    cells = Cells(os.fspath(adata) if isinstance(adata, str | os.PathLike) else adata, layer)
    try:
        ranker = Ranker(cells, max_genes=max_genes, seed=seed, uppercase=uppercase)
        rows = list(ranker.sentences(np.arange(cells.n_obs, dtype=np.int64), _BLOCK_CELLS))
    finally:
        cells.close()
    genes = [r.genes or [] for r in rows]
    return pd.DataFrame({"cell_sentence": [" ".join(g) for g in genes], "genes": genes,
                         "n_expressed": np.asarray([r.n_expressed for r in rows], np.int32),
                         "raw_sum": np.asarray([r.raw_sum for r in rows], np.float64), "organism": organism,
                         "skipped": [r.skipped for r in rows]}, index=pd.Index(cells.obs_names, dtype=object))
