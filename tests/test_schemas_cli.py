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
    cfg = parse(BuildConfig, ["--demo"], "d")
    assert cfg.source_kind == "demo" and cfg.max_genes == 2048 and cfg.obs_filter == "is_primary_data == True"
    assert cfg.output == "demo/corpus"  # the demo goes into a folder named for it, not ./corpus
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


def test_no_source_is_an_error_that_says_what_to_give():
    """Forgetting --h5ad must not build the demo into the user's output."""
    with pytest.raises(InputError, match=r"no cells to read: give --h5ad.*--demo"):
        parse(BuildConfig, ["--output-dir", "mine"], "d")
    # a samples-only rebuild reads the cells of the corpus it extends: no source needed
    assert parse(BuildConfig, ["--stages", "samples", "--output-dir", "mine"], "d").source_kind == "none"
    with pytest.raises(InputError, match="--demo builds the generated demo"):
        parse(BuildConfig, ["--demo", "--h5ad", "x.h5ad"], "d")


def test_one_spelling_path_for_flags_yaml_aliases_and_hf_underscores(tmp_path):
    yml = tmp_path / "b.yaml"
    yml.write_text("census_uri: /c\nstages: sentences\nmax_genes: 1e3\noutput: old_name\nuppercase: false\n")
    cfg = parse(BuildConfig, ["--config", str(yml)], "d")
    assert cfg.stages == ["sentences"] and cfg.max_genes == 1000 and cfg.output == "old_name"
    assert cfg.uppercase is False
    cfg = parse(BuildConfig, ["--census_uri=/c", "--output_dir", "new", "--max_genes", "7", "--no-spark"], "d")
    assert (cfg.census_uri, cfg.output, cfg.max_genes, cfg.spark) == ("/c", "new", 7, False)
    assert parse(BuildConfig, ["--census-uri", "/c", "--output", "legacy"], "d").output == "legacy"
    yml.write_text("census_uri: /c\noutput: a\noutput_dir: b\n")
    with pytest.raises(InputError, match="given twice"):
        parse(BuildConfig, ["--config", str(yml)], "d")
    yml.write_text("census_uri: /c\nmax_genes: lots\n")
    with pytest.raises(InputError, match="max_genes: expected an integer, got 'lots'"):
        parse(BuildConfig, ["--config", str(yml)], "d")


def test_help_is_grouped_and_lists_tasks(capsys):
    with pytest.raises(SystemExit) as e:
        parse(BuildConfig, ["--help"], "desc", prog="c2s build")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: c2s build [options]")
    for title in ("output:", "Census source:", "h5ad source:", "encoding:", "Spark, files and logging:",
                  "samples: knowledge:", "samples: perturbation:", "samples: tasks, token budget, splits:", "demo:"):
        assert f"\n{title}\n" in out, title
    assert out.index("--census-version") < out.index("h5ad source:") < out.index("--cell-type-column")
    assert "--no-uppercase turns it off" in out and "--output-dir DIR, --output DIR" in out


def test_negative_numbers_are_values_not_options():
    """`--learning-rate -1e-3` reached argparse as an option and failed as a missing value (issue #21); every
    negative number form now reaches the one conversion, which accepts or refuses it with its own message."""
    from dataclasses import dataclass

    from schemas.cli import option

    @dataclass
    class Toy:
        rate: float = option(0.1, "a rate")
        shift: float = option(0.0, "a shift")
        steps: int = option(1, "steps")

    for text, want in (("-1e-3", -1e-3), ("-2.5E+2", -250.0), ("-.5", -0.5), ("-3", -3.0), ("-inf", float("-inf"))):
        cfg = parse(Toy, ["--rate", text, "--shift", "-7"], "toy")
        assert cfg.rate == want and cfg.shift == -7.0
    assert parse(Toy, ["--rate=-1e-3"], "toy").rate == -1e-3
    with pytest.raises(SystemExit):  # a value that is no number is still not taken for one
        parse(Toy, ["--rate", "-x"], "toy")


def test_a_bad_task_weight_is_one_line_naming_the_option(capsys, caplog, tmp_path):
    from training.sft import main

    with caplog.at_level("ERROR"):
        assert main(["--corpus", str(tmp_path), "--model", "tiny-pythia", "--output-dir", str(tmp_path / "o"),
                     "--tasks", "cell_type_prediction=abc"]) == 2
    said = caplog.text + capsys.readouterr().err
    assert "--tasks" in said and "'abc'" in said
