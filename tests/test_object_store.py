"""Builds into an S3 bucket, for real: a local S3-compatible server (moto's server mode) on 127.0.0.1, reached
through AWS_ENDPOINT_URL as the AWS SDKs and pyarrow do. Two builds, a third that fails halfway, prune,
roll back: `latest` always resolves to a committed version that validates, and nothing committed is lost."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from etl.config import BuildConfig
from etl.pipeline import build
from etl.sources.base import InputError
from etl.storage import Store
from etl.validate import validate
from etl.versions import Versions
from schemas.layout import resolve

BUCKET = "c2s-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server started by PID and stopped the same way; the AWS environment points at it."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.2)
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cfg(census: str, out: str, **kw) -> BuildConfig:
    opts = {"organisms": ["homo_sapiens"], "cells_per_task": 150, "max_genes": 100,
            "tasks": ["cell_type_prediction", "multi_cell_lm"], **kw}
    return BuildConfig(output=out, census_uri=census, **opts)


def test_build_rebuild_failed_build_prune_and_rollback_on_s3(s3, demo_census, tmp_path):
    out = f"s3://{BUCKET}/corpora/c1"
    first = build(_cfg(demo_census, out), None)
    assert validate(out, deep=True)["version"] == first["version"]
    second = build(_cfg(demo_census, out, max_tokens=512), None)  # samples differ: sentences reused
    assert second["sentences_version"] == first["version"] and second["version"] != first["version"]
    assert resolve(out).version == second["version"]
    assert validate(out, deep=True)["content_hash"] == first["content_hash"]

    # a third build fails halfway, after its sentences are written to the bucket: a BioGRID file (read whole
    # only by the samples stage) with a short row
    from pathlib import Path

    head, row = (Path(__file__).resolve().parents[1] / "etl/knowledge/data/demo/BIOGRID-DEMO.tab3.txt").read_text() \
        .splitlines()[:2]
    bad = tmp_path / "broken.tab3.txt"
    bad.write_text(f"{head}\n{row}\n" + "\t".join(row.split("\t")[:4]) + "\n")
    with pytest.raises(InputError, match=r"broken\.tab3\.txt, line 3"):
        build(_cfg(demo_census, out, max_genes=80, biogrid=str(bad),
                   tasks=["cell_type_prediction", "gene_interaction_prediction"]), None)
    v = Versions(out)
    assert resolve(out).version == second["version"]  # latest unchanged
    assert validate(out, deep=True)["samples"]["samples_hash"] == second["samples"]["samples_hash"]
    (unfinished,) = v.unfinished()
    assert Store(out).list(f"versions/{unfinished}/sentences"), "the failed build's parts are in the bucket"
    assert set(v.committed()) == {first["version"], second["version"]}

    # the next successful build removes the unfinished version; prune keeps what the kept version reuses
    third = build(_cfg(demo_census, out, max_tokens=768), None)
    assert not v.unfinished() and third["sentences_version"] == first["version"]
    assert v.prune(1) == [second["version"]]  # first stays: third reuses its sentences
    assert set(v.committed()) == {first["version"], third["version"]}
    assert validate(out, deep=True)["version"] == third["version"]

    # roll back to the first version: one pointer write
    v.use(first["version"], validate)
    assert resolve(out).version == first["version"]
    assert validate(f"{out}/versions/{third['version']}")["version"] == third["version"]  # pinned still reads


@pytest.mark.slow
def test_cli_on_spark_writes_to_s3_and_reports_input_errors_in_one_line(s3, demo_census, tmp_path):
    """The user's path: the build command on Spark local[2], output in a bucket, then a bad option."""
    out = f"s3://{BUCKET}/corpora/cli"
    env = {**os.environ, **s3, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    cmd = [sys.executable, "-m", "etl.build_corpus", "--census-uri", demo_census, "--output", out,
           "--master", "local[2]", "--cells-per-task", "200", "--max-genes", "100",
           "--tasks", "cell_type_prediction,multi_cell_lm"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    m = validate(out, deep=True)
    assert m["counts"]["totals"]["written"] > 0 and m["samples"]["counts"]["total"] > 0
    bad = subprocess.run([*cmd, "--max-cells", "-5"], env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2
    errors = [ln for ln in bad.stderr.splitlines() if "ERROR" in ln]
    assert len(errors) == 1 and "--max-cells must be at least 1" in errors[0] and "Traceback" not in bad.stderr
    assert resolve(out).version == m["version"]


def test_refresh_in_a_bucket_reads_reused_parts_across_versions(s3, tmp_path):
    """A refresh into S3: the unchanged dataset's parts stay in the first version's prefix and are read
    through `../<version>/` (normalised for S3 keys) by validation, the samples stage, the API and pruning."""
    from conftest import write_h5ad

    from c2s.corpus import read_table

    a, _ = write_h5ad(tmp_path / "a.h5ad", n_cells=120, n_genes=40, seed=1)
    b, _ = write_h5ad(tmp_path / "b.h5ad", n_cells=100, n_genes=40, seed=2)
    out = f"s3://{BUCKET}/corpora/refresh"
    opts = {"organism": "human", "cell_type_column": "celltype", "tasks": ["cell_type_prediction"],
            "cells_per_task": 50, "incremental": True}
    first = build(BuildConfig(output=out, h5ad=[a, b], **opts), None)
    write_h5ad(tmp_path / "b.h5ad", n_cells=100, n_genes=40, seed=3)
    second = build(BuildConfig(output=out, h5ad=[a, b], keep_versions=1, **opts), None)
    assert second["refresh"]["unchanged"] == ["homo_sapiens/a"] and second["refresh"]["rebuilt"] == ["homo_sapiens/b"]
    assert {i["version"] for r, i in second["files"].items() if "/a/" in r} == {first["version"]}
    assert set(Versions(out).committed()) == {first["version"], second["version"]}  # a's parts are needed
    assert validate(out, deep=True)["content_hash"] == second["content_hash"]
    full = build(BuildConfig(output=str(tmp_path / "full"), h5ad=[a, b], **opts), None)
    assert second["content_hash"] == full["content_hash"]
    assert second["samples"]["samples_hash"] == full["samples"]["samples_hash"]
    assert len(read_table(out, "sentences", columns=["cell_id"])) == full["counts"]["totals"]["written"]


def test_a_corpus_in_a_bucket_trains_resumes_evaluates_and_generates(s3, demo_census, tmp_path):
    """SFT reads a corpus straight from the bucket (its parts listed and read through pyarrow.fs, tokenised
    into the local cache): the losses equal those of the same corpus copied to local disk, and a resume from
    the bucket continues them. The model's c2s.json names the bucket; evaluation and generation read the
    corpus there: the same report figures as against the local copy, and generated cells."""
    import json
    import shutil

    import pyarrow.fs as pafs

    from training.sft_config import SFTConfig
    from training.sft_trainer import train

    out = f"s3://{BUCKET}/corpora/train"
    build(_cfg(demo_census, out, tasks=["cell_type_prediction", "cell_lm"]), None)
    local = tmp_path / "local"
    pafs.copy_files(f"{BUCKET}/corpora/train", str(local), source_filesystem=pafs.S3FileSystem(
        endpoint_override=os.environ["AWS_ENDPOINT_URL"], access_key="test", secret_key="test", region="us-east-1"))
    common = {"model": "tiny-pythia", "max_steps": 6, "save_steps": 3, "eval_steps": 0, "eval_cells": 2,
              "eval_samples_per_task": 2, "per_device_batch_size": 2, "max_length": 512, "report_to": "none",
              "logging_steps": 1, "warmup_steps": 1, "learning_rate": 3e-3}

    def losses(res):
        return {r["step"]: r["loss"] for r in res.metrics if "loss" in r}

    remote = train(SFTConfig(corpus=out, output_dir=str(tmp_path / "remote"), **common))
    on_disk = train(SFTConfig(corpus=str(local), output_dir=str(tmp_path / "disk"), **common))
    assert losses(remote) == pytest.approx(losses(on_disk), rel=1e-6) and sorted(losses(remote)) == list(range(1, 7))
    card = json.loads((Path(remote.final_dir) / "c2s.json").read_text())
    assert card["corpus"].startswith(f"s3://{BUCKET}/corpora/train")
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "remote" / "checkpoint-3", resumed_dir / "checkpoint-3")
    resumed = train(SFTConfig(corpus=out, output_dir=str(resumed_dir), resume_from_checkpoint="latest", **common))
    got = losses(resumed)
    assert sorted(got) == [4, 5, 6] and got == pytest.approx({s: losses(remote)[s] for s in got}, rel=1e-6)

    import anndata as ad

    from evaluation.evaluate import main as evaluate
    from generation.generate import main as generate

    reports = {}
    for name, corpus in (("bucket", out), ("disk", str(local))):
        report = tmp_path / f"eval_{name}" / "report.json"
        assert evaluate(["--model", remote.final_dir, "--corpus", corpus, "--split", "test", "--n-per-condition", "4",
                         "--max-samples", "6", "--max-conditions", "2", "--no-plots", "--out", str(report)]) == 0
        reports[name] = json.loads(report.read_text())
    assert reports["bucket"]["corpus"] == out
    assert reports["bucket"]["cell_type_accuracy"] == reports["disk"]["cell_type_accuracy"]
    cells = tmp_path / "gen.h5ad"
    assert generate(["--model", remote.final_dir, "--task", "cell_lm", "--n", "4", "--batch-size", "4",
                     "--out", str(cells), "--no-progress"]) == 0  # the corpus: the bucket, from c2s.json
    assert ad.read_h5ad(cells).n_obs == 4
