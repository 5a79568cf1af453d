"""The project's table schemas: the single source of truth for writers, validators, Spark and docs."""

from schemas.tables import (
    INVERSE_TRANSFORM,
    LABEL_COLUMNS,
    MANIFEST_FIELDS,
    SCHEMA_VERSION,
    SENTENCES,
    TABLES,
    UNKNOWN,
    VOCAB,
    SchemaMismatch,
    check,
    check_manifest,
    conform,
    markdown,
    to_spark,
)

__all__ = [
    "INVERSE_TRANSFORM",
    "LABEL_COLUMNS",
    "MANIFEST_FIELDS",
    "SCHEMA_VERSION",
    "SENTENCES",
    "TABLES",
    "UNKNOWN",
    "VOCAB",
    "SchemaMismatch",
    "check",
    "check_manifest",
    "conform",
    "markdown",
    "to_spark",
]
