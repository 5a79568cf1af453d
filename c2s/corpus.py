"""Reading a corpus from Python: `load_corpus` (a datasets.DatasetDict of one task) and `read_table` (any table
as pandas). Needs only the base install (and `datasets` for load_corpus), not the ETL's packages."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from schemas.errors import ConfigError, InputError
from schemas.layout import filesystem, resolve

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["load_corpus", "read_table"]

PathLike = str | os.PathLike
_SAMPLE_SPLITS = {"train": "train", "val": "val", "validation": "val", "test": "test", "test_ood": "test_ood"}


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

    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _read_parts(parts: list[str], columns: list[str] | None, where: str):
    """Every parquet file under `parts` (files or folders) as one Arrow table."""
    import pyarrow as pa
    import pyarrow.dataset as pads

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
