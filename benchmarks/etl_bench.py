"""ETL benchmark: our encoder and SOMA→parquet path against the official cell2sentence and a plain read.

    python benchmarks/etl_bench.py --cells 20000

prints one JSON line, all measured in this run on the same cells (a generated Census-shaped collection,
~2,000 expressed genes per cell of 20k genes, cached under .bench/). Each figure and its peer are measured back
to back in --rounds rounds; figures are medians, ratios medians of the per-round ratios:
  encode_cells_per_s      the encode kernel: CSR block in, Arrow `genes` column out (Encoder.encode), every
                          expressed gene kept (--max-genes 0), as cell2sentence does
  c2s_cells_per_s         cell2sentence 1.2.0's conversion to Arrow, CSData.adata_to_arrow (its public API)
  c2s_sentences_cells_per_s  the sentence step alone (generate_vocabulary + generate_sentences), for reference
  read_floor_cells_per_s  plain tiledbsoma blockwise(axis=0).scipy() read of X raw, nothing else
  end_to_end_cells_per_s  the sentences stage as a whole build in one process (--stages sentences): plan,
                          read, encode, parquet parts, vocab and stats tables, validation, commit
  with_samples_cells_per_s  the same build with the samples stage too (the default --stages), per cell
and peak RSS of one task (fresh process, 256-cell blocks, so N/10 already spans several blocks and
queries) at N/10 and N cells: memory is set by the block, not by the task.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from etl.config import BuildConfig
from etl.demo import ensure_demo_census
from etl.pipeline import build
from etl.sources.census import open_census, tiledb_config
from language.encode import Encoder, Vocabulary
from language.symbols import var_words

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def census(cells: int, genes: int, nnz: int) -> str:
    uri = os.path.join(ROOT, ".bench", f"census_{cells}_{genes}_{nnz}")
    return ensure_demo_census(uri, n_cells=cells, n_genes=genes, mean_nnz=nnz, organisms=("homo_sapiens",), seed=7)


def _blockwise(uri: str, block: int):
    import tiledbsoma as soma

    exp = open_census(uri, tiledb_config(cores=1))["census_data"]["homo_sapiens"]
    with exp.axis_query("RNA", obs_query=soma.AxisQuery()) as q:
        yield from q.X("raw").blockwise(axis=0, size=block, reindex_disable_on_axis=[1]).scipy()


def read_floor(uri: str, block: int) -> float:
    """One plain blockwise read of every cell, each block dropped as soon as it arrives."""
    t = time.perf_counter()
    n = sum(m.shape[0] for m, _ in _blockwise(uri, block))
    return n / (time.perf_counter() - t)


def blocks_in_memory(uri: str, block: int):
    """Every block, kept (for the in-memory encode and cell2sentence runs; not timed)."""
    return [(m, np.asarray(rows)) for m, (rows, _) in _blockwise(uri, block)]


def make_encoder(uri: str):
    var = open_census(uri)["census_data"]["homo_sapiens"].ms["RNA"].var.read().concat().to_pandas()
    var = var.sort_values("soma_joinid")
    words, _ = var_words(var["feature_id"], var["feature_name"])
    voc = Vocabulary.from_sources([(list(var["feature_id"]), words)])
    return Encoder(voc.col_token(words), voc.symbols, max_genes=0)  # all genes, as c2s keeps


def encode_speed(enc, blocks, materialise: bool = False) -> float:
    """One pass of the encoder over every block in memory, cells/s (`materialise`: genes cast to
    list<string>, what a reader that needs plain strings pays)."""
    import pyarrow as pa

    t = time.perf_counter()
    n = 0
    for m, rows in blocks:
        b = enc.encode(m.indptr, m.indices, m.data, rows)
        if materialise:
            b.genes.cast(pa.list_(pa.string()))
        n += len(rows)
    return n / (time.perf_counter() - t)


def c2s_speed(uri: str, blocks) -> tuple[float, float]:
    """cell2sentence's conversion of the same matrix: (adata_to_arrow, sentences alone) in cells/s."""
    import contextlib
    import io

    import anndata as ad
    import scipy.sparse as sp
    from cell2sentence.csdata import CSData
    from cell2sentence.utils import generate_sentences, generate_vocabulary

    var = open_census(uri)["census_data"]["homo_sapiens"].ms["RNA"].var.read().concat().to_pandas()
    x = sp.vstack([m for m, _ in blocks]).tocsr()
    adata = ad.AnnData(x)
    adata.var_names = var.sort_values("soma_joinid")["feature_name"].to_numpy()
    adata.var_names_make_unique()
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):  # tqdm, warnings
        t = time.perf_counter()
        CSData.adata_to_arrow(adata, random_state=42)
        arrow = x.shape[0] / (time.perf_counter() - t)
        t = time.perf_counter()
        generate_sentences(adata, generate_vocabulary(adata), delimiter=" ")
        sentences = x.shape[0] / (time.perf_counter() - t)
    return arrow, sentences


