"""The schema module as the single source of truth, and the command line built from the config."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

import schemas
from etl.config import BuildConfig
from etl.sources.base import InputError
from schemas.cli import parse

ROOT = Path(__file__).resolve().parents[1]


def test_docs_are_generated_from_the_schemas():
    assert (ROOT / "docs" / "SCHEMAS.md").read_text() == schemas.markdown(), "run: python -m schemas > docs/SCHEMAS.md"


def test_spark_schema_is_derived():
    spark_schema = schemas.to_spark(schemas.SENTENCES)
    assert spark_schema.fieldNames() == schemas.SENTENCES.names
    assert spark_schema["genes"].dataType.simpleString() == "array<string>"


def test_check_and_conform_name_what_differs():
    bad = pa.schema([pa.field("cell_id", pa.string()), pa.field("genes", pa.list_(pa.int32()))])
    with pytest.raises(schemas.SchemaMismatch, match=r"x\.parquet: .*missing soma_joinid.*genes"):
        schemas.check(bad, schemas.SENTENCES, "x.parquet")
    with pytest.raises(schemas.SchemaMismatch, match="missing column"):
        schemas.conform(pa.table({"cell_id": ["a"]}), schemas.SENTENCES, "t")
    with pytest.raises(schemas.SchemaMismatch, match="run_key: missing"):
        schemas.check_manifest({"schema_version": schemas.SCHEMA_VERSION}, "m")


def test_cli_defaults_yaml_and_overrides(tmp_path):
    cfg = parse(BuildConfig, [], "d")
    assert cfg.source_kind == "demo" and cfg.max_genes == 2048 and cfg.obs_filter == "is_primary_data == True"
    yml = tmp_path / "b.yaml"
    yml.write_text("census_uri: /data/census\nmax_genes: 100\norganisms: [mus_musculus]\n")
    cfg = parse(BuildConfig, ["--config", str(yml), "--max-genes", "50", "--organisms", "homo_sapiens,mus_musculus"], "d")
    assert cfg.census_uri == "/data/census" and cfg.max_genes == 50
    assert cfg.organisms == ["homo_sapiens", "mus_musculus"] and cfg.source_kind == "census"
    with pytest.raises(InputError, match="unknown stage"):
        parse(BuildConfig, ["--stages", "nope"], "d")
    with pytest.raises(InputError, match="not both"):
        parse(BuildConfig, ["--h5ad", "a.h5ad", "--census-uri", "x"], "d")


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        parse(BuildConfig, ["--help"], "desc")
    out = capsys.readouterr().out
    assert "--census-version" in out and "--max-genes" in out and "(default: 2048)" in out
