"""The one typed configuration of `spark-submit etl/build_corpus.py`."""

from __future__ import annotations

from dataclasses import dataclass, field

STAGES = ("sentences",)  # stages that exist, in order; the samples stage comes with the task corpus


def _f(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class BuildConfig:
    # where
    output: str = _f("corpus", "Output directory: a local path or s3a://bucket/prefix.", metavar="DIR")
    stages: list[str] = _f(list(STAGES), f"Stages to run, comma-separated, from {','.join(STAGES)}.")
    # Census source
    census_version: str | None = _f(None, "Census release to read, e.g. 2025-11-08 or stable "
                                    "(resolved once on the driver; needs network).", metavar="V")
    census_uri: str | None = _f(None, "A Census-shaped SOMA collection: local path or s3:// URI.", metavar="URI")
    organisms: list[str] = _f(["homo_sapiens", "mus_musculus"], "Census organisms to read.")
    obs_filter: str | None = _f("is_primary_data == True", "SOMA value filter on obs (Census syntax); "
                                "'' for none.", metavar="EXPR")
    max_cells: int | None = _f(None, "Sample at most N cells per organism (Census) or per file (h5ad), "
                               "uniformly with --seed: for trial runs.", metavar="N")
    # h5ad source
    h5ad: list[str] = _f([], "An AnnData file to encode (repeatable); replaces the Census source.", metavar="FILE")
    organism: str = _f("homo_sapiens", "Organism of the --h5ad files (homo_sapiens, mus_musculus, human, ...).")
    dataset_id: list[str] = _f([], "Dataset id per --h5ad file, in order (default: the file name).", metavar="ID")
    cell_type_column: str = _f("cell_type", "obs column holding the cell type (must exist).", metavar="COL")
    label_column: list[str] = _f([], "FIELD=COLUMN: take output label FIELD (tissue, donor_id, disease, sex, ...) "
                                 "from obs COLUMN (repeatable). Unmapped fields use the same-named column if "
                                 "present, else 'unknown'.", metavar="FIELD=COL")
    h5ad_layer: str | None = _f(None, "Matrix to rank: X (default), raw (raw.X) or a layer name; use raw counts.",
                                metavar="NAME")
    # encoding
    max_genes: int = _f(2048, "Keep the top K genes of each sentence; 0 keeps every expressed gene.", metavar="K")
    uppercase: bool = _f(True, "Upper-case gene symbols, as cell2sentence does.")
    seed: int = _f(0, "Seed of the per-cell tie-break and of --max-cells sampling.")
    on_invalid: str = _f("skip", "Cells with NaN, infinite or negative values: skip and count them, or stop "
                         "with an error naming the cell.", choices=["skip", "error"])
    # parallelism and files
    cells_per_task: int = _f(16384, "Cells per Spark task (one parquet part each).", metavar="N")
    block_cells: int = _f(4096, "Cells per X read inside a task (memory per task scales with this).", metavar="N")
    read_ahead: int = _f(1, "Blocks a task reads ahead in a thread while it encodes and writes the current "
                         "one (0: no read-ahead; each adds one block of memory).", metavar="N")
    row_group_cells: int = _f(1024, "Rows per parquet row group (the unit of a streaming read).", metavar="N")
    compression: str = _f("zstd", "Parquet compression.", choices=["zstd", "snappy", "gzip", "none"])
    buffer_mib: int = _f(128, "TileDB buffer per column per task (soma.init_buffer_bytes).", metavar="MIB")
    master: str | None = _f(None, "Spark master when not set by spark-submit (default local[*]).", metavar="URL")
    force: bool = _f(False, "Rebuild even when the manifest says the corpus is current.")
    # demo
    demo_uri: str = _f("data/demo_census", "Where the generated demo Census lives (built at first use).",
                       metavar="PATH")
    demo_cells: int = _f(3000, "Cells in the generated demo Census.", metavar="N")

    def __post_init__(self) -> None:
        from etl.sources.base import InputError

        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise InputError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
        if self.census_version and self.census_uri:
            raise InputError("give --census-version or --census-uri, not both")
        if self.h5ad and (self.census_version or self.census_uri):
            raise InputError("give --h5ad or a Census source, not both")
        for n in ("cells_per_task", "block_cells", "row_group_cells"):
            if getattr(self, n) < 1:
                raise InputError(f"--{n.replace('_', '-')} must be at least 1")
        if self.read_ahead < 0:
            raise InputError("--read-ahead must be >= 0")
        if self.max_genes < 0:
            raise InputError("--max-genes must be >= 0")
        if self.obs_filter == "":
            self.obs_filter = None
        for item in self.label_column:
            if "=" not in item:
                raise InputError(f"--label-column takes FIELD=COLUMN, got {item!r}")

    @property
    def source_kind(self) -> str:
        if self.h5ad:
            return "h5ad"
        return "census" if (self.census_version or self.census_uri) else "demo"

    @property
    def label_columns(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.label_column)

    def shaping_options(self) -> dict:
        """The options that change the output (they enter the run key and the manifest)."""
        return {"max_genes": self.max_genes, "uppercase": self.uppercase, "seed": self.seed,
                "on_invalid": self.on_invalid, "cells_per_task": self.cells_per_task,
                "block_cells": self.block_cells, "row_group_cells": self.row_group_cells,
                "compression": self.compression, "cell_type_column": self.cell_type_column,
                "label_columns": self.label_columns, "h5ad_layer": self.h5ad_layer}
