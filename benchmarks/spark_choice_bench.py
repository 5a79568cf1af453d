"""When does Spark pay for its start-up? The whole default build (sentences and samples) of growing
Census-shaped collections, run as a user runs it (`c2s build --census-uri ...`), once on Spark (the default
local[*,4] master) and once in this process (`--spark false`), back to back per size:

    .venv/bin/python benchmarks/spark_choice_bench.py --cells 2000,8000,32000

Prints one JSON line per size (wall seconds of each, from outside the process: JVM start-up included) and a
last line with a straight-line fit of each (seconds = a + b * cells) and the size where the lines cross: the
measured basis of `--spark auto`'s threshold (etl.config.SPARK_MIN_CELLS).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from etl.demo import ensure_demo_census

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def census(cells: int, genes: int, nnz: int) -> str:
    uri = os.path.join(ROOT, ".bench", f"choice_census_{cells}_{genes}_{nnz}")
    ensure_demo_census(uri, n_cells=cells, n_genes=genes, mean_nnz=nnz, organisms=("homo_sapiens",), seed=5)
    return uri


def timed_build(uri: str, spark: bool, work: str) -> float:
    out = os.path.join(work, f"out_{spark}")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [os.path.join(os.path.dirname(sys.executable), "c2s"), "build", "--census-uri", uri, "--output", out,
           "--organisms", "homo_sapiens", "--spark", "true" if spark else "false", "--log-level", "warning"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="2000,8000,32000", help="collection sizes, comma-separated")
    ap.add_argument("--genes", type=int, default=10000)
    ap.add_argument("--nnz", type=int, default=1000, help="mean expressed genes per cell")
    a = ap.parse_args()
    sizes = [int(x) for x in a.cells.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for n in sizes:
            uri = census(n, a.genes, a.nnz)
            s = timed_build(uri, True, work)
            p = timed_build(uri, False, work)
            rows.append({"cells": n, "spark_s": round(s, 2), "in_process_s": round(p, 2),
                         "spark_vs_in_process": round(p / s, 3)})
            print(json.dumps(rows[-1]), flush=True)
    x = np.array([r["cells"] for r in rows], float)
    fit = {k: np.polyfit(x, [r[k] for r in rows], 1) for k in ("spark_s", "in_process_s")}
    (bs, as_), (bp, ap_) = fit["spark_s"], fit["in_process_s"]
    cross = (as_ - ap_) / (bp - bs) if bp > bs else None
    print(json.dumps({"summary": True, "genes": a.genes, "nnz": a.nnz, "cpus": os.cpu_count(),
                      "machine": platform.machine(),
                      "spark_fit": {"start_s": round(as_, 2), "s_per_1k_cells": round(1000 * bs, 3)},
                      "in_process_fit": {"start_s": round(ap_, 2), "s_per_1k_cells": round(1000 * bp, 3)},
                      "crossover_cells": None if cross is None else int(cross)}))


if __name__ == "__main__":
    main()
