"""The sentences stage: tasks → rank-encoded parquet parts, plus the statistics gathered in the same pass.

`run_task` is plain Python (tests and benchmarks call it without Spark): it reads one task's blocks, encodes
them, streams them into one parquet part of the version being built, and writes a small `.npz` under the
version's `_work/` as the task's marker. A re-run finds finished tasks by that marker and reuses them, so a
killed run resumes with no duplicate or partial part. Each part's hash is the order-free sum of its rows'
hashes (etl/rowhash.py). `run_spark` is the thin orchestration: one Spark task per plan task, results
merged with treeReduce (never collected one by one to the driver), progress logged, input errors raised
once on the driver.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import psutil
import pyarrow as pa

from etl import rowhash
from etl.sources import census, h5ad
from etl.sources.base import InputError, Task, read_ahead
from etl.spark import SparkJob
from etl.storage import Store
from language.encode import Encoder
from language.fit import FitStats
from schemas import GENE_COUNTS, SENTENCES
from schemas.layout import gene_counts_rel

log = logging.getLogger(__name__)

# The in-memory/written schema: genes' values dictionary-encoded over the vocabulary. Files are written
# without the Arrow schema override, so every reader sees the declared list<string>.
WRITE_SCHEMA = SENTENCES.set(
    SENTENCES.get_field_index("genes"),
    pa.field("genes", pa.list_(pa.field("item", pa.dictionary(pa.int32(), pa.string()), nullable=False)),
             nullable=False),
)
_READERS = {"census": census.read_task, "h5ad": h5ad.read_task}


@dataclass
class TaskOptions:
    """Plain options every task needs (shipped to executors)."""

    seed: int = 0
    max_genes: int = 2048
    block_cells: int = 4096
    row_group_cells: int = 1024
    compression: str = "zstd"
    cores: int = 1
    buffer_mib: int = 128
    on_invalid: str = "skip"  # or "error": stop at the first cell with NaN/inf/negative values
    read_ahead: int = 1  # blocks read ahead in a thread while the current one is encoded and written


@dataclass
class DatasetCounts:
    planned: int = 0
    read: int = 0
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    fit: FitStats = field(default_factory=FitStats)

    def __add__(self, o: DatasetCounts) -> DatasetCounts:
        sk = dict(self.skipped)
        for k, v in o.skipped.items():
            sk[k] = sk.get(k, 0) + v
        return DatasetCounts(self.planned + o.planned, self.read + o.read, self.written + o.written, sk,
                             self.fit + o.fit)


@dataclass
class Summary:
    """What the stage learned; merged across tasks with `+` (associative, so treeReduce can do it)."""

    datasets: dict[tuple[str, str], DatasetCounts] = field(default_factory=dict)
    token_cells: dict[str, np.ndarray] = field(default_factory=dict)  # organism -> cells per token
    files: dict[str, dict] = field(default_factory=dict)  # rel path -> rows, hash, bytes
    tasks: int = 0
    resumed: int = 0
    task_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    errors: list[str] = field(default_factory=list)  # input errors raised in tasks (Spark path)

    def __add__(self, o: Summary) -> Summary:
        ds = dict(self.datasets)
        for k, v in o.datasets.items():
            ds[k] = ds[k] + v if k in ds else v
        tc = dict(self.token_cells)
        for k, v in o.token_cells.items():
            tc[k] = tc[k] + v if k in tc else v
        return Summary(ds, tc, {**self.files, **o.files}, self.tasks + o.tasks, self.resumed + o.resumed,
                       self.task_seconds + o.task_seconds, max(self.peak_rss_mb, o.peak_rss_mb),
                       (self.errors + o.errors)[:10])


class SourceChanged(InputError):
    """A task read other cells than the plan selected for it."""


def _stats_rel(task: Task) -> str:
    return f"_work/tasks/{task.organism}/{task.dataset_id}/{task.part_name}.npz"


def _save_result(staging: Store, task: Task, s: Summary, token_cells: np.ndarray) -> None:
    counts = s.datasets[(task.organism, task.dataset_id)]
    meta = {
        "planned": counts.planned, "read": counts.read, "written": counts.written, "skipped": counts.skipped,
        "fit": [counts.fit.n_cells, counts.fit.n, counts.fit.sum_x, counts.fit.sum_y, counts.fit.sum_xx,
                counts.fit.sum_xy, counts.fit.sum_yy],
        "file": s.files[task.rel_path], "seconds": s.task_seconds, "peak_rss_mb": s.peak_rss_mb,
    }  # fmt: skip
    nz = np.flatnonzero(token_cells).astype(np.int32)
    buf = io.BytesIO()
    np.savez(buf, token_ids=nz, token_counts=token_cells[nz], meta=np.array(json.dumps(meta)))
    staging.write_bytes(_stats_rel(task), buf.getvalue())


def _load_result(staging: Store, task: Task, n_tokens: int) -> Summary:
    z = np.load(io.BytesIO(staging.read_bytes(_stats_rel(task))))
    meta = json.loads(str(z["meta"]))
    tc = np.zeros(n_tokens, np.int64)
    tc[z["token_ids"]] = z["token_counts"]
    f = meta["fit"]
    counts = DatasetCounts(meta["planned"], meta["read"], meta["written"], meta["skipped"],
                           FitStats(int(f[0]), *f[1:]))
    return Summary({(task.organism, task.dataset_id): counts}, {task.organism: tc},
                   {task.rel_path: meta["file"]}, 1, 1, 0.0, 0.0)


class TaskEncoder:
    """One task's part, fed block by block: encode, hash and write each block; `finish` closes the part,
    checks read = planned and writes the task's marker. The body of `run_task`, and of `run_local`'s
    stream over several tasks."""

    def __init__(self, task: Task, staging: Store, col_token: np.ndarray, vocab: pa.Array, opts: TaskOptions):
        self.task, self.staging, self.opts = task, staging, opts
        self.t0 = time.perf_counter()
        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self.encoder = Encoder(col_token, vocab, seed=opts.seed, max_genes=opts.max_genes)
        self.counts = DatasetCounts(planned=task.n_cells)
        self.file_sum = 0
        stats_cols = [n for n in WRITE_SCHEMA.names if n != "genes"]
        self.writer = staging.parquet_writer(task.rel_path, WRITE_SCHEMA, compression=opts.compression,
                                             write_statistics=stats_cols, store_schema=False)

    def add(self, block) -> None:
        task, opts, counts = self.task, self.opts, self.counts
        enc = self.encoder.encode(block.indptr, block.indices, block.data, block.joinids)
        if opts.on_invalid == "error" and ({"nan_or_inf", "negative"} & enc.skipped.keys()):
            row = int(np.flatnonzero((enc.status == 1) | (enc.status == 2))[0])
            reason = "NaN or infinite" if enc.status[row] == 1 else "negative"
            raise InputError(f"{task.uri} dataset {task.dataset_id}: cell {block.obs['cell_id'][row]} "
                             f"(joinid {block.joinids[row]}) has {reason} values "
                             "(--on-invalid skip counts and skips such cells)")
        counts.read += len(block.joinids)
        for k, v in enc.skipped.items():
            counts.skipped[k] = counts.skipped.get(k, 0) + v
        n = len(enc.kept)
        if n:
            obs = block.obs.take(pa.array(enc.kept))
            cols = {
                "cell_id": obs["cell_id"], "soma_joinid": obs["soma_joinid"],
                "organism": pa.array([task.organism] * n, pa.string()),
                "dataset_id": pa.array([task.dataset_id] * n, pa.string()),
                **{c: obs[c] for c in WRITE_SCHEMA.names if c in obs.column_names and c not in
                   ("cell_id", "soma_joinid")},
                "raw_sum": pa.array(enc.raw_sum), "n_expressed": pa.array(enc.n_expressed),
                "genes": enc.genes,
            }  # fmt: skip
            for f in WRITE_SCHEMA:  # optional columns a source does not have (coordinates): nulls
                if f.nullable and f.name not in cols:
                    cols[f.name] = pa.nulls(n, f.type)
            table = pa.table(cols).select(WRITE_SCHEMA.names).cast(WRITE_SCHEMA)
            self.writer.write_table(table, row_group_size=opts.row_group_cells)
            counts.written += n
            counts.fit = counts.fit + FitStats.from_cells(enc.fit)
            self.file_sum = rowhash.fold(rowhash.row_hashes(table, WRITE_SCHEMA.names), self.file_sum)
        self.peak = max(self.peak, self.proc.memory_info().rss)

    def abort(self) -> None:
        """Drop the unfinished part (its error is the one being raised; a second from the close is not)."""
        with contextlib.suppress(Exception):
            self.writer.close(ok=False)

    def finish(self) -> Summary:
        task, counts = self.task, self.counts
        if counts.read != task.n_cells:
            self.abort()
            raise SourceChanged(f"{task.uri} dataset {task.dataset_id} (task {task.index}): read {counts.read} "
                                f"cells, the plan selected {task.n_cells}; the source changed during the build "
                                "(rebuild from a fixed copy or Census version)")
        self.writer.close()
        size = self.staging.fs_root[0].get_file_info(self.staging.path(task.rel_path)).size
        file_info = {"rows": counts.written, "hash": f"{self.file_sum:016x}", "bytes": int(size or 0)}
        s = Summary({(task.organism, task.dataset_id): counts}, {task.organism: self.encoder.token_cells.copy()},
                    {task.rel_path: file_info}, 1, 0, time.perf_counter() - self.t0, self.peak / 2**20)
        nz = np.flatnonzero(self.encoder.token_cells)
        self.staging.write_table(gene_counts_rel(task.rel_path), pa.table(
            {"gene_symbol": self.encoder.vocab.take(pa.array(nz)), "n_cells": self.encoder.token_cells[nz]},
            schema=GENE_COUNTS))
        _save_result(self.staging, task, s, self.encoder.token_cells)
        return s


def _done(staging: Store, task: Task) -> bool:
    return staging.exists(_stats_rel(task)) and staging.exists(task.rel_path) and \
        staging.exists(gene_counts_rel(task.rel_path))


def _blocks(task: Task, opts: TaskOptions):
    return _READERS[task.kind](task, block_size=opts.block_cells, cores=opts.cores, buffer_mib=opts.buffer_mib)


def run_task(task: Task, staging: Store, col_token: np.ndarray, vocab: pa.Array, opts: TaskOptions) -> Summary:
    """Encode one task into `staging/<task.rel_path>`; reuse it if a previous run finished it.

    Raises SourceChanged when the cells read are not the cells the plan selected (read = planned, per task)."""
    if _done(staging, task):
        return _load_result(staging, task, len(vocab))
    enc = TaskEncoder(task, staging, col_token, vocab, opts)
    blocks = _blocks(task, opts)
    try:
        for block in read_ahead(blocks, depth=opts.read_ahead) if opts.read_ahead else blocks:
            enc.add(block)
    except BaseException:
        enc.abort()
        raise
    return enc.finish()


# ---- Spark orchestration --------------------------------------------------------------------------------

_WORKER_READY = False
_VOCAB_CACHE: dict[str, pa.Array] = {}


def worker_init(cores: int) -> None:
    """Once per Python worker: thread limits near the task's cores, and logging."""
    global _WORKER_READY
    if _WORKER_READY:
        return
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(var, str(cores))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _WORKER_READY = True


