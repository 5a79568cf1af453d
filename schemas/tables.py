"""Every table the project writes, declared once as data.

Writers build their Arrow tables against these schemas, the validator re-reads outputs against them, the
Spark side derives its StructTypes from them, and docs/SCHEMAS.md is generated from them (a test keeps the
two in step). Bump SCHEMA_VERSION on any change that a reader could notice.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "2.0.0"  # 2.0.0: samples carry prompt/completion/label/label_id; plain (not hive) table folders


def _f(name: str, type_: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"description": doc})


# Label columns copied from the source's obs (Census names). Missing labels in user data become "unknown",
# the Census convention, and the manifest records which columns were absent.
LABEL_COLUMNS: tuple[str, ...] = (
    "donor_id",
    "assay",
    "assay_ontology_term_id",
    "cell_type",
    "cell_type_ontology_term_id",
    "tissue",
    "tissue_ontology_term_id",
    "tissue_general",
    "tissue_type",
    "disease",
    "disease_ontology_term_id",
    "sex",
    "development_stage",
    "self_reported_ethnicity",
    "suspension_type",
)
UNKNOWN = "unknown"

SENTENCES = pa.schema(
    [
        _f("cell_id", pa.string(), "Source cell id: Census observation_joinid, or the h5ad obs index."),
        _f("soma_joinid", pa.int64(), "Census obs soma_joinid, or the row number in the h5ad file."),
        _f("organism", pa.string(), "Census organism key, e.g. homo_sapiens (also the folder name)."),
        _f("dataset_id", pa.string(), "Census dataset_id, or the h5ad's dataset id (also the folder name)."),
        *[_f(c, pa.string(), f"obs `{c}` label ('unknown' where the source has none).") for c in LABEL_COLUMNS],
        _f("is_primary_data", pa.bool_(), "Census is_primary_data (True for h5ad input)."),
        _f("raw_sum", pa.float64(), "Sum of the cell's raw counts over all genes."),
        _f("n_expressed", pa.int32(), "Number of distinct gene symbols with a nonzero count (before truncation)."),
        _f("spatial_x", pa.float64(), "First spatial coordinate (h5ad obsm[--spatial-key] column 0); null where "
           "the source has none (Census, demo) or the value is not finite.", nullable=True),
        _f("spatial_y", pa.float64(), "Second spatial coordinate (obsm[--spatial-key] column 1); null with "
           "spatial_x.", nullable=True),
        _f(
            "genes",
            pa.list_(pa.field("item", pa.string(), nullable=False)),
            "The cell sentence: gene symbols in descending raw count, ties in a per-cell seeded random order; "
            "truncated to --max-genes.",
        ),
    ]
)

VOCAB = pa.schema(
    [
        _f("token_id", pa.int32(), "Position of the symbol in the sorted vocabulary of this organism."),
        _f("gene_symbol", pa.string(), "Gene symbol as written in sentences (upper-cased, as cell2sentence does)."),
        _f(
            "feature_ids",
            pa.list_(pa.field("item", pa.string(), nullable=False)),
            "Every source feature_id (Ensembl) whose counts are summed under this symbol.",
        ),
        _f("n_cells", pa.int64(), "Number of written cells in which the symbol is expressed."),
    ]
)

GENE_COUNTS = pa.schema(
    [
        _f("gene_symbol", pa.string(), "Gene symbol, as in the vocabulary."),
        _f("n_cells", pa.int64(), "Written cells of this sentences part in which the symbol is expressed (before "
           "--max-genes truncation). stats/genes/<organism>/<dataset_id>/part-*.parquet, one per sentences part: "
           "a refresh that drops or rebuilds a dataset takes its share out of the vocabulary's n_cells."),
    ]
)

INVERSE_TRANSFORM = pa.schema(
    [
        _f("organism", pa.string(), "Organism key."),
        _f("dataset_id", pa.string(), "Dataset the fit belongs to (C2S keeps one fit per dataset)."),
        _f("n_cells", pa.int64(), "Cells that contributed."),
        _f("n_points", pa.int64(), "(rank, expression) points in the fit: ranks below max_rank of each cell."),
        _f("sum_x", pa.float64(), "Sum of x = log10(1 + rank), rank 0-based. Sufficient statistic (mergeable)."),
        _f("sum_y", pa.float64(), "Sum of y = log10(1 + normalised expression). Sufficient statistic."),
        _f("sum_xx", pa.float64(), "Sum of x*x. Sufficient statistic."),
        _f("sum_xy", pa.float64(), "Sum of x*y. Sufficient statistic."),
        _f("sum_yy", pa.float64(), "Sum of y*y. Sufficient statistic."),
        _f("slope", pa.float64(), "Least-squares slope of y on x (typically about -0.7)."),
        _f("intercept", pa.float64(), "Least-squares intercept (typically about 2.2 at target 1e4)."),
        _f("r2", pa.float64(), "Coefficient of determination of the fit."),
        _f("normalize_target", pa.float64(), "Counts are scaled to this total per cell before log10(1+x)."),
        _f("max_rank", pa.int32(), "Only ranks < max_rank enter the fit (C2S: log10(1+rank) < 3)."),
    ]
)

_STRS = pa.list_(pa.field("item", pa.string(), nullable=False))

SAMPLES = pa.schema(
    [
        _f("sample_id", pa.string(), "Stable id: hash of (task, cells or knowledge item, draw, seed)."),
        _f("task", pa.string(), "Task name (also the folder name), e.g. cell_type_prediction."),
        _f("split", pa.string(), "train | val | test | test_ood (also the folder name)."),
        _f("prompt", pa.string(), "Completion-style prompt; the model continues after it (no trailing space)."),
        _f("completion", pa.string(), "What the model should write, starting with a space (C2S style): TRL's "
           "prompt-completion format."),
        _f("label", pa.string(), "The bare answer of a prediction task (a cell type, a tissue, yes/no, a gene set "
           "name, ...): what evaluation compares to, never parsed back out of the completion; null for "
           "generation tasks.", nullable=True),
        _f("label_id", pa.string(), "The ontology id of `label` where one exists (CL for cell types, UBERON for "
           "tissues); null otherwise.", nullable=True),
        _f("organism", pa.string(), "Organism key ('' for knowledge samples that have none)."),
        _f("dataset_id", pa.string(), "Dataset of the cells ('' for knowledge-only samples)."),
        _f("cell_ids", _STRS, "The cells the sample is built from, in prompt order (empty for knowledge-only)."),
        _f("n_genes", pa.int32(), "Genes per cell sentence in this sample after the token budget (0: none)."),
        _f("est_tokens", pa.int32(), "Estimated tokens of prompt + response (exact per gene with --tokenizer)."),
        _f("template", pa.int16(), "Index of the template used, within the task's template file."),
    ]
)

BIOGRID = pa.schema(
    [
        _f("interaction_id", pa.int64(), "#BioGRID Interaction ID."),
        _f("symbol_a", pa.string(), "Official Symbol Interactor A (upper-cased when the corpus is)."),
        _f("symbol_b", pa.string(), "Official Symbol Interactor B."),
        _f("entrez_a", pa.int64(), "Entrez Gene Interactor A (null if '-').", nullable=True),
        _f("entrez_b", pa.int64(), "Entrez Gene Interactor B (null if '-').", nullable=True),
        _f("system", pa.string(), "Experimental System, e.g. Two-hybrid, Affinity Capture-MS."),
        _f("system_type", pa.string(), "Experimental System Type: physical or genetic (kept apart)."),
        _f("pubmed_id", pa.string(), "Publication Source, e.g. PUBMED:9006895."),
        _f("taxid", pa.int32(), "NCBI taxonomy id of both interactors (9606 human, 10090 mouse)."),
    ]
)

LIGAND_RECEPTOR = pa.schema(
    [
        _f("interaction_id", pa.string(), "CellPhoneDB id_cp_interaction."),
        _f("ligand", pa.string(), "Ligand-side partner: gene symbol, or complex name."),
        _f("receptor", pa.string(), "Receptor-side partner: gene symbol, or complex name."),
        _f("ligand_genes", _STRS, "Gene symbols of the ligand side (every subunit of a complex)."),
        _f("receptor_genes", _STRS, "Gene symbols of the receptor side (every subunit of a complex)."),
        _f("directionality", pa.string(), "CellPhoneDB directionality, as the ligand/receptor sides were read."),
        _f("classification", pa.string(), "CellPhoneDB classification, e.g. Signaling by Chemokines."),
    ]
)

ABSTRACTS = pa.schema(
    [
        _f("pmid", pa.string(), "PubMed id."),
        _f("doi", pa.string(), "DOI (lower-case, no resolver prefix), '' if the record has none."),
        _f("title", pa.string(), "Article title."),
        _f("abstract", pa.string(), "Abstract text."),
        _f("source_file", pa.string(), "File the record was read from (or the Entrez cache file)."),
    ]
)

GENE_SETS = pa.schema(
    [
        _f("name", pa.string(), "Gene set name, e.g. HALLMARK_APOPTOSIS."),
        _f("description", pa.string(), "Second GMT column (often a URL)."),
        _f("genes", _STRS, "Member symbols, in file order, duplicates removed."),
        _f("source_file", pa.string(), "GMT file the set came from."),
    ]
)


# The manifest is JSON; its required top-level keys and their types, as data, for writer and validator.
MANIFEST_FIELDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "schema_version": (str, "SCHEMA_VERSION of the tables."),
    "code_version": (str, "Package version and git commit of the code that wrote the corpus."),
    "run_key": (str, "Hash of source identity and options: equal keys mean an equal build."),
    "created_at": (str, "UTC time the manifest was written (ISO 8601)."),
    "source": (dict, "kind (census|h5ad|demo), resolved URI, Census version, h5ad files with sizes."),
    "filters": (dict, "obs value filter, organisms, max_cells."),
    "options": (dict, "Every build option that shapes the output."),
    "counts": (dict, "Per organism and dataset: read, written, skipped by reason; totals."),
    "files": (dict, "Every sentences part (path relative to the sentences' version folder) -> rows, bytes, "
              "hash (the order-free sum of its rows' hashes, hex), and `version` where an earlier version "
              "wrote the part and this one reuses it."),
    "content_hash": (str, "sha256 of the order-free sum of the sentence rows' hashes and the row count: a "
                     "function of the rows only (not of files, partitioning, master or executors)."),
    "timings_s": (dict, "Wall seconds per stage."),
    "stages": (list, "Stages this corpus contains."),
}

# Keys every manifest written since the versioned layout carries (older manifests lack them; readers cope).
MANIFEST_OPTIONAL_FIELDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "version": (str, "This version's id (`<UTC time>-<run key prefix>`), the folder name under DIR/versions/."),
    "sentences_version": (str, "The version whose sentences/, vocab/ and stats/ this one uses: itself, or an "
                          "earlier one when only the samples were rebuilt (not copied)."),
    "formats": (dict, "Versions of what decides the output bytes: schema, encoder, row_hash, samples (they "
                "enter the run keys)."),
    "dataset_keys": (dict, "`organism/dataset_id` -> digest of what decides the dataset's rows (source version "
                     "or file hash, planned cells, var words, options, formats): a refresh rebuilds the datasets "
                     "whose key changed and reuses the rest."),
    "gene_counts": (bool, "Each sentences part has its per-gene cell counts in stats/genes/ (what a refresh needs)."),
    "refresh": (dict, "For a version a refresh made: base (the version refreshed), unchanged (datasets reused "
                "where an earlier version wrote them; their `files` entries name it), rebuilt, removed."),
    "samples": (dict, "The samples stage: run_key, inputs, tasks built or skipped (with reasons), counts per "
                "task and split, files (rows, bytes, hash), samples_hash (order-free)."),
}

TABLES: dict[str, pa.Schema] = {
    "sentences": SENTENCES,
    "vocab": VOCAB,
    "inverse_transform": INVERSE_TRANSFORM,
    "gene_counts": GENE_COUNTS,
    "samples": SAMPLES,
    "knowledge/biogrid": BIOGRID,
    "knowledge/ligand_receptor": LIGAND_RECEPTOR,
    "knowledge/abstracts": ABSTRACTS,
    "knowledge/gene_sets": GENE_SETS,
}


class SchemaMismatch(ValueError):
    """An Arrow table or file does not match the declared schema."""


def conform(table: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    """Select and cast `table` to `schema` (column order, types), raising with the names of what differs."""
    missing = [n for n in schema.names if n not in table.column_names]
    if missing:
        raise SchemaMismatch(f"{what}: missing column(s) {missing}; expected {schema.names}")
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise SchemaMismatch(f"{what}: cannot cast to the declared schema: {e}") from e


def check(schema_found: pa.Schema, schema: pa.Schema, what: str) -> None:
    """Raise SchemaMismatch unless `schema_found` has every declared column with the declared type."""
    problems = []
    for field in schema:
        idx = schema_found.get_field_index(field.name)
        if idx < 0:
            problems.append(f"missing {field.name}")
            continue
        found = schema_found.field(idx).type
        # Readers may see dictionary-encoded or large variants; compare on the logical type.
        if not _same_logical(found, field.type):
            problems.append(f"{field.name}: {found} != {field.type}")
    if problems:
        raise SchemaMismatch(f"{what}: " + "; ".join(problems))


def _same_logical(a: pa.DataType, b: pa.DataType) -> bool:
    if pa.types.is_dictionary(a):
        a = a.value_type
    if pa.types.is_large_string(a):
        a = pa.string()
    if pa.types.is_large_list(a) or pa.types.is_list(a):
        return (pa.types.is_list(b) or pa.types.is_large_list(b)) and _same_logical(a.value_type, b.value_type)
    return a.equals(b)


def check_manifest(manifest: dict, what: str = "manifest.json") -> None:
    """Raise SchemaMismatch when a manifest lacks a required key or has one of the wrong type."""
    problems = [
        f"{k}: missing" if k not in manifest else f"{k}: expected {t}, found {type(manifest[k]).__name__}"
        for k, (t, _) in MANIFEST_FIELDS.items()
        if k not in manifest or not isinstance(manifest[k], t)
    ]
    if problems:
        raise SchemaMismatch(f"{what}: " + "; ".join(problems))
    if manifest["schema_version"].split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise SchemaMismatch(
            f"{what}: schema_version {manifest['schema_version']} is not readable by {SCHEMA_VERSION}"
        )


def to_spark(schema: pa.Schema):
    """The Spark StructType of a declared schema (imported lazily: pure-Arrow users need no pyspark)."""
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(schema)


def markdown() -> str:
    """docs/SCHEMAS.md, generated from the declarations above."""
    out = [
        "# Tables",
        "",
        f"Generated from `schemas/tables.py` (schema version {SCHEMA_VERSION}); "
        "`python -m schemas > docs/SCHEMAS.md` rewrites it.",
        "",
    ]
    out += ["A corpus directory `DIR` holds immutable versions, `DIR/versions/<id>/`, and `DIR/latest.json`, the "
            "pointer to the version readers see (written last: the commit). `V` below is a version folder; the "
            "sentence tables may live in the version named by its manifest's `sentences_version`, and a refreshed "
            "version reads its unchanged datasets' parts where an earlier version wrote them (the `version` of "
            "their entries in the manifest's `files`).", ""]
    where = {
        "sentences": "`V/sentences/<organism>/<dataset_id>/part-*.parquet`",
        "vocab": "`V/vocab/<organism>.parquet`",
        "inverse_transform": "`V/stats/inverse_transform.parquet`",
        "gene_counts": "`V/stats/genes/<organism>/<dataset_id>/part-*.parquet` (one per sentences part)",
        "samples": "`V/samples/<task>/<split>/part-*.parquet` (split: train, val, test, test_ood)",
        "knowledge/biogrid": "`V/knowledge/biogrid.parquet` (the organism's BioGRID rows, as joined)",
        "knowledge/ligand_receptor": "`V/knowledge/ligand_receptor.parquet` (CellPhoneDB, resolved to symbols)",
        "knowledge/abstracts": "`V/knowledge/abstracts.parquet` (PubMed records matched to datasets)",
        "knowledge/gene_sets": "`V/knowledge/gene_sets.parquet` (the GMT sets used)",
    }
    for name, schema in TABLES.items():
        out += [f"## {name}", "", f"Path: {where[name]}", "", "| column | type | description |", "|---|---|---|"]
        for f in schema:
            out.append(f"| `{f.name}` | `{f.type}` | {f.metadata[b'description'].decode()} |")
        out.append("")
    out += ["## manifest", "", "Path: `V/manifest.json`, written when the version is complete (before the pointer).",
            "", "| key | type | description |", "|---|---|---|"]
    for k, (t, doc) in {**MANIFEST_FIELDS, **MANIFEST_OPTIONAL_FIELDS}.items():
        tname = t.__name__ if isinstance(t, type) else "/".join(x.__name__ for x in t)
        out.append(f"| `{k}` | `{tname}` | {doc}{'' if k in MANIFEST_FIELDS else ' (optional)'} |")
    out += ["", "## latest.json", "", "Path: `DIR/latest.json`: `version` (id), `path` (`versions/<id>`), "
            "`created_at`, `content_hash`, `samples_hash`. One small object, replaced atomically (a rename locally, "
            "one PUT on object stores).", ""]
    out.append("")
    return "\n".join(out)