def end_to_end(uri: str, cells_per_task: int, block_cells: int, stages: list[str]) -> float:
    """Cells/s of one whole build of `stages` in one process: plan, the stages, validation, commit."""

    with tempfile.TemporaryDirectory(dir=os.path.join(ROOT, ".bench")) as d:
        t = time.perf_counter()
        m = build(BuildConfig(output=d, census_uri=uri, organisms=["homo_sapiens"], obs_filter=None,
                              cells_per_task=cells_per_task, block_cells=block_cells, stages=stages))
        return m["counts"]["totals"]["read"] / (time.perf_counter() - t)


def task_peak_rss(uri: str, cells: int) -> dict:
    """One task of `cells` cells in a fresh process; its peak RSS (MiB) and the baseline before the task."""
    code = f"""
import sys, json, tempfile

def hwm():  # this process's peak RSS in MiB (VmHWM; ru_maxrss would carry the parent's peak over exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

sys.path.insert(0, {ROOT!r})
from etl.sources.base import Task
from etl.sources import census
from language.encode import Vocabulary
from language.symbols import var_words
from etl.stages.sentences import run_task, TaskOptions
from etl.storage import Store
import numpy as np
uri = {uri!r}
var = census.open_census(uri, census.tiledb_config(1))["census_data"]["homo_sapiens"].ms["RNA"].var
var = var.read(column_names=["soma_joinid", "feature_id", "feature_name"]).concat().to_pandas()
var = var.sort_values("soma_joinid")
words, _ = var_words(var["feature_id"], var["feature_name"])
voc = Vocabulary.from_sources([(list(var["feature_id"]), words)])
task = Task("bench/0", "census", uri, "homo_sapiens", "bench", 0, 0, {cells} - 1, {cells}, "homo_sapiens")
base = hwm()
with tempfile.TemporaryDirectory() as d:
    s = run_task(task, Store(d), voc.col_token(words), voc.symbols, TaskOptions(block_cells=256, max_genes=2048))
print(json.dumps({{"cells": {cells}, "peak_rss_mib": hwm(),
                  "before_task_mib": base, "task_sampled_peak_mib": s.peak_rss_mb}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=20000)
    p.add_argument("--genes", type=int, default=20000)
    p.add_argument("--nnz", type=int, default=2000, help="mean expressed genes per cell")
    p.add_argument("--block", type=int, default=4096,
                   help="cells per blockwise read, for the floor and the build (--block-cells)")
    p.add_argument("--skip-c2s", action="store_true", help="leave out the cell2sentence run")
    p.add_argument("--rounds", type=int, default=3, help="back-to-back measurements of each figure and its peer; "
                   "ratios are medians of the per-round ratios")
    a = p.parse_args()
    os.makedirs(os.path.join(ROOT, ".bench"), exist_ok=True)
    t = time.perf_counter()
    uri = census(a.cells, a.genes, a.nnz)
    build_s = time.perf_counter() - t
    # Each figure and its peer are measured back to back, a.rounds times, and the ratio is the median of the
    # per-round ratios: on a shared machine whose speed drifts, a ratio of figures taken minutes apart is not.
    blocks = blocks_in_memory(uri, 4096)
    n = sum(m.shape[0] for m, _ in blocks)
    nnz = sum(m.nnz for m, _ in blocks) / n
    enc = make_encoder(uri)
    encode_speed(enc, blocks[:1])  # compile / load the numba cache outside the clock
    rounds_enc, rounds_c2s, rounds_c2s_sent = [], [], []
    for _ in range(a.rounds):
        rounds_enc.append(encode_speed(enc, blocks))
        if not a.skip_c2s:
            arrow, sent = c2s_speed(uri, blocks)
            rounds_c2s.append(arrow)
            rounds_c2s_sent.append(sent)
    enc_str = encode_speed(enc, blocks, materialise=True)
    del blocks
    end_to_end(uri, cells_per_task=a.cells, block_cells=a.block, stages=["sentences"])  # warm: imports, caches
    rounds_floor, rounds_e2e = [], []
    for _ in range(a.rounds):
        rounds_floor.append(read_floor(uri, a.block))
        rounds_e2e.append(end_to_end(uri, cells_per_task=a.cells, block_cells=a.block, stages=["sentences"]))
    e2e_samples = end_to_end(uri, cells_per_task=a.cells, block_cells=a.block, stages=["sentences", "samples"])
    med = statistics.median
    enc_s, floor, e2e = med(rounds_enc), med(rounds_floor), med(rounds_e2e)
    c2s = med(rounds_c2s) if rounds_c2s else float("nan")
    c2s_sent = med(rounds_c2s_sent) if rounds_c2s_sent else float("nan")
    vs_c2s = med([e / c for e, c in zip(rounds_enc, rounds_c2s, strict=False)]) if rounds_c2s else float("nan")
    vs_floor = med([e / f for e, f in zip(rounds_e2e, rounds_floor, strict=True)])
    small, large = task_peak_rss(uri, a.cells // 10), task_peak_rss(uri, a.cells)
    print(json.dumps({
        "cells": n, "genes": a.genes, "mean_nnz": round(nnz, 1),
        "encode_cells_per_s": round(enc_s), "c2s_cells_per_s": round(c2s, 1),
        "c2s_sentences_cells_per_s": round(c2s_sent, 1),
        "encode_vs_c2s": round(vs_c2s, 1), "encode_vs_c2s_sentences": round(enc_s / c2s_sent, 1),
        "encode_vs_c2s_rounds": [round(e / c, 1) for e, c in zip(rounds_enc, rounds_c2s, strict=False)],
        "encode_materialised_cells_per_s": round(enc_str),
        "read_floor_cells_per_s": round(floor), "end_to_end_cells_per_s": round(e2e),
        "end_to_end_vs_read_floor": round(vs_floor, 3),
        "end_to_end_vs_read_floor_rounds": [round(e / f, 3) for e, f in zip(rounds_e2e, rounds_floor, strict=True)],
        "with_samples_cells_per_s": round(e2e_samples), "with_samples_vs_read_floor": round(e2e_samples / floor, 3),
        "task_peak_rss_mib": {str(r["cells"]): round(r["peak_rss_mib"]) for r in (small, large)},
        "task_process_rss_before_task_mib": {str(r["cells"]): round(r["before_task_mib"]) for r in (small, large)},
        "task_rss_sampled_per_block_mib": {str(r["cells"]): round(r["task_sampled_peak_mib"]) for r in (small, large)},
        "census_build_s": round(build_s, 1), "python": platform.python_version(), "cpus": os.cpu_count(),
        "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
