"""The whole build (sentences and samples) on growing Census-shaped collections, on local[2]: does time grow
linearly and memory stay flat?

    .venv/bin/python benchmarks/scale_bench.py --cells 50000,200000,1000000

Each size: a generated collection (one organism, --genes genes, ~--nnz expressed per cell: fewer than the
Census's ~2,000 to keep 1M cells on this disk), then `spark-submit --master local[2] etl/build_corpus.py` into
a fresh directory, default tasks and knowledge. Measured from outside the build: wall time, peak RSS of the
Python driver and of the driver JVM (sampled every 0.2 s), peak RSS of any Python worker (sampled), shuffle
bytes (Spark's event log), output bytes (the version folder); from the manifest: per-stage seconds and the
sentences tasks' own peak RSS. Prints one JSON line per size, then a summary line.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time

import psutil

from etl.demo import ensure_demo_census
from schemas.layout import resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def census(cells: int, genes: int, nnz: int) -> tuple[str, float]:
    uri = os.path.join(ROOT, ".bench", f"scale_census_{cells}_{genes}_{nnz}")
    t = time.perf_counter()
    ensure_demo_census(uri, n_cells=cells, n_genes=genes, mean_nnz=nnz, organisms=("homo_sapiens",), seed=11)
    return uri, time.perf_counter() - t


class Sampler:
    """Peak RSS of the driver's Python process, the driver JVM and any pyspark worker, under one process tree."""

    def __init__(self, root: int, interval: float = 0.2):
        self.root, self.interval = root, interval
        self.peak = {"driver_python_mib": 0.0, "driver_jvm_mib": 0.0, "python_worker_mib": 0.0}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            if not self.root:
                continue
            try:
                procs = [psutil.Process(self.root), *psutil.Process(self.root).children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for p in procs:
                try:
                    cmd, rss = " ".join(p.cmdline()), p.memory_info().rss / 2**20
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                key = ("python_worker_mib" if "pyspark.daemon" in cmd or "pyspark.worker" in cmd else
                       "driver_python_mib" if "build_corpus.py" in cmd and "java" not in cmd.split(" ", 1)[0] else
                       "driver_jvm_mib" if "java" in cmd.split(" ", 1)[0] else None)
                if key:
                    self.peak[key] = max(self.peak[key], rss)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def shuffle_bytes(event_dir: str) -> int:
    total = 0
    for path in glob.glob(os.path.join(event_dir, "**", "*"), recursive=True):
        if os.path.isdir(path):
            continue
        with open(path, errors="replace") as f:
            for line in f:
                if '"SparkListenerTaskEnd"' not in line:
                    continue
                metrics = json.loads(line).get("Task Metrics") or {}
                total += (metrics.get("Shuffle Write Metrics") or {}).get("Shuffle Bytes Written", 0)
    return total


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def run(cells: int, genes: int, nnz: int, driver_memory: str = "4g") -> dict:
    uri, gen_s = census(cells, genes, nnz)
    out = os.path.join(ROOT, ".bench", f"scale_out_{cells}")
    events = os.path.join(ROOT, ".bench", f"scale_events_{cells}")
    for d in (out, events):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(events)
    submit = os.path.join(os.path.dirname(sys.executable), "spark-submit")
    cmd = [submit, "--master", "local[2]", "--driver-memory", driver_memory, "--conf", "spark.ui.enabled=false",
           "--conf", "spark.eventLog.enabled=true", "--conf", f"spark.eventLog.dir=file://{events}",
           "--conf", "spark.eventLog.compress=false",
           os.path.join(ROOT, "etl", "build_corpus.py"), "--census-uri", uri, "--organisms", "homo_sapiens",
           "--cells-per-task", "16384",
           "--output-dir", out]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    t = time.perf_counter()
    log_path = os.path.join(ROOT, ".bench", f"scale_build_{cells}.log")
    with open(log_path, "w") as log, Sampler(0) as s:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        s.root = proc.pid
        proc.wait()
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        with open(log_path) as f:
            raise SystemExit(f"build of {cells} cells failed (log: {log_path}):\n{f.read()[-3000:]}")

    m = resolve(out).manifest
    written = m["counts"]["totals"]["written"]
    sentences_s = m["timings_s"]["total"]
    samples_s = m["samples"]["seconds"]
    return {
        "cells": cells, "driver_memory": driver_memory, "written": written, "genes": genes, "mean_nnz": nnz, "generate_s": round(gen_s, 1),
        "wall_s": round(wall, 1), "sentences_s": round(sentences_s, 1), "samples_s": round(samples_s, 1),
        "cells_per_s": round(written / wall), "sentences_cells_per_s": round(written / sentences_s),
        "samples_per_s": round(m["samples"]["counts"]["total"] / samples_s), "samples": m["samples"]["counts"]["total"],
        "peak_rss_mib": {k: round(v) for k, v in s.peak.items()},
        "sentences_task_peak_rss_mib": round(m["tasks"]["peak_rss_mb"]), "tasks": m["tasks"]["count"],
        "shuffle_mb": round(shuffle_bytes(events) / 1e6, 1), "output_mb": round(du(resolve(out).root) / 1e6, 1),
        "bytes_per_cell_out": round(du(resolve(out).root) / written),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default="50000,200000,1000000")
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--nnz", type=int, default=100)
    p.add_argument("--driver-memory", default="4g", help="the driver JVM's heap (in local mode it hosts the "
                   "executors too): a smaller one shows how much the build needs, not how much the JVM takes")
    a = p.parse_args()
    rows = []
    for n in (int(x) for x in a.cells.split(",")):
        rows.append(run(n, a.genes, a.nnz, a.driver_memory))
        print(json.dumps(rows[-1]), flush=True)
    first, last = rows[0], rows[-1]
    print(json.dumps({
        "cells_ratio": round(last["written"] / first["written"], 1),
        "wall_ratio": round(last["wall_s"] / first["wall_s"], 1),
        "seconds_per_million_cells": [round(r["wall_s"] / r["written"] * 1e6) for r in rows],
        "driver_python_peak_mib": [r["peak_rss_mib"]["driver_python_mib"] for r in rows],
        "driver_jvm_peak_mib": [r["peak_rss_mib"]["driver_jvm_mib"] for r in rows],
        "python_worker_peak_mib": [r["peak_rss_mib"]["python_worker_mib"] for r in rows],
        "python": platform.python_version(), "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
