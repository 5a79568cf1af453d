"""The one typed configuration of `spark-submit etl/build_corpus.py`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from etl.sources.base import InputError
from schemas.cli import option as _f  # a config field: default, --help text, option metadata

STAGES = ("sentences", "samples")  # stages that exist, in order
# Below this many cells a build runs in one process unless told otherwise. benchmarks/spark_choice_bench.py
# (BENCHMARKS.md, "Spark or one process") measured Spark's start-up at ~11 s and, on 2 cores, the same cost per
# cell as one process (which overlaps reading with encoding); with more cores Spark's per-cell cost falls, and
# 50,000 cells is about where it would win on 8-16 cores (an estimate from those fits, not a measurement).
SPARK_MIN_CELLS = 50_000


@dataclass
class BuildConfig:
    # where
    output: str | None = _f(None, "Output directory: a local path or s3://bucket/prefix (s3a:// too; endpoint "
                            "from AWS_ENDPOINT_URL). Each build writes DIR/versions/<id>/ and commits it by "
                            "rewriting DIR/latest.json last; readers given DIR see the latest committed version "
                            "(default: corpus, or demo/corpus with --demo).", metavar="DIR", flag="output-dir",
                            aliases=["output"])
    stages: list[str] = _f(list(STAGES), f"Stages to run, comma-separated, from {','.join(STAGES)}; 'samples' alone "
                           "rebuilds the samples of DIR's latest version (its sentences are reused, not copied).")
    keep_versions: int = _f(0, "After a commit, keep the newest N committed versions and delete older ones "
                            "(never one a kept version reuses); 0 keeps all.", metavar="N")
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
    spatial_key: str = _f("spatial", "obsm key of the cells' spatial coordinates (n x 2+ array) in --h5ad files; "
                          "files without the default key get no coordinates (spatial tasks skipped).",
                          metavar="KEY")
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
    master: str | None = _f(None, "Spark master when not set by spark-submit (default local[*,4]: all cores, a "
                            "task retried up to 4 times as on a cluster).", metavar="URL")
    spark: bool | None = _f(None, "Run the tasks on Spark (true) or in this process without a JVM (false). "
                            f"Unset: in this process below {SPARK_MIN_CELLS:,} cells, where Spark's start-up "
                            "costs more than its second core gains (benchmarks/spark_choice_bench.py), on Spark "
                            "above; always Spark under spark-submit or with --master.")
    log_level: str = _f("info", "Log level; debug also shows tracebacks and Spark's own logs.",
                        choices=["debug", "info", "warning", "error"])
    force: bool = _f(False, "Rebuild even when the manifest says the corpus is current.")
    commit_sentences_only: bool = _f(False, "With --stages sentences over a corpus whose latest version has "
                                     "samples: point latest at the new sentences-only version at once (training "
                                     "on DIR then fails until the samples stage runs). Without it the version is "
                                     "kept beside latest, and the next --stages samples builds on it.")
    incremental: bool = _f(False, "Over a changed source, rebuild only the datasets that changed (by Census "
                           "dataset_version_id or h5ad content) and reuse the others' parts where an earlier "
                           "version wrote them; the result equals a full build (jobs/refresh.py sets this).")
    # samples stage: knowledge
    biogrid: str | None = _f(None, "BioGRID TAB3 file (.txt, or the release .zip) for gene_interaction_prediction.",
                             metavar="FILE")
    cellphonedb: str | None = _f(None, "CellPhoneDB v5 folder (interaction_input.csv, complex_input.csv, "
                                 "gene_input.csv) for ligand_receptor_prediction.", metavar="DIR")
    abstracts: list[str] = _f([], "PubMed records, MEDLINE text or PubMed XML, files or folders (repeatable), "
                              "matched to datasets by DOI/PMID.", metavar="PATH")
    fetch_abstracts: bool = _f(False, "Look the datasets' DOIs up in PubMed (Bio.Entrez, needs --email and network) "
                               "and cache the records in --abstracts-cache for offline runs.")
    email: str | None = _f(None, "Contact e-mail NCBI asks Entrez users for (--fetch-abstracts).", metavar="ADDR")
    ncbi_api_key: str | None = _f(None, "NCBI API key: 10 requests/s instead of 3.", metavar="KEY")
    abstracts_cache: str = _f("data/pubmed_cache", "Where fetched PubMed records are cached (read by later runs).",
                              metavar="DIR")
    gene_sets: list[str] = _f([], "GMT gene set file(s) for gene_set_enumeration / gene_set_naming (repeatable).",
                              metavar="FILE")
    # samples stage: perturbation
    perturbation_h5ad: list[str] = _f([], "Perturbation AnnData file (e.g. Perturb-seq; repeatable) for "
                                      "perturbation_prediction: control sentence + perturbation -> perturbed "
                                      "sentence. Organism from --organism, dataset id from the file name.",
                                      metavar="FILE")
    perturbation_column: str = _f("perturbation", "obs column of the perturbation files naming each cell's "
                                  "perturbation (a gene, or genes joined by --combination-separator).", metavar="COL")
    control_label: list[str] = _f(["control"], "Label(s) of control cells in --perturbation-column (comma-separated "
                                  "or repeated); a combination part equal to one (KLF1+ctrl) is dropped.",
                                  metavar="LABEL")
    perturbation_context: list[str] = _f([], "obs column(s) a paired control must share with the perturbed cell "
                                         "(default: cell_type when the file has it; 'none': any control).",
                                         metavar="COL")
    perturbation_layer: str | None = _f(None, "Matrix of the perturbation files to rank: X (default), raw (raw.X) "
                                        "or a layer name; use raw counts.", metavar="NAME")
    combination_separator: str = _f("+", "Separator of the genes of a combination label (KLF1+MAP2K6).",
                                    metavar="SEP")
    perturbation_holdout: float = _f(0.1, "Fraction of single perturbations held out as test, alone and inside "
                                     "combinations (at least one when there are 3 or more).", metavar="F")
    combination_holdout: float = _f(0.2, "Fraction of combinations whose genes all have train cells held out as "
                                    "test (unseen combinations of seen perturbations).", metavar="F")
    # samples stage: tasks, budget, splits
    tasks: list[str] = _f([], "Tasks to build (default: every built task whose inputs are present).")
    mixture: list[str] = _f([], "TASK=RATE: samples per cell (single-cell), per 8 grouped cells (multi-cell) or per gene "
                            "set (knowledge); overrides the default mixture (repeatable).", metavar="TASK=RATE")
    max_tokens: int = _f(1024, "Token budget of prompt + response; gene lists are cut to fit (8192 supported).",
                         metavar="N")
    templates: str = _f("c2s", "Template pack the prompts are worded in: c2s (this project's, every task), "
                        "cell2sentence (the installed cell2sentence package's prompt files: the format the "
                        "released C2S-Scale and C2S-Pythia checkpoints were trained on, for the five tasks they "
                        "word; the others keep ours) or a folder of JSON files in that shape.",
                        metavar="c2s|cell2sentence|DIR")
    top_k_genes: int | None = _f(None, "Genes per cell a prompt carries, and the number its wording states "
                                 "(default: as many as the token budget fits, at most 1,024; with a pack other "
                                 "than c2s, 200, as C2S-Pythia-410m was trained).", metavar="K")
    tokenizer: str | None = _f(None, "tokenizer.json or a Hugging Face tokenizer folder: exact token counts "
                               "(default: 3.3 tokens per gene, 4 characters per token).", metavar="PATH")
    tokens_per_gene: float = _f(3.3, "Tokens per gene symbol when no --tokenizer is given.", metavar="X")
    split_key: str = _f("donor", "What a split is drawn for: donor (within dataset), dataset or cell.",
                        choices=["donor", "dataset", "cell"])
    split_fractions: list[float] = _f([0.9, 0.05, 0.05], "train, val, test fractions (comma-separated).")
    ood_fraction: float = _f(0.1, "Fraction of datasets held out whole as test_ood (at least one when there "
                             "are 3 or more datasets and the fraction is > 0).", metavar="F")
    ood_datasets: list[str] = _f([], "Datasets to hold out as test_ood (replaces --ood-fraction).", metavar="ID")
    group_max: int = _f(20, "Most cells in a multi-cell sample (2-20 in C2S-Scale); lowered to what the token "
                        "budget holds at --multi-cell-genes genes per cell.", metavar="N")
    multi_cell_genes: int = _f(32, "Fewest genes per cell a multi-cell prompt should show: groups are at most as "
                               "large as the budget allows at this many genes each (at 1,024 tokens 7 cells, "
                               "at 8,192 the full 20).", metavar="N")
    spatial_tile_cells: int = _f(2000, "Spatial tasks: cells per square tile a section is cut into so it "
                                 "streams with bounded memory (centres whose neighbours may lie across a tile "
                                 "border are skipped and counted).", metavar="N")
    samples_partitions: int = _f(0, "Spark partitions of the samples stage (0: about one per 20k cells).",
                                 metavar="N")
    # demo
    demo: bool = _f(False, "Build the demo: a small Census-shaped collection and a synthetic Perturb-seq file "
                    "generated at first use (in demo/data), with the demo knowledge files, into demo/corpus.")
    demo_uri: str = _f("demo/data/census", "Where the generated demo Census lives (built at first use).",
                       metavar="PATH")
    demo_cells: int = _f(3000, "Cells in the generated demo Census.", metavar="N")
    demo_perturbation_uri: str = _f("demo/data/perturbation.h5ad", "Where the generated demo perturbation file "
                                    "lives (synthetic CRISPRa Perturb-seq; used by the demo when no "
                                    "--perturbation-h5ad is given).", metavar="PATH")

    GROUPS: ClassVar[dict[str, str]] = {
        "output": "output", "census_version": "Census source", "h5ad": "h5ad source",
        "max_genes": "encoding", "cells_per_task": "Spark, files and logging", "biogrid": "samples: knowledge",
        "perturbation_h5ad": "samples: perturbation", "tasks": "samples: tasks, token budget, splits",
        "demo": "demo"}

    def __post_init__(self) -> None:
        if self.output is None:
            self.output = "demo/corpus" if self.demo else "corpus"
        if not self.stages:
            raise InputError(f"--stages is empty; give one or more of {', '.join(STAGES)}")
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
        if len(self.split_fractions) != 3 or abs(sum(self.split_fractions) - 1) > 1e-6 or min(self.split_fractions) < 0:
            raise InputError(f"--split-fractions takes three fractions summing to 1, got {self.split_fractions}")
        for n in ("max_cells", "demo_cells"):
            v = getattr(self, n)
            if v is not None and v < 1:
                raise InputError(f"--{n.replace('_', '-')} must be at least 1, got {v}")
        if self.keep_versions < 0:
            raise InputError(f"--keep-versions must be >= 0, got {self.keep_versions}")
        if self.buffer_mib < 1:
            raise InputError("--buffer-mib must be at least 1")
        if self.tokens_per_gene <= 0:
            raise InputError("--tokens-per-gene must be > 0")
        if self.top_k_genes is not None and self.top_k_genes < 1:
            raise InputError(f"--top-k-genes must be >= 1, got {self.top_k_genes}")
        if self.max_tokens < 64:
            raise InputError("--max-tokens must be at least 64")
        if self.spatial_tile_cells < 20:
            raise InputError("--spatial-tile-cells must be at least 20")
        if self.multi_cell_genes < 1:
            raise InputError("--multi-cell-genes must be at least 1")
        if not 2 <= self.group_max <= 64:
            raise InputError("--group-max must be between 2 and 64")
        for item in self.mixture:
            if "=" not in item:
                raise InputError(f"--mixture takes TASK=RATE, got {item!r}")
        if self.read_ahead < 0:
            raise InputError("--read-ahead must be >= 0")
        for n in ("perturbation_holdout", "combination_holdout"):
            if not 0 <= getattr(self, n) <= 1:
                raise InputError(f"--{n.replace('_', '-')} must be between 0 and 1")
        if not self.combination_separator.strip():
            raise InputError("--combination-separator must not be empty")
        if not self.control_label:
            raise InputError("--control-label needs at least one label")
        if self.max_genes < 0:
            raise InputError(f"--max-genes must be >= 0 (0 keeps every expressed gene), got {self.max_genes}")
        if self.obs_filter == "":
            self.obs_filter = None
        for item in self.label_column:
            if "=" not in item:
                raise InputError(f"--label-column takes FIELD=COLUMN, got {item!r}")
        if self.demo and (self.h5ad or self.census_version or self.census_uri):
            raise InputError("--demo builds the generated demo; drop it to build from --h5ad or the Census")
        if "sentences" in self.stages and not (self.demo or self.h5ad or self.census_version or self.census_uri):
            raise InputError("no cells to read: give --h5ad FILE, --census-version V (e.g. stable) or --census-uri "
                             "URI; or --demo to build the small generated demo into demo/corpus")

    @property
    def source_kind(self) -> str:
        if self.h5ad:
            return "h5ad"
        if self.demo:
            return "demo"
        return "census" if (self.census_version or self.census_uri) else "none"  # none: a samples-only build

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

    def samples_options(self) -> dict:
        """The options that shape the samples (they enter the samples run key and the manifest)."""
        return {"tasks": sorted(self.tasks), "mixture": sorted(self.mixture), "max_tokens": self.max_tokens,
                "templates": self.templates, "top_k_genes": self.top_k_genes,
                "tokens_per_gene": self.tokens_per_gene, "split_key": self.split_key,
                "split_fractions": list(self.split_fractions), "ood_fraction": self.ood_fraction,
                "ood_datasets": sorted(self.ood_datasets), "group_max": self.group_max, "multi_cell_genes": self.multi_cell_genes, "seed": self.seed,
                "spatial_tile_cells": self.spatial_tile_cells,
                "perturbation": {"column": self.perturbation_column, "control_label": sorted(self.control_label),
                                 "context": list(self.perturbation_context), "layer": self.perturbation_layer,
                                 "separator": self.combination_separator, "holdout": self.perturbation_holdout,
                                 "combination_holdout": self.combination_holdout}}
