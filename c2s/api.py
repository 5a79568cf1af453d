"""The Python API: build a corpus, read it, load a task for training, render a prompt, encode an AnnData.

Thin wrappers over the code the command-line tools run (etl/ and training/ stay the only implementations):
a sentence from `to_sentences` is byte for byte the one the corpus builder writes for the same cell, and a
prompt from `render_prompt` is filled by the builder's own templates. Heavy dependencies (numba, anndata,
datasets, pyspark) are imported inside the functions that need them, so a training-only install can read a
corpus without the ETL's packages. Errors a caller can fix are `schemas.errors.InputError` (`ConfigError`
for a bad option) with a one-line message naming the input.

See docs/API.md for the reference and docs/TUTORIAL.md for a walk-through.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from schemas.errors import ConfigError, InputError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["build_corpus", "load_corpus", "read_table", "render_prompt", "to_sentences"]

PathLike = str | os.PathLike
_BLOCK_CELLS = 4096  # cells encoded at once by to_sentences (memory scales with this, not with the AnnData)
_SAMPLE_SPLITS = {"train": "train", "val": "val", "validation": "val", "test": "test", "test_ood": "test_ood"}


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
    from etl.sources.base import normalise_organism

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

    from etl.encode import SKIP_REASONS, Encoder, Vocabulary
    from etl.symbols import var_words

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
# build_corpus: BuildConfig + etl.pipeline.build, in this process or on local Spark
# --------------------------------------------------------------------------------------------------


def build_corpus(output_dir: PathLike, *, h5ad: PathLike | Sequence[PathLike] | None = None,
                 census_uri: str | None = None, demo: bool = False, spark: bool = False,
                 demo_dir: PathLike | None = None, demo_cells: int = 3000, **options: Any) -> dict:
    """Build (or update) the corpus at `output_dir` and return the manifest readers now see.

    One source: `h5ad` (one AnnData file or a list), `census_uri` (a Census-shaped SOMA collection),
    `census_version=` (the CELLxGENE Census; needs network), or `demo=True`: a generated Census-shaped
    collection of `demo_cells` cells, with the demo knowledge files and a synthetic Perturb-seq file, written
    to `demo_dir` (default: data/ beside `output_dir`, so "demo/corpus" gets demo/data/, where `c2s build
    --demo` puts them) and reused by later calls.
    `options` are BuildConfig fields (the command line's flags with underscores, e.g. max_genes=200,
    organism="human", cell_type_column="celltype", tasks=["cell_type_prediction"]); values are checked as
    the command line checks them. `spark=False` runs every task in this process (small inputs: no JVM);
    `spark=True` runs them on Spark: an active session if there is one, else a local one (master=...),
    stopped again at the end. A build whose inputs and options did not change returns the current manifest.
    """
    from etl.config import BuildConfig
    from etl.pipeline import build

    output = os.fspath(output_dir)
    paths = [os.fspath(p) for p in ([h5ad] if isinstance(h5ad, str | os.PathLike) else (h5ad or []))]
    given = [name for name, on in (("h5ad", bool(paths)), ("census_uri", census_uri is not None),
                                   ("census_version", bool(options.get("census_version"))), ("demo", demo)) if on]
    if len(given) > 1:
        raise ConfigError(f"build_corpus({output!r}): give one source, not {' and '.join(given)}")
    kwargs = _build_options(options)
    if not given and "sentences" in kwargs.get("stages", ["sentences"]):
        raise ConfigError(f"build_corpus({output!r}): no source; give h5ad=, census_uri=, census_version= or "
                          "demo=True (or stages=['samples'] to rebuild the samples of the corpus there)")
    if demo:
        kwargs.update(_demo_options(output, demo_dir, demo_cells))
    cfg = BuildConfig(output=output, h5ad=paths, census_uri=census_uri, spark=spark, **kwargs)
    if not spark:
        return build(cfg, None)
    from pyspark.sql import SparkSession

    from etl.spark import get_spark

    owned = SparkSession.getActiveSession() is None
    started: list = []

    def session():  # started only when a stage has work for Spark
        started.append(get_spark("c2s", cfg.master))
        return started[-1]

    try:
        return build(cfg, session)
    finally:
        if owned and started:
            started[-1].stop()


def _build_options(options: dict[str, Any]) -> dict[str, Any]:
    """BuildConfig keyword arguments from the caller's options, through the command line's one conversion."""
    import dataclasses
    import difflib
    import typing

    from etl.config import BuildConfig
    from schemas.cli import convert

    fields = {f.name: f for f in dataclasses.fields(BuildConfig)}
    hints = typing.get_type_hints(BuildConfig)
    out: dict[str, Any] = {}
    for name, value in options.items():
        if name == "output":
            raise ConfigError("build_corpus(output=...): pass the corpus folder as the first argument, output_dir")
        if name not in fields:
            near = difflib.get_close_matches(name, fields, n=1)
            raise ConfigError(f"build_corpus({name}=...): no such option" + (f"; did you mean {near[0]}?" if near
                              else "; options are BuildConfig fields (etl/config.py)"))
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        elif isinstance(value, list | tuple | set | frozenset):
            value = [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
        out[name] = convert(fields[name], hints[name], value, f"build_corpus({name}=...)")
    return out


def _demo_options(output: str, demo_dir: PathLike | None, n_cells: int) -> dict[str, Any]:
    """BuildConfig options of a demo build whose generated inputs live in `demo_dir` (default: data/ beside
    the output); the build makes them at first use and adds the demo knowledge files, as `c2s build --demo`."""
    if demo_dir is None:
        if "://" in output:
            raise ConfigError(f"build_corpus({output!r}, demo=True): the output is an object store; give "
                              "demo_dir= (a local folder for the generated demo inputs)")
        demo_dir = os.path.join(os.path.dirname(os.path.abspath(output)), "data")
    if isinstance(n_cells, bool) or not isinstance(n_cells, int) or n_cells < 1:
        raise ConfigError(f"build_corpus(demo_cells={n_cells!r}): give a number of cells >= 1")
    root = os.fspath(demo_dir)
    return {"demo": True, "demo_uri": os.path.join(root, "census"), "demo_cells": n_cells,
            "demo_perturbation_uri": os.path.join(root, "perturbation.h5ad")}


# --------------------------------------------------------------------------------------------------
# reading a corpus
# --------------------------------------------------------------------------------------------------


def load_corpus(path: PathLike, task: str = "cell_type_prediction", **kwargs: Any) -> Any:
    """The samples of one task as a `datasets.DatasetDict` (splits train, validation, test, test_ood).

    Reads through the dataset card (README.md) of the version `path` resolves to (the latest, or a pinned
    DIR/versions/<id>), exactly as `datasets.load_dataset(VERSION_DIR, task)` or the Hub would. `task`
    "sentences" gives the cell sentences (one train split). `kwargs` go to `datasets.load_dataset`
    (split="train", streaming=True, cache_dir=...).
    """
    from schemas.layout import resolve

    uri = os.fspath(path)
    v = resolve(uri)
    per = v.manifest.get("samples", {}).get("counts", {}).get("per_task_split", {})
    if task != "sentences" and task not in per:
        raise ConfigError(f"load_corpus({uri!r}, {task!r}): the corpus has no samples of that task; it has: "
                          f"{', '.join(sorted(per)) or 'none'} (and 'sentences')")
    if "://" not in v.root and not os.path.isfile(os.path.join(v.root, "README.md")):
        raise InputError(f"load_corpus({uri!r}): version folder {v.root} has no dataset card (README.md); "
                         "rebuild it with this version of the builder")
    import datasets

    return datasets.load_dataset(v.root, task, **kwargs)


def read_table(path: PathLike, table: str = "samples", *, task: str | None = None, split: str | None = None,
               organism: str | None = None, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """One table of the corpus version `path` resolves to, as a pandas DataFrame (columns: docs/SCHEMAS.md).

    `table`: samples (narrowed by `task` and `split`: train, val/validation, test, test_ood), sentences
    (by `organism`), vocab (by `organism`; all organisms get an `organism` column), inverse_transform, or
    knowledge/<name> (biogrid, ligand_receptor, abstracts, gene_sets). Reads only the folders asked for;
    `columns` narrows what is read (e.g. ["cell_id", "cell_type", "genes"]). For corpora larger than memory,
    stream with `load_corpus(..., streaming=True)` or pyarrow.dataset instead.
    """
    import pandas as pd

    from schemas.layout import resolve

    uri = os.fspath(path)
    v = resolve(uri)
    where = f"read_table({uri!r}, {table!r})"
    cols = list(columns) if columns is not None else None
    if table == "samples":
        per = v.manifest.get("samples", {}).get("counts", {}).get("per_task_split", {})
        if task is not None and task not in per:
            raise ConfigError(f"{where}: no samples of task {task!r}; tasks: {', '.join(sorted(per)) or 'none'}")
        if split is not None and split not in _SAMPLE_SPLITS:
            raise ConfigError(f"{where}: unknown split {split!r}; splits: train, val (validation), test, test_ood")
        tasks = [task] if task is not None else sorted(per)
        parts = [v.path("samples", t, _SAMPLE_SPLITS[split]) if split else v.path("samples", t) for t in tasks]
    elif table == "sentences":
        parts = v.sentence_files(organism)  # listed by the manifest: parts may live in earlier versions
    elif table == "vocab":
        orgs = [organism] if organism else sorted(v.manifest.get("counts", {}).get("organisms", {}))
        frames = [_read_parts([v.path("vocab", f"{o}.parquet")], cols, where).to_pandas().assign(organism=o)
                  for o in orgs if _exists(v.path("vocab", f"{o}.parquet"))]
        if not frames:
            raise InputError(f"{where}: the version at {v.root} has no vocabulary"
                             + (f" for organism {organism!r}" if organism else ""))
        return pd.concat(frames, ignore_index=True)
    elif table in ("inverse_transform", "stats"):
        parts = [v.path("stats", "inverse_transform.parquet")]
    elif table.startswith("knowledge/"):
        parts = [v.path("knowledge", f"{table.split('/', 1)[1]}.parquet")]
    else:
        raise ConfigError(f"{where}: unknown table; tables: samples, sentences, vocab, inverse_transform, "
                          "knowledge/<name>")
    parts = [p for p in parts if _exists(p)]
    if not parts:
        raise InputError(f"{where}: the version at {v.root} has no such table"
                         + (f" for organism {organism!r}" if organism else "")
                         + (f" and split {split!r}" if split else ""))
    return _read_parts(parts, cols, where).to_pandas()


def _exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    from schemas.layout import filesystem

    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _read_parts(parts: list[str], columns: list[str] | None, where: str):
    """Every parquet file under `parts` (files or folders) as one Arrow table."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    from schemas.layout import filesystem

    if not parts:
        raise InputError(f"{where}: no files")
    fs = filesystem(parts[0])[0]
    paths = [filesystem(p)[1] for p in parts]
    if len(paths) > 1 and all(p.endswith(".parquet") for p in paths):
        data = pads.dataset(paths, format="parquet", filesystem=fs)  # one dataset over the listed files
    else:
        datasets = [pads.dataset(p, format="parquet", filesystem=fs) for p in paths]
        data = datasets[0] if len(datasets) == 1 else pads.dataset(datasets)
    missing = [c for c in columns or [] if c not in data.schema.names]
    if missing:
        raise ConfigError(f"{where}: no column(s) {missing}; columns: {', '.join(data.schema.names)}")
    try:
        return data.to_table(columns=columns)
    except pa.ArrowInvalid as e:
        raise InputError(f"{where}: cannot read the table ({str(e).splitlines()[0]})") from None


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
    from etl.stages.samples_plan import genes_cap
    from etl.tasks import TASKS, common
    from etl.tasks.budget import TokenBudget, load_tokenizer_json

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
        fields = {**common.labels(records[0]), "num_cells": len(records),
                  "cell_types": common.cell_type_list(records)}
    if task == "perturbation_prediction" and "the_perturbation" not in values:  # named as the builder names it
        from etl.tasks.perturbation import perturbation_words

        target = values.pop("perturbation", None)
        if not target:
            raise InputError(f"{where}: pass perturbation='KLF1' (or a list of genes for a combination), and "
                             "perturbation_type='CRISPRi' (CRISPRa, knockout, drug, ...) if known")
        targets = [target] if isinstance(target, str) else [str(t) for t in target]
        values = {**values, **perturbation_words(targets, values.pop("perturbation_type", None))}
    fields.update(values)
    budget = TokenBudget(max_tokens=max_tokens,
                         tokenizer_json=load_tokenizer_json(tokenizer) if tokenizer else None)
    ctx = common.SampleContext(mixture={}, budget=budget, max_genes=genes_cap(budget))
    try:
        out = common.render(task, "", fields, [r["genes"] for r in records] or None, ctx, common.Counts(),
                            template=template)
    except KeyError as e:
        raise InputError(f"{where}: the template needs a value for {{{e.args[0]}}}; pass {e.args[0]}=...") from None
    if out is None:
        raise InputError(f"{where}: the prompt does not fit max_tokens={max_tokens} even with few genes; raise "
                         "max_tokens or shorten the other values")
    prompt, completion, _, _, _ = out
    return prompt, completion


def _cell_record(cell: Mapping[str, Any], i: int, where: str) -> dict[str, Any]:
    """A cell dict as the builders see one: labels (defaults 'unknown') and `genes` as a list of str."""
    from schemas import UNKNOWN

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