def _vocab(digest: str, symbols: list[str]) -> pa.Array:
    if digest not in _VOCAB_CACHE:
        _VOCAB_CACHE[digest] = pa.array(symbols, pa.string())
    return _VOCAB_CACHE[digest]


def run_spark(spark, tasks: list[Task], staging_uri: str, shared: dict, opts: TaskOptions) -> Summary:
    """One Spark task per plan task; returns the merged Summary.

    `shared` holds, per organism, `symbols` and `digest`, and per var key the `col_token` array: broadcast
    once, never pickled per task. An InputError in a task is reported, not raised (no retries, no Spark
    tracebacks): the job stops and the driver raises it as one line.
    """

    if not tasks:
        return Summary()
    sc = spark.sparkContext
    bc = sc.broadcast(shared)
    job = SparkJob(spark, "sentences", total_cells=sum(t.n_cells for t in tasks), total_tasks=len(tasks))
    errors, cells = job.errors, job.cells

    def part(it):
        worker_init(opts.cores)
        s = Summary()
        store = Store(staging_uri)
        for t in it:
            org = bc.value["organisms"][t.organism]
            try:
                s = s + run_task(t, store, bc.value["col_token"][t.var_key], _vocab(org["digest"], org["symbols"]),
                                 opts)
            except InputError as e:
                errors.add([str(e)])
                s.errors.append(str(e))
                break
            cells.add(t.n_cells)
        yield s

    rdd = sc.parallelize(tasks, numSlices=len(tasks))
    depth = 2 if len(tasks) < 10_000 else 3
    try:
        result = job.run(lambda: rdd.mapPartitions(part).treeReduce(lambda a, b: a + b, depth=depth))
    finally:
        bc.destroy()
    if result.errors:
        raise InputError(result.errors[0])
    return result


