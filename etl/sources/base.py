"""What every source hands the pipeline: a plan of tasks (driver side) and blocks of cells (worker side).

Nothing downstream knows which source a block came from. A task is a plain, picklable description of a
contiguous slice of one dataset (a joinid range, or a sampled list of joinids); workers rebuild their
handles (SOMA contexts, h5py files) from it and never receive one.
"""

from __future__ import annotations

import contextlib
import queue
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from schemas.errors import InputError  # re-exported: every reader raises it
from schemas.layout import sentence_rel

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(value: str) -> str:
    """A value usable as a partition directory name (dataset ids from file names may hold anything)."""
    out = _SAFE.sub("_", value).strip("._")
    if not out:
        raise InputError(f"cannot make a directory name from {value!r}")
    return out


@dataclass(frozen=True)
class Task:
    """One Spark task: cells [lo, hi] (inclusive joinids) of one dataset, or explicit sampled joinids."""

    task_id: str  # deterministic: organism/dataset_id/index; names the output part
    kind: str  # "census" | "h5ad"
    uri: str  # Census root URI, or the h5ad path
    organism: str
    dataset_id: str
    index: int
    lo: int
    hi: int
    n_cells: int  # cells the plan expects this task to read
    var_key: str  # which var table (VarTable) the block's column ids index
    joinids: tuple[int, ...] | None = None
    options: dict = field(default_factory=dict, hash=False, compare=False)  # source options (plain data)

    @property
    def part_name(self) -> str:
        return f"part-{self.index:05d}.parquet"

    @property
    def rel_path(self) -> str:
        return sentence_rel(self.organism, self.dataset_id, self.part_name)


@dataclass
class Block:
    """Whole cells: obs labels (one row per cell, in row order) and their raw counts as CSR."""

    obs: pa.Table  # soma_joinid, cell_id, and label columns as plain strings
    indptr: np.ndarray
    indices: np.ndarray  # column ids into the source's var (col_token index)
    data: np.ndarray
    joinids: np.ndarray  # int64, stable per-cell ids (seed the tie-break)


@dataclass
class VarTable:
    """One source var table: the word each column is written as (see etl/symbols.py)."""

    organism: str
    feature_ids: list[str]
    words: list[str]
    symbol_counts: dict[str, int]  # what the symbol rule changed: missing, replaced, merged_by_case


@dataclass
class SourcePlan:
    """What the driver learned: tasks, var tables, and the source description."""

    tasks: list[Task]
    vars: dict[str, VarTable]  # var_key -> table
    description: dict  # kind, URIs, versions: recorded in the manifest and the run key
    planned: dict[str, dict[str, int]]  # organism -> dataset_id -> cells planned
    # "organism/dataset_id" -> what names that dataset's content (Census dataset_version_id, an h5ad's
    # content hash); a dataset without one is identified by the whole source description
    identities: dict[str, str] = field(default_factory=dict)


def file_digest(path: str, chunk: int = 8 << 20) -> str:
    """xxh3-128 of a file's bytes (an h5ad's identity: a file rewritten in place gets another)."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def split_sorted(joinids: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Chunks of at most `size` from sorted joinids."""
    for i in range(0, len(joinids), size):
        yield joinids[i : i + size]


_DONE = object()


def read_ahead(items: Iterable, depth: int = 1) -> Iterator:
    """Iterate `items` in a background thread, `depth` items ahead of the consumer.

    The reads (TileDB, h5py) release the GIL, and so do the encoder and the parquet writer, so reading
    block k+1 overlaps encoding and writing block k. Memory grows by `depth` blocks, not with the task.
    An exception in the reader is raised in the consumer; a consumer that stops early stops the thread.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((_DONE, None))
        except BaseException as e:  # handed to the consumer, which re-raises it
            q.put((_DONE, e))

    thread = threading.Thread(target=produce, name="read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, err = q.get()
            if err is not None:
                raise err
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                q.get_nowait()
            thread.join(timeout=0.05)
