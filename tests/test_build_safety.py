"""The build off the demo path: exact Census samples, run keys that follow the code, content hashes of rows,
one validation path for flags and config files, and builds that never lose what was committed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import tiledbsoma as soma

from etl import manifest as mf
from etl.build_corpus import main
from etl.config import BuildConfig
from etl.pipeline import build
from etl.sources.base import InputError
from etl.stages import sentences
from etl.storage import Store
from etl.validate import validate
from schemas.cli import ConfigError, parse
from schemas.layout import resolve
from tests.conftest import corpus_path, write_h5ad


def _primary(uri: str, organism: str) -> np.ndarray:
    """Joinids of the cells the default filter selects, read straight from the collection."""
    with soma.open(f"{uri}/census_data/{organism}") as exp:
        obs = exp.obs.read(column_names=["soma_joinid", "is_primary_data"]).concat().to_pandas()
    return np.sort(obs.loc[obs["is_primary_data"], "soma_joinid"].to_numpy())


def _written(out: str) -> pads.Dataset:
    return pads.dataset(corpus_path(out, "sentences"), format="parquet", partitioning="hive").to_table(
        columns=["organism", "soma_joinid"])


# ---------------------------------------------------------------------------------------- Census samples


def test_max_cells_on_a_census_reads_exactly_the_sample(demo_census, tmp_path):
    n = 120
    out = str(tmp_path / "c")
    m = build(BuildConfig(output=out, census_uri=demo_census, max_cells=n, cells_per_task=50, stages=["sentences"]))
    for org, counts in m["counts"]["organisms"].items():
        per_ds = counts["datasets"].values()
        planned, read = sum(d["planned"] for d in per_ds), sum(d["read"] for d in per_ds)
        written = sum(d["written"] for d in per_ds)
        skipped = sum(sum(d["skipped"].values()) for d in per_ds)
        assert planned == read == n, (org, planned, read)  # today's bug: every cell between the sampled ids
        assert written + skipped == n
        ids = _written(out).filter(pads.field("organism") == org)["soma_joinid"].to_numpy()
        assert len(ids) == written and len(set(ids)) == len(ids)
        assert np.isin(ids, _primary(demo_census, org)).all()  # sampled among the filtered cells only


def test_a_task_that_reads_other_cells_than_planned_fails_loudly(demo_census, tmp_path, monkeypatch):
    real = sentences._READERS["census"]

    def lossy(task, **kw):
        blocks = list(real(task, **kw))
        yield from blocks[:-1] if task.index == 1 else blocks  # one task loses its last block

    monkeypatch.setitem(sentences._READERS, "census", lossy)
    with pytest.raises(InputError, match=r"read \d+ cells, the plan selected \d+"):
        build(BuildConfig(output=str(tmp_path / "c"), census_uri=demo_census, organisms=["homo_sapiens"],
                          cells_per_task=100, block_cells=40, stages=["sentences"]))


# ---------------------------------------------------------------------------------------- run keys, hashes


def _kill_after(monkeypatch, calls: int) -> None:
    real = sentences.Encoder.encode
    seen = {"n": 0}

    def dying(self, *a, **k):
        seen["n"] += 1
        if seen["n"] == calls:
            raise KeyboardInterrupt("killed")
        return real(self, *a, **k)

    monkeypatch.setattr(sentences.Encoder, "encode", dying)


def test_a_changed_encoder_never_reuses_parts(demo_census, tmp_path, monkeypatch):
    kw = dict(census_uri=demo_census, organisms=["homo_sapiens"], cells_per_task=100, block_cells=40,
              stages=["sentences"])
    out = str(tmp_path / "c")
    first = build(BuildConfig(output=out, **kw))
    with monkeypatch.context() as mp:
        _kill_after(mp, 5)
        with pytest.raises(KeyboardInterrupt):
            build(BuildConfig(output=out, force=True, **kw))  # an unfinished version with finished tasks
    monkeypatch.setattr(mf, "ENCODER_VERSION", mf.ENCODER_VERSION + 100)  # the encoder changed
    again = build(BuildConfig(output=out, **kw))
    assert again["version"] != first["version"], "a build by an older encoder counted as current"
    assert again["tasks"]["resumed"] == 0, "parts written by an older encoder were reused"
    assert again["run_key"] != first["run_key"] and again["formats"]["encoder"] == mf.ENCODER_VERSION


@pytest.mark.spark
def test_content_hash_is_a_function_of_the_rows(spark, demo_census, tmp_path):
    """Other --cells-per-task, Spark local[2] against this process: the same rows, the same hashes."""
    kw = dict(census_uri=demo_census, max_genes=60, tasks=["cell_type_prediction", "multi_cell_lm"])
    a = build(BuildConfig(output=str(tmp_path / "a"), cells_per_task=90, block_cells=32, **kw), spark)
    b = build(BuildConfig(output=str(tmp_path / "b"), cells_per_task=1000, **kw), None)
    assert len(a["files"]) > len(b["files"])
    assert a["content_hash"] == b["content_hash"]
    assert a["samples"]["samples_hash"] == b["samples"]["samples_hash"]
    c = build(BuildConfig(output=str(tmp_path / "c"), cells_per_task=1000, **{**kw, "max_genes": 59}), None)
    assert c["content_hash"] != b["content_hash"]  # and it does see the rows


def test_leftovers_of_a_killed_write_never_reach_a_committed_version(demo_census, tmp_path, monkeypatch):
    kw = dict(census_uri=demo_census, organisms=["mus_musculus"], cells_per_task=60, block_cells=30,
              stages=["sentences"])
    out = str(tmp_path / "c")
    with monkeypatch.context() as mp:
        _kill_after(mp, 3)
        with pytest.raises(KeyboardInterrupt):
            build(BuildConfig(output=out, **kw))
    store = Store(out)
    (vid,) = store.dirs("versions")
    part_dir = sorted(store.dirs(f"versions/{vid}/sentences/mus_musculus"))[0]
    stray = f"versions/{vid}/sentences/mus_musculus/{part_dir}/.part-00007.parquet.tmp-dead"
    store.write_bytes(stray, b"PAR1")  # what a SIGKILL during a part write leaves (no cleanup runs)
    m = build(BuildConfig(output=out, **kw))
    assert m["version"] == vid and m["tasks"]["resumed"] > 0
    assert not any(".tmp-" in p for p in store.list("versions"))
    validate(out, deep=True)


# ---------------------------------------------------------------------------------------- nothing lost


def test_an_input_inside_the_output_survives_and_samples_only_uses_the_manifest(tmp_path, caplog):
    out = tmp_path / "corpus"
    (out / "samples").mkdir(parents=True)
    path, _ = write_h5ad(out / "samples" / "mine.h5ad", n_cells=60, n_genes=30)  # where old builds deleted it
    kw = dict(output=str(out), h5ad=[path], cell_type_column="celltype", max_genes=40)
    build(BuildConfig(**kw, stages=["sentences"]))
    assert Path(path).exists()
    # samples only, no source flags: what it uses comes from the corpus's manifest, never the demo's files
    m = build(BuildConfig(output=str(out), stages=["samples"]))
    assert Path(path).exists()
    s = m["samples"]
    assert not any(s["inputs"].get(k) for k in ("biogrid", "cellphonedb", "abstracts", "gene_sets", "perturbation"))
    assert s["tasks"]["perturbation_prediction"]["status"] == "skipped"
    assert s["tasks"]["gene_set_naming"]["status"] == "skipped"
    assert m["sentences_version"] != m["version"]  # the sentences are the earlier version's, not a copy
    assert not Store(corpus_path(str(out))).exists("sentences")


def test_a_legacy_corpus_is_read_and_migrated_on_request(tmp_path, capsys):
    from etl import versions

    path, _ = write_h5ad(tmp_path / "a.h5ad", n_cells=40, n_genes=20)
    out = str(tmp_path / "c")
    m = build(BuildConfig(output=out, h5ad=[path], cell_type_column="celltype", max_genes=30))
    # lay it out as builds before versions did: tables and manifest.json at the top of DIR
    legacy = tmp_path / "legacy"
    os.rename(corpus_path(out), legacy)
    import json

    manifest = json.loads((legacy / "manifest.json").read_text())
    for k in ("version", "sentences_version"):  # what manifests before versions lacked
        manifest.pop(k)
    (legacy / "manifest.json").write_text(json.dumps(manifest))
    assert resolve(str(legacy)).version is None and validate(str(legacy))  # still readable, as it was
    with pytest.raises(InputError, match=r"layout before versions.*python -m etl\.versions migrate"):
        build(BuildConfig(output=str(legacy), h5ad=[path], cell_type_column="celltype", max_genes=30))
    assert versions.main(["migrate", str(legacy)]) == 0
    assert validate(str(legacy), deep=True)["content_hash"] == m["content_hash"]
    assert not (legacy / "manifest.json").exists() and not (legacy / "sentences").exists()


# ---------------------------------------------------------------------------------------- configuration


def test_config_file_values_pass_the_same_checks_as_flags(tmp_path):
    def cfg(text: str, *flags: str) -> BuildConfig:
        (tmp_path / "c.yaml").write_text(text)
        return parse(BuildConfig, ["--config", str(tmp_path / "c.yaml"), *flags], "d")

    c = cfg('max_cells: "100"\ntokens_per_gene: "3.5"\norganisms: homo_sapiens,mus_musculus\ncensus_version: 2025-11-08\n')
    assert (c.max_cells, c.tokens_per_gene, c.organisms) == (100, 3.5, ["homo_sapiens", "mus_musculus"])
    assert c.census_version == "2025-11-08"  # YAML reads it as a date; the option is a string
    for text, says in (("on_invalid: raise\n", "'raise' is not one of skip, error"),
                       ("max_cells: 1.5\n", "expected an integer, got 1.5"),
                       ("max_cells: [1]\n", "expected an integer"), ("uppercase: maybe\n", "expected true or false"),
                       ("force: 1\n", "expected true or false"), ("split_key: cells\n", "not one of donor, dataset")):
        with pytest.raises(ConfigError, match=says):
            cfg(text)
    with pytest.raises(ConfigError, match="--on-invalid: 'raise' is not one of skip, error"):
        parse(BuildConfig, ["--on-invalid", "raise"], "d")  # the same words for a flag
    with pytest.raises(InputError, match="--max-cells must be at least 1"):
        cfg("max_cells: -4\n")
    assert cfg("max-genes: 7\n", "--max-genes", "9", "--demo").max_genes == 9  # flags override the file


@pytest.mark.spark
def test_an_input_error_in_a_spark_task_is_one_line_without_retries(spark, tmp_path, capfd):
    x_path, _ = write_h5ad(tmp_path / "late_nan.h5ad", n_cells=900, n_genes=30, seed=3)
    import anndata as ad

    a = ad.read_h5ad(x_path)
    dense = a.X.toarray()
    dense[800, 5] = np.nan  # past the rows the driver probes: the error is raised inside a Spark task
    a.X = dense
    a.write_h5ad(x_path)
    rc = main(["--h5ad", x_path, "--cell-type-column", "celltype", "--output", str(tmp_path / "o"),
               "--on-invalid", "error", "--cells-per-task", "300", "--stages", "sentences"])
    err = capfd.readouterr().err
    assert rc == 2
    errors = [ln for ln in err.splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and "late_nan.h5ad" in errors[0] and "cell-800" in errors[0], err[-3000:]
    assert "Traceback" not in err and "Py4JJavaError" not in err and "Lost task" not in err


@pytest.mark.spark
def test_spark_builds_log_progress(spark, demo_census, tmp_path, caplog, monkeypatch):
    import etl.spark

    monkeypatch.setattr(etl.spark, "PROGRESS_INTERVAL_S", 0.05)
    with caplog.at_level("INFO", logger="etl"):
        build(BuildConfig(output=str(tmp_path / "o"), census_uri=demo_census, cells_per_task=100,
                          tasks=["cell_type_prediction"]), spark)
    assert "sentences: done" in caplog.text and "cells/s" in caplog.text
    assert "samples: done" in caplog.text


@pytest.mark.slow
def test_spark_submit_census_sample_exact_and_hash_equal_across_masters(demo_census, tmp_path):
    """The command a user runs: spark-submit on local[1], a Census sample; the in-process build with other
    task sizes gives the same content hash."""
    n = 100
    out = str(tmp_path / "submit")
    submit = Path(sys.executable).parent / "spark-submit"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    done = subprocess.run([str(submit), "--master", "local[1]", "etl/build_corpus.py", "--census-uri", demo_census,
                           "--max-cells", str(n), "--cells-per-task", "40", "--stages", "sentences", "--output", out],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    m = validate(out, deep=True)
    for counts in m["counts"]["organisms"].values():
        d = counts["datasets"].values()
        assert sum(x["planned"] for x in d) == sum(x["read"] for x in d) == n
        assert sum(x["written"] for x in d) + sum(sum(x["skipped"].values()) for x in d) == n
    local = build(BuildConfig(output=str(tmp_path / "local"), census_uri=demo_census, max_cells=n,
                              cells_per_task=1000, stages=["sentences"]))
    assert local["content_hash"] == m["content_hash"]


# ---------------------------------------------------------------------------------------- the validator


def test_deep_validation_finds_changed_rows_foreign_cells_and_split_leaks(tmp_path, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from etl import validate as v

    path, _ = write_h5ad(tmp_path / "a.h5ad", n_cells=120, n_genes=30, seed=2)
    out = str(tmp_path / "c")
    build(BuildConfig(output=out, h5ad=[path], cell_type_column="celltype", max_genes=30, split_key="cell",
                      tasks=["cell_type_prediction", "cell_lm"]))
    assert v.main([out, "--deep"]) == 0
    st = Store(corpus_path(out))
    part = st.list("sentences", ".parquet")[0]
    original = st.read_bytes(part)

    def rewrite(rel: str, change) -> None:
        t = pq.read_table(st.path(rel))
        pq.write_table(change(t), st.path(rel))

    # one gene swapped in one sentence, same row count: only the deep check sees it
    def swap(t):
        genes = t["genes"].to_pylist()
        genes[0] = genes[0][1:2] + genes[0][:1] + genes[0][2:]
        return t.set_column(t.schema.get_field_index("genes"), "genes", pa.array(genes, t.schema.field("genes").type))

    rewrite(part, swap)
    size = Path(st.path(part)).stat().st_size
    m = st.read_json("manifest.json")
    m["files"][part]["bytes"] = size  # a tamperer who fixed the size too
    st.write_json("manifest.json", m)
    v.validate(out)  # the shallow check passes
    with pytest.raises(v.CorpusInvalid, match="its rows hash to"):
        v.validate(out, deep=True)
    st.write_bytes(part, original)
    m["files"][part]["bytes"] = len(original)
    st.write_json("manifest.json", m)

    samples = st.list("samples/cell_lm", ".parquet")
    train = next(p for p in samples if "/train/" in p)
    val = next(p for p in st.list("samples", ".parquet") if "/val/" in p)
    kept = {p: st.read_bytes(p) for p in (train, val)}
    m = st.read_json("manifest.json")

    def fix_manifest(rel: str) -> None:
        mm = st.read_json("manifest.json")
        mm["samples"]["files"][rel]["bytes"] = Path(st.path(rel)).stat().st_size
        st.write_json("manifest.json", mm)

    # a sample that names a cell the corpus does not have
    rewrite(train, lambda t: t.set_column(t.schema.get_field_index("cell_ids"), "cell_ids",
                                          pa.array([["no-such-cell"], *t["cell_ids"].to_pylist()[1:]],
                                                   t.schema.field("cell_ids").type)))
    fix_manifest(train)
    with pytest.raises(v.CorpusInvalid, match="not in the corpus's sentences"):
        v._deep_cells(resolve(out))
    st.write_bytes(train, kept[train])
    fix_manifest(train)  # its size as it was again (the shallow check compares sizes)
    # a val sample that uses a train cell
    train_cell = pq.read_table(st.path(train))["cell_ids"].to_pylist()[0]
    rewrite(val, lambda t: t.set_column(t.schema.get_field_index("cell_ids"), "cell_ids",
                                        pa.array([train_cell, *t["cell_ids"].to_pylist()[1:]],
                                                 t.schema.field("cell_ids").type)))
    fix_manifest(val)
    with pytest.raises(v.CorpusInvalid, match="a cell appears in two splits"):
        v._deep_cells(resolve(out))
    assert v.main([out, "--deep"]) == 1  # the CLI: non-zero, naming the first mismatch
    assert "invalid: samples/cell_lm/val" in caplog.text
    assert v.main([str(tmp_path / "nothing")]) == 2


def test_gene_sets_only_name_corpus_genes_and_no_two_samples_are_alike(tmp_path):
    path, _ = write_h5ad(tmp_path / "a.h5ad", n_cells=60, n_genes=30, seed=4)  # symbols GENE0..GENE29
    gmt = tmp_path / "sets.gmt"
    gmt.write_text("MIXED\td\tGENE1\tGENE2\tNOT_A_GENE\nNONE\td\tFOO1\tBAR2\n")
    m = build(BuildConfig(output=str(tmp_path / "c"), h5ad=[path], cell_type_column="celltype", max_genes=30,
                          gene_sets=[str(gmt)], tasks=["gene_set_naming", "gene_set_enumeration"],
                          mixture=["gene_set_naming=6", "gene_set_enumeration=6"]))
    k = m["samples"]["knowledge"]["gene_sets"]
    assert (k["sets"], k["sets_used"], k["sets_without_corpus_genes"], k["genes_not_in_vocabulary"]) == (2, 1, 1, 3)
    rows = pads.dataset(corpus_path(str(tmp_path / "c"), "samples"), format="parquet").to_table().to_pylist()
    assert rows and all("FOO1" not in r["completion"] + r["prompt"] for r in rows)
    assert all("NOT_A_GENE" not in r["completion"] + r["prompt"] for r in rows)
    pairs = [(r["prompt"], r["completion"]) for r in rows]
    assert len(set(pairs)) == len(pairs) == 12  # 6 draws per task, each with its own template


def test_rebuilds_say_whether_anything_changed_and_reuse_an_identical_version(tmp_path, capsys):
    import json

    from etl import versions

    path, _ = write_h5ad(tmp_path / "a.h5ad", n_cells=60, n_genes=30, seed=5)
    out = str(tmp_path / "c")
    argv = ["--h5ad", path, "--cell-type-column", "celltype", "--output", out, "--spark", "false",
            "--tasks", "cell_lm"]

    def result(*extra) -> dict:
        assert main([*argv, *extra]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    first = result()
    assert first["changed"] and first["planned"] == first["read"] == 60 and first["samples"] > 0
    assert not result()["changed"]  # current: nothing to do
    other = result("--max-tokens", "512")
    assert other["changed"] and other["sentences_version"] == first["version"]
    back = result()  # back to the first options: the first version already holds them
    assert back["version"] == first["version"] and back["changed"]
    assert len(Store(out).dirs("versions")) == 2
    assert versions.main(["list", str(tmp_path / "nowhere")]) == 2
