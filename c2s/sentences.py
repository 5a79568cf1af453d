"""Cells to sentences and prompts, as the corpus builder writes them: `to_sentences` encodes an AnnData with
the builder's encoder (a sentence is byte for byte the one a build writes for the same cell) and
`render_prompt` fills a task's prompt with `language.prompts.prompt_for`, the builder's own renderer. Needs the
`language` extra (numba, anndata), not the ETL's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from language.budget import TokenBudget, genes_cap, load_tokenizer_json
from language.encode import SKIP_REASONS, Encoder, Vocabulary
from language.organisms import normalise_organism
from language.prompts import cell_type_list, cell_values, perturbation_words, prompt_for
from language.symbols import var_words
from schemas import UNKNOWN
from schemas.errors import ConfigError, InputError
from schemas.tasks import TASKS

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["render_prompt", "to_sentences"]

PathLike = str | os.PathLike
_BLOCK_CELLS = 4096  # cells encoded at once by to_sentences (memory scales with this, not with the AnnData)


# --------------------------------------------------------------------------------------------------
# to_sentences: an AnnData -> one cell sentence per cell, by the corpus builder's encoder
# --------------------------------------------------------------------------------------------------


def to_sentences(adata: Any, *, max_genes: int = 2048, layer: str | None = None, organism: str = "homo_sapiens",
                 seed: int = 0, uppercase: bool = True) -> pd.DataFrame:
    """One row per cell of `adata` (an AnnData, or the path of an .h5ad file, read backed): its cell sentence.

    The encoding is the corpus builder's (etl/encode.py), so a cell gets exactly the sentence a build of the
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
    if not isinstance(adata, str | os.PathLike):
        return _encode_anndata(adata, max_genes, layer, organism, seed, uppercase)
    adata = _read_h5ad(os.fspath(adata))
    try:
        return _encode_anndata(adata, max_genes, layer, organism, seed, uppercase)
    finally:
        adata.file.close()


def _encode_anndata(adata: Any, max_genes: int, layer: str | None, organism: str, seed: int,
                    uppercase: bool) -> pd.DataFrame:
    import numpy as np
    import pandas as pd


    if not (hasattr(adata, "obs_names") and hasattr(adata, "var_names") and hasattr(adata, "layers")):
        raise InputError(f"to_sentences: expected an AnnData or an .h5ad path, got {type(adata).__name__}")
    matrix, var = _matrix(adata, layer)
    ids = [str(x) for x in var.index]
    names = ([None if pd.isna(v) else v for v in var["feature_name"].astype(object)]
             if "feature_name" in var.columns else ids)
    words, _ = var_words(ids, names, uppercase=uppercase, source="to_sentences: adata var")
    vocab = Vocabulary.from_sources([(ids, words)])
    encoder = Encoder(vocab.col_token(words), vocab.symbols, seed=seed, max_genes=max_genes)
    symbols = np.asarray(vocab.symbols.to_pylist(), dtype=object)

    n = adata.n_obs
    genes: list[list[str]] = [[] for _ in range(n)]
    n_expressed = np.zeros(n, np.int32)
    raw_sum = np.full(n, np.nan)
    skipped: list[str | None] = [None] * n
    for lo in range(0, n, _BLOCK_CELLS):
        hi = min(lo + _BLOCK_CELLS, n)
        m = _csr_rows(matrix, lo, hi, layer)
        enc = encoder.encode(m.indptr, m.indices, m.data, np.arange(lo, hi, dtype=np.int64))
        for k, row in enumerate(enc.kept.tolist()):
            genes[lo + row] = symbols[enc.tokens[enc.offsets[k]:enc.offsets[k + 1]]].tolist()
        n_expressed[lo + enc.kept] = enc.n_expressed
        raw_sum[lo + enc.kept] = enc.raw_sum
        for row in np.flatnonzero(enc.status).tolist():
            skipped[lo + row] = SKIP_REASONS[int(enc.status[row]) - 1]
    return pd.DataFrame({"cell_sentence": [" ".join(g) for g in genes], "genes": genes,
                         "n_expressed": n_expressed, "raw_sum": raw_sum, "organism": organism,
                         "skipped": skipped}, index=adata.obs_names.copy())


def _read_h5ad(path: str):
    import anndata

    if not os.path.isfile(path):
        raise InputError(f"to_sentences: h5ad file not found: {path!r}")
    try:
        return anndata.read_h5ad(path, backed="r")
    except OSError as e:
        raise InputError(f"to_sentences: cannot read h5ad {path!r}: {str(e).splitlines()[0]}") from None


def _matrix(adata: Any, layer: str | None) -> tuple[Any, Any]:
    """(matrix, var) for X, raw or a layer: the same names as BuildConfig.h5ad_layer."""
    have = ["X", *(["raw"] if adata.raw is not None else []), *adata.layers.keys()]
    if layer in (None, "", "X"):
        matrix, var = adata.X, adata.var
    elif layer == "raw":
        if adata.raw is None:
            raise InputError(f"to_sentences(layer='raw'): the AnnData has no .raw; it has: {', '.join(have)}")
        matrix, var = adata.raw.X, adata.raw.var
    elif layer in adata.layers:
        matrix, var = adata.layers[layer], adata.var
    else:
        raise InputError(f"to_sentences(layer={layer!r}): no such layer; the AnnData has: {', '.join(have)}")
    if matrix is None:
        raise InputError(f"to_sentences(layer={layer!r}): the matrix is empty (None); the AnnData has: "
                         f"{', '.join(have)}")
    if adata.n_obs == 0 or var.shape[0] == 0:
        raise InputError(f"to_sentences: the AnnData has {adata.n_obs} cells and {var.shape[0]} genes; nothing "
                         "to rank")
    return matrix, var