def run_local(tasks: list[Task], staging_uri: str, shared: dict, opts: TaskOptions, progress: bool = True) -> Summary:
    """The same work without Spark, in this process (tests, benchmarks, small inputs), with a progress bar.

    One read-ahead thread runs over every task's blocks in turn, so reading the next task's first block
    overlaps encoding and writing the last block of the one before (one reader at a time, as in one task)."""
    from tqdm.auto import tqdm

    s = Summary()
    store = Store(staging_uri)
    todo = []
    for t in tasks:
        if _done(store, t):
            s = s + _load_result(store, t, len(shared["organisms"][t.organism]["symbols"]))
        else:
            todo.append(t)

    def stream():
        for i, t in enumerate(todo):
            for block in _blocks(t, opts):
                yield i, block
            yield i, None  # the end of task i

    with tqdm(total=sum(t.n_cells for t in tasks), unit="cells", unit_scale=True, desc="sentences",
              disable=not progress or None, leave=False) as bar:
        bar.update(sum(t.n_cells for t in tasks) - sum(t.n_cells for t in todo))
        items = read_ahead(stream(), depth=opts.read_ahead) if opts.read_ahead else stream()
        current: TaskEncoder | None = None
        try:
            for i, block in items:
                t = todo[i]
                if current is None:
                    org = shared["organisms"][t.organism]
                    current = TaskEncoder(t, store, shared["col_token"][t.var_key],
                                          _vocab(org["digest"], org["symbols"]), opts)
                if block is None:
                    done, current = current, None
                    s = s + done.finish()
                    bar.update(t.n_cells)
                else:
                    current.add(block)
        except BaseException:
            if current is not None:
                current.abort()
            raise
    return s
