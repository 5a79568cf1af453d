"""Samples-stage benchmark: samples/s on one core and bytes per sample, on a generated Census.

    python benchmarks/samples_bench.py --cells 20000

Builds the sentences once (cached under .bench/), then times the samples stage in one process (one core:
read the sentence parts, annotate, sort, build every task with the demo knowledge files, write the parts),
and prints one JSON line with the figures and the full-scale estimate for 150M samples.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from etl.config import BuildConfig
from etl.demo import ensure_demo_census
from etl.pipeline import build
from etl.spark import get_spark
from etl.stages import samples_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=20000)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--spark", action="store_true", help="run the stage on local[*] Spark (all cores) instead of "
                   "in one process; samples/s per core = samples/s / cores")
    a = p.parse_args()

    os.makedirs(os.path.join(ROOT, ".bench"), exist_ok=True)
    uri = ensure_demo_census(os.path.join(ROOT, ".bench", f"samples_census_{a.cells}"), n_cells=a.cells,
                             n_genes=4000, mean_nnz=1500, seed=3)
    out = os.path.join(ROOT, ".bench", f"samples_corpus_{a.cells}")
    k = samples_plan.demo_knowledge()
    build(BuildConfig(output=out, census_uri=uri, stages=["sentences"], keep_versions=1))
    # samples only, forced: each run a new version over the same sentences (--keep-versions 1 prunes the last)
    cfg = BuildConfig(output=out, census_uri=uri, stages=["samples"], force=True, max_tokens=a.max_tokens,
                      keep_versions=1, **k)
    spark = None
    if a.spark:

        spark = get_spark("samples-bench", "local[*]")
    cold = None
    if spark is not None:  # the first run pays the JVM's and the Python workers' warm-up: timed apart
        t = time.perf_counter()
        build(cfg, spark)
        cold = time.perf_counter() - t
    t = time.perf_counter()
    m = build(cfg, spark)
    secs = time.perf_counter() - t
    cores = (os.cpu_count() or 1) if a.spark else 1
    if spark is not None:
        spark.stop()
    s = m["samples"]
    total = s["counts"]["total"]
    rate = total / secs / cores
    full = 150e6
    print(json.dumps({
        "cells": s["counts"]["cells"], "samples": total, "samples_per_cell": s["samples_per_cell"],
        "seconds": round(secs, 2), "cold_seconds": round(cold, 2) if cold else None, "mode": "spark local[*]" if a.spark else "one process", "cores": cores,
        "samples_per_s": round(total / secs), "samples_per_s_per_core": round(rate), "bytes_per_sample": s["bytes_per_sample"],
        "est_tokens_per_sample": round(s["est_tokens"]["total"] / total, 1), "max_tokens": a.max_tokens,
        "full_scale_150M": {"core_hours": round(full / rate / 3600, 1), "hours_on_64_cores": round(full / rate / 3600 / 64, 2),
                            "storage_gb": round(full * s["bytes_per_sample"] / 1e9, 1),
                            "est_tokens_billion": round(full * s["est_tokens"]["total"] / total / 1e9, 1)},
        "python": platform.python_version(), "cpus": os.cpu_count(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