def _csr_rows(matrix: Any, lo: int, hi: int, layer: str | None):
    """Rows lo:hi as a CSR matrix with sorted indices (what the builder's h5ad reader hands the encoder)."""
    import numpy as np
    import scipy.sparse as sp

    try:
        m = matrix[lo:hi]
        m = sp.csr_matrix(m) if sp.issparse(m) else sp.csr_matrix(np.asarray(m))
    except (TypeError, ValueError) as e:
        raise InputError(f"to_sentences(layer={layer!r}): cannot read rows {lo}-{hi - 1} as a numeric matrix "
                         f"({e})") from None
    if m.dtype.kind not in "biuf":
        raise InputError(f"to_sentences(layer={layer!r}): the matrix holds {m.dtype}, not numbers")
    m.sort_indices()
    return m


# --------------------------------------------------------------------------------------------------
# render_prompt: a task's template for a cell, by the builder's rendering code
# --------------------------------------------------------------------------------------------------


def render_prompt(task: str, cell: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None, *,
                  template: int = 0, max_tokens: int = 1024, tokenizer: str | None = None,
                  **values: Any) -> tuple[str, str]:
    """(prompt, completion) of `task` for a cell, filled by the corpus builder's templates and budget.

    `cell`: a dict with the cell's `genes` (symbols, most expressed first; or a `cell_sentence` string) and
    its labels (organism, cell_type, tissue, disease, sex, development_stage, assay; missing ones read
    'unknown', organism 'homo_sapiens'), such as a row of `to_sentences` or of the sentences table; a list
    of such dicts for the multi-cell tasks; None for the gene-set tasks. `values` fill the other fields a
    template names (pairs=..., abstract=..., gene_set=..., genes=..., perturbation=...,
    perturbed_sentence=...). `template` picks one of the task's prompt wordings; the genes are cut to fit
    `max_tokens` as the build cuts them (3.3 tokens per gene, or exact counts with a `tokenizer`).
    Use it to ask a trained model about a new cell in the words it was trained on.
    """

    where = f"render_prompt({task!r})"
    if task not in TASKS:
        raise ConfigError(f"{where}: unknown task; tasks: {', '.join(TASKS)}")
    cells = [] if cell is None else [cell] if isinstance(cell, Mapping) else list(cell)
    records = [_cell_record(c, i, where) for i, c in enumerate(cells)]
    if not records and TASKS[task].family != "knowledge":
        raise InputError(f"{where}: the task is about cells; pass cell={{'genes': [...], 'cell_type': ...}} (or a "
                         "list of such dicts)")
    if isinstance(template, bool) or not isinstance(template, int) or template < 0:
        raise ConfigError(f"{where}: template={template!r}; give a template number >= 0")
    fields: dict[str, Any] = {}
    if records:
        fields = {**cell_values(records[0]), "num_cells": len(records), "cell_types": cell_type_list(records)}
    if task == "perturbation_prediction" and "the_perturbation" not in values:  # named as the builder names it
        target = values.pop("perturbation", None)
        if not target:
            raise InputError(f"{where}: pass perturbation='KLF1' (or a list of genes for a combination), and "
                             "perturbation_type='CRISPRi' (CRISPRa, knockout, drug, ...) if known")
        targets = [target] if isinstance(target, str) else [str(t) for t in target]
        values = {**values, **perturbation_words(targets, values.pop("perturbation_type", None))}
    fields.update(values)
    budget = TokenBudget(max_tokens=max_tokens,
                         tokenizer_json=load_tokenizer_json(tokenizer) if tokenizer else None)
    try:
        out = prompt_for(task, fields, [r["genes"] for r in records] or None, budget, template=template,
                         max_genes=genes_cap(budget))
    except KeyError as e:
        raise InputError(f"{where}: the template needs a value for {{{e.args[0]}}}; pass {e.args[0]}=...") from None
    if out is None:
        raise InputError(f"{where}: the prompt does not fit max_tokens={max_tokens} even with few genes; raise "
                         "max_tokens or shorten the other values")
    return out.prompt, out.completion


def _cell_record(cell: Mapping[str, Any], i: int, where: str) -> dict[str, Any]:
    """A cell dict as the builders see one: labels (defaults 'unknown') and `genes` as a list of str."""

    if not isinstance(cell, Mapping):
        raise InputError(f"{where}: cell {i + 1} is a {type(cell).__name__}; give a dict (e.g. a row of "
                         "to_sentences(...).to_dict('records'))")
    genes = cell.get("genes")
    if genes is None and isinstance(cell.get("cell_sentence"), str):
        genes = cell["cell_sentence"].strip().rstrip(".").split()
    if genes is None or isinstance(genes, str):
        raise InputError(f"{where}: cell {i + 1} has no 'genes' (a list of gene symbols, most expressed first) "
                         "or 'cell_sentence' (a string)")
    record = {k: UNKNOWN for k in ("cell_type", "tissue", "disease", "sex", "development_stage", "assay")}
    record.update({k: str(v) for k, v in cell.items() if k in record and v is not None})
    record["organism"] = str(cell.get("organism") or "homo_sapiens")
    record["genes"] = [str(g) for g in genes]
    return record
