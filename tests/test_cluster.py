"""A real Spark standalone cluster on 127.0.0.1: a master and a worker started from pyspark's own launcher,
`spark-submit etl/build_corpus.py --master spark://...` with the project shipped to executors as a zip
(`--py-files`, the documented way), and the corpus compared with a local[2] build of the same source.

The executors run an interpreter that can import the project's dependencies but not the project itself (a
venv whose site-packages points at the test venv's, without its editable-install hook), so a build that
passes read every line of etl/ from the zip, not from the driver's working directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from etl.config import BuildConfig
from etl.pipeline import build
from etl.validate import validate

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[:3]} exited {proc.returncode}: {path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not in {path} after {timeout} s: {path.read_text(errors='replace')[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop a daemon by its PID (TERM, then KILL)."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def pyfiles(tmp_path_factory) -> Path:
    """The project as executors get it: the wheel `pip wheel` builds, as the zip --py-files takes."""
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    wheel = next(out.glob("c2s_corpus-*.whl"))
    zip_path = out / "c2s_corpus.zip"  # a wheel is a zip of the package tree; Spark adds .zip files to sys.path
    shutil.copy(wheel, zip_path)
    return zip_path


@pytest.fixture(scope="module")
def executor_python(tmp_path_factory) -> Path:
    """An interpreter with the dependencies but without the project (no editable-install hook)."""
    env_dir = tmp_path_factory.mktemp("executor-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # a plain path line: the directory joins sys.path, but the .pth files inside it (the editable hook) do not run
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = "import numpy, pyarrow, tiledbsoma, numba\ntry:\n import etl\nexcept ImportError:\n print('no-etl')"
    got = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, cwd=env_dir, timeout=120)
    assert got.stdout.strip() == "no-etl", (got.stdout, got.stderr[-2000:])
    return py


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Master and one 2-core worker, launched as start-master.sh/start-worker.sh launch them (spark-class with
    the Master and Worker classes: pyspark's wheel ships spark-class, not the sbin/start-*.sh wrappers)."""
    tmp = tmp_path_factory.mktemp("cluster")
    spark_class = Path(sys.executable).parent / "spark-class"
    port = _free_port()
    env = {**os.environ, "SPARK_LOG_DIR": str(tmp), "SPARK_NO_DAEMONIZE": "1"}
    master_log, worker_log = tmp / "master.log", tmp / "worker.log"
    with open(master_log, "w") as mlog:
        master = subprocess.Popen([str(spark_class), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                   "--port", str(port), "--webui-port", str(_free_port())],
                                  stdout=mlog, stderr=subprocess.STDOUT, env=env)
    procs = [master]
    try:
        _wait_for(master_log, "I have been elected leader", master)
        url = f"spark://127.0.0.1:{port}"
        with open(worker_log, "w") as wlog:
            worker = subprocess.Popen([str(spark_class), "org.apache.spark.deploy.worker.Worker", url,
                                       "--host", "127.0.0.1", "--cores", "2", "--memory", "3g",
                                       "--webui-port", str(_free_port()), "--work-dir", str(tmp / "work")],
                                      stdout=wlog, stderr=subprocess.STDOUT, env=env)
        procs.append(worker)
        _wait_for(worker_log, "Successfully registered with master", worker)
        yield url, tmp
    finally:
        for p in reversed(procs):
            _stop(p)


def test_standalone_cluster_build_equals_local(cluster, pyfiles, executor_python, demo_census, spark, tmp_path):
    url, logs = cluster
    out = str(tmp_path / "cluster")
    submit = Path(sys.executable).parent / "spark-submit"
    env = {**os.environ, "PYSPARK_DRIVER_PYTHON": sys.executable, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    env.pop("PYSPARK_PYTHON", None)
    cmd = [str(submit), "--master", url, "--py-files", str(pyfiles),
           "--conf", f"spark.pyspark.python={executor_python}", "--conf", "spark.ui.enabled=false",
           "--conf", f"spark.executorEnv.NUMBA_CACHE_DIR={tmp_path / 'numba-exec'}",
           "--executor-memory", "2g", "--total-executor-cores", "2",
           str(ROOT / "etl" / "build_corpus.py"), "--census-uri", demo_census, "--cells-per-task", "200",
           "--tasks", "cell_type_prediction,cell_lm", "--output", out]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    # the work ran on the cluster's executor, whose interpreter has no project but the shipped zip
    app_logs = "".join(p.read_text(errors="replace") for p in (logs / "work").rglob("stderr"))
    assert "c2s_corpus.zip" in app_logs or any((logs / "work").rglob("c2s_corpus.zip")), app_logs[-2000:]
    m = validate(out, deep=True)
    local = build(BuildConfig(output=str(tmp_path / "local"), census_uri=demo_census, cells_per_task=200,
                              tasks=["cell_type_prediction", "cell_lm"]), spark)
    assert m["content_hash"] == local["content_hash"]
    assert m["samples"]["samples_hash"] == local["samples"]["samples_hash"]
    assert m["counts"]["totals"]["written"] == local["counts"]["totals"]["written"] > 0
