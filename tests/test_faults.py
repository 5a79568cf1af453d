"""Faults injected from the test: a Python worker and then the driver killed mid-build (by PID), a training
run killed mid-run, a full disk. Each time: nothing committed is lost, `latest` never names a half-built
version, and the rerun ends where an uninterrupted run ends."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import write_h5ad

from etl.build_corpus import main as build_main
from etl.config import BuildConfig
from etl.pipeline import build
from etl.validate import validate
from etl.versions import Versions
from schemas.layout import resolve

ROOT = Path(__file__).resolve().parents[1]


def _h5ad(files: list[str]) -> list[str]:
    return [x for f in files for x in ("--h5ad", f)]


def _pointer(out: str) -> str | None:
    p = Path(out, "latest.json")
    try:
        return json.loads(p.read_text())["version"] if p.exists() else None
    except (json.JSONDecodeError, OSError):  # never half-written: a rename
        raise AssertionError("latest.json was read half-written") from None


def _leftovers(out: str) -> list[str]:
    return [str(p) for p in Path(out).rglob("*") if ".tmp-" in p.name]


def _python_workers(root_pid: int) -> list[psutil.Process]:
    """pyspark's forked Python workers under a spark-submit process tree (children of pyspark.daemon)."""
    out = []
    with contextlib.suppress(psutil.NoSuchProcess):
        for p in psutil.Process(root_pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                if "pyspark.daemon" in " ".join(p.cmdline()) and p.parent() is not None and \
                        "pyspark.daemon" in " ".join(p.parent().cmdline()):
                    out.append(p)
    return out


@pytest.mark.slow
def test_kill_a_worker_then_the_driver_mid_build_then_rerun(tmp_path):
    from etl.demo import build_demo_census

    census = build_demo_census(str(tmp_path / "census"), n_cells=6000, n_genes=400, mean_nnz=90, seed=5)
    out = str(tmp_path / "corpus")
    # a committed version first: the killed build must never replace it with a half-built one
    build(BuildConfig(output=out, census_uri=census, cells_per_task=2000, stages=["sentences"], max_genes=50))
    v1 = _pointer(out)
    submit = Path(sys.executable).parent / "spark-submit"
    # local[2,4]: local mode retries a failed task only when given a max-failures count (as clusters do)
    args = [str(submit), "--master", "local[2,4]", "--conf", "spark.ui.enabled=false", "etl/build_corpus.py",
            "--census-uri", census, "--cells-per-task", "40", "--block-cells", "20", "--stages", "sentences",
            "--output-dir", out]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    killed_worker = False
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 300:
            assert _pointer(out) == v1  # readers see the committed version throughout
            markers = list(Path(out, "versions").glob("*/_work/tasks/*/*/*.npz"))
            if not killed_worker and len(markers) >= 5:
                workers = _python_workers(proc.pid)
                if workers:
                    workers[0].send_signal(signal.SIGKILL)  # a Python worker dies: Spark retries its task
                    killed_worker = True
            if killed_worker and len(markers) >= 40:
                os.killpg(proc.pid, signal.SIGKILL)  # the driver (and its JVM and workers) dies mid-build
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.05)
        else:
            raise AssertionError("the build did not reach 40 finished tasks in 300 s")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert killed_worker
    assert _pointer(out) == v1
    validate(out, deep=True)  # the committed version is intact
    unfinished = Versions(out).unfinished()
    assert len(unfinished) == 1

    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    m = validate(out, deep=True)
    assert m["version"] == unfinished[0] and m["tasks"]["resumed"] >= 40  # finished tasks were reused
    assert Versions(out).unfinished() == [] and _leftovers(out) == []
    # the uninterrupted build, in its own process (one process per build, as a user runs it)
    clean = subprocess.run([str(Path(sys.executable).parent / "c2s"), "build", "--census-uri", census,
                            "--cells-per-task", "40", "--block-cells", "20", "--stages", "sentences", "--spark",
                            "false", "--output-dir", str(tmp_path / "clean")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert m["content_hash"] == json.loads(clean.stdout.splitlines()[-1])["content_hash"]


@pytest.mark.slow
def test_ctrl_c_on_a_spark_build_is_one_line_and_the_rerun_resumes(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group: driver, JVM and workers) mid Spark job: our one line,
    exit 130, none of py4j's tracebacks; the committed version stays what readers see; the rerun resumes."""
    from etl.demo import build_demo_census

    census = build_demo_census(str(tmp_path / "census"), n_cells=3000, n_genes=400, mean_nnz=90, seed=6)
    out = str(tmp_path / "corpus")
    build(BuildConfig(output=out, census_uri=census, cells_per_task=3000, stages=["sentences"], max_genes=50))
    v1 = _pointer(out)
    args = [str(Path(sys.executable).parent / "c2s"), "build", "--census-uri", census, "--spark", "true",
            "--cells-per-task", "40", "--block-cells", "20", "--stages", "sentences", "--output-dir", out]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    env.pop("PYSPARK_SUBMIT_ARGS", None)
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        t0 = time.monotonic()
        while len(list(Path(out, "versions").glob("*/_work/tasks/*/*/*.npz"))) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() - t0 < 300, "the Spark build did not start its tasks in 300 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    err = err.decode()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "py4j" not in err, err[-3000:]
    errors = [ln for ln in err.splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and "interrupted; the committed corpus is unchanged" in errors[0], errors
    assert _pointer(out) == v1
    validate(out)
    rerun = build(BuildConfig(output=out, census_uri=census, cells_per_task=40, block_cells=20,
                              stages=["sentences"]))
    assert rerun["tasks"]["resumed"] >= 1 and _pointer(out) == rerun["version"] != v1


@pytest.mark.slow
def test_kill_a_training_run_mid_step_and_resume(train_corpus, tmp_path):
    """SIGKILL after a checkpoint (the run is mid-step, past it); resume from `latest`: the same step count
    and the same final loss as a run that never stopped."""
    base = [sys.executable, "-m", "training.sft", "--corpus", train_corpus, "--model", "tiny-pythia",
            "--save-steps", "6", "--eval-steps", "0", "--eval-cells", "0", "--report-to", "none",
            "--logging-steps", "1", "--max-length", "512", "--per-device-batch-size", "2",
            "--warmup-steps", "2", "--max-steps", "18", "--learning-rate", "3e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "uninterrupted"
    r = subprocess.run([*base, "--output-dir", str(ref)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen([*base, "--output-dir", str(out)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        t0 = time.monotonic()
        while not (out / "checkpoint-6").exists() or not _logged_past(out, 8):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() - t0 < 300
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert not (out / "final").exists()
    r = subprocess.run([*base, "--output-dir", str(out), "--resume-from-checkpoint", "latest"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    def losses(folder: Path) -> dict[int, float]:
        recs = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        return {rec["step"]: rec["loss"] for rec in recs if "loss" in rec}

    want, got = losses(ref), losses(out)
    assert sorted(got) == sorted(want) == list(range(1, 19))
    assert got[18] == pytest.approx(want[18], abs=1e-5)
    assert (out / "final" / "config.json").exists()


def _logged_past(out: Path, step: int) -> bool:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return False
    return any(json.loads(x).get("step", 0) >= step for x in lines if x.strip().endswith("}"))


# ------------------------------------------------------------------------------------------- full disk


@contextlib.contextmanager
def _small_device(path: Path, size_kib: int):
    """A size-limited tmpfs at `path` where the machine allows mounting one (root), else None."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        yield None
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.parametrize("device", ["tmpfs", "failing-store"])
def test_a_full_disk_fails_with_one_line_and_keeps_the_previous_version(device, tmp_path, capsys, monkeypatch):
    """`tmpfs`: a real 1.5 MiB file system (where the machine lets the test mount one; else it runs as the
    other case); `failing-store`: every write into a new version raises ENOSPC, as a full disk does."""
    a, _ = write_h5ad(tmp_path / "a.h5ad", n_cells=200, n_genes=80, seed=1)
    big, _ = write_h5ad(tmp_path / "big.h5ad", n_cells=4000, n_genes=400, seed=2)
    opts = ["--organism", "human", "--cell-type-column", "celltype", "--tasks", "cell_type_prediction",
            "--no-spark"]
    with _small_device(tmp_path / "dev", 1536) if device == "tmpfs" else contextlib.nullcontext() as dev:
        out = str((dev or tmp_path) / "corpus")
        assert build_main([*_h5ad([a]), *opts, "--output-dir", out]) == 0
        v1 = _pointer(out)
        if dev is None:  # no file system of a fixed size here: parquet writes fail as on a full disk
            import errno

            import pyarrow.parquet as pq

            def full(self, *args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
        capsys.readouterr()
        rc = build_main([*_h5ad([a, big]), *opts, "--output-dir", out])
        err = capsys.readouterr().err
        errors = [ln for ln in err.splitlines() if " ERROR " in ln]
        assert rc == 2, err[-2000:]
        assert len(errors) == 1 and "no space left on the device writing" in errors[0], err[-2000:]
        assert "--output-dir" in errors[0] and "Traceback" not in err
        assert _pointer(out) == v1
        monkeypatch.undo()
        validate(out, deep=True)
        assert resolve(out).version == v1
        assert _leftovers(out) == []  # no half-written file stays behind
