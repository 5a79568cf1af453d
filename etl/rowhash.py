"""Content hashes that are a function of the rows only: not of files, partitioning, order, master or executors.

Each sentence row gets a 64-bit hash of all its columns (schema order; strings by their UTF-8 bytes, the gene
list in rank order, numbers by their bits, nulls by a marker). A file's hash and the corpus's `content_hash`
are order-free sums of row hashes (mod 2^64), so the same cells built with other `--cells-per-task`, on
another master or with another executor count hash the same. The writer hashes rows as it writes them (the
gene list from vocabulary hashes, no strings built); the validator recomputes them from the parquet files.
Not cryptographic: it detects change and corruption, not tampering.
"""

from __future__ import annotations

import hashlib
import json

import numba as nb
import numpy as np
import pyarrow as pa

from language.jit import njit

ROW_HASH_VERSION = 1  # bump when the row hash changes (content hashes of older corpora then differ)
_P = nb.uint64(0x100000001B3)
_NULL = np.uint64(0x6A09E667F3BCC909)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


@njit(inline="always")
def _mix(x):
    x = (x ^ (x >> nb.uint64(30))) * nb.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> nb.uint64(27))) * nb.uint64(0x94D049BB133111EB)
    return x ^ (x >> nb.uint64(31))


@njit(nogil=True)
def _hash_strings(offsets, data, out):
    """FNV-1a over each string's bytes, finished with splitmix64's mix."""
    for r in range(out.size):
        h = nb.uint64(0xCBF29CE484222325)
        for k in range(offsets[r], offsets[r + 1]):
            h = (h ^ nb.uint64(data[k])) * _P
        out[r] = _mix(h + nb.uint64(offsets[r + 1] - offsets[r]))


@njit(nogil=True)
def _hash_lists(offsets, elem, out):
    """One hash per list from its elements' hashes, in order."""
    for r in range(out.size):
        h = nb.uint64(0x84222325CBF29CE4)
        for k in range(offsets[r], offsets[r + 1]):
            h = (h ^ elem[k]) * _P
        out[r] = _mix(h + nb.uint64(offsets[r + 1] - offsets[r]))


@njit(nogil=True)
def _gather(codes, table, out):
    for i in range(codes.size):
        out[i] = table[codes[i]]


@njit(nogil=True)
def _hash_code_lists(offsets, codes, table, out):
    """_hash_lists over dictionary codes: element k hashes as table[codes[k]] (no gathered array)."""
    for r in range(out.size):
        h = nb.uint64(0x84222325CBF29CE4)
        for k in range(offsets[r], offsets[r + 1]):
            h = (h ^ table[codes[k]]) * _P
        out[r] = _mix(h + nb.uint64(offsets[r + 1] - offsets[r]))


def _mix_np(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def string_hashes(arr: pa.Array) -> np.ndarray:
    """uint64 per element of a string / large_string / dictionary-of-string array (nulls hash to a marker)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        table = string_hashes(arr.dictionary)
        codes = arr.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        out = np.empty(len(codes), np.uint64)
        _gather(codes, table, out)
        return _nulls(arr, out)
    if pa.types.is_large_string(arr.type):
        off_type = np.int64
    elif pa.types.is_string(arr.type):
        off_type = np.int32
    else:
        raise TypeError(f"not a string array: {arr.type}")
    bufs = arr.buffers()
    n = len(arr)
    offsets = np.frombuffer(bufs[1], off_type, count=n + 1, offset=arr.offset * np.dtype(off_type).itemsize) \
        if n else np.zeros(1, off_type)
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    out = np.empty(n, np.uint64)
    _hash_strings(offsets.astype(np.int64), data, out)
    return _nulls(arr, out)


def _nulls(arr: pa.Array, out: np.ndarray) -> np.ndarray:
    if arr.null_count:
        out[np.asarray(arr.is_null())] = _NULL
    return out


def list_hashes(arr: pa.Array, element_hashes: np.ndarray | None = None) -> np.ndarray:
    """uint64 per list of strings, from its elements in order (`element_hashes`: of the flat values, if known)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    offsets = arr.offsets.to_numpy().astype(np.int64)
    out = np.empty(len(arr), np.uint64)
    values = arr.values
    if element_hashes is None and pa.types.is_dictionary(values.type) and not values.null_count:
        table = string_hashes(values.dictionary)  # the vocabulary: hashed once, looked up per gene
        codes = values.indices.to_numpy(zero_copy_only=False)
        _hash_code_lists(offsets, codes, table, out)
        return _nulls(arr, out)
    if element_hashes is None:
        element_hashes = string_hashes(values)
    _hash_lists(offsets, element_hashes, out)
    return _nulls(arr, out)


def _numeric(col: pa.Array) -> np.ndarray:
    t = col.type
    if pa.types.is_boolean(t):
        v = np.asarray(col.fill_null(False).to_numpy(zero_copy_only=False), np.uint64)
    elif pa.types.is_floating(t):
        f = np.asarray(col.fill_null(0).to_numpy(zero_copy_only=False), np.float64) + 0.0  # -0.0 -> 0.0
        v = f.view(np.uint64)
    elif pa.types.is_integer(t):
        v = np.asarray(col.fill_null(0).to_numpy(zero_copy_only=False), np.int64).view(np.uint64)
    else:
        raise TypeError(f"no row hash for {t}")
    return _nulls(col, v.copy())


def row_hashes(table: pa.Table | pa.RecordBatch, columns: list[str]) -> np.ndarray:
    """uint64 hash per row of `columns` (in that order): strings, lists of strings, numbers, booleans."""
    h = np.full(table.num_rows, np.uint64(0x243F6A8885A308D3), np.uint64)
    for k, name in enumerate(columns):
        col = table.column(name)
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        t = col.type
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            c = list_hashes(col)
        elif pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
            c = string_hashes(col)
        else:
            c = _numeric(col)
        with np.errstate(over="ignore"):
            h = _mix_np(h ^ (c + _GOLD * np.uint64(k + 1)))
    return h


def fold(hashes: np.ndarray, start: int = 0) -> int:
    """Order-free sum of row hashes, mod 2^64."""
    return (start + int(hashes.sum(dtype=np.uint64))) % 2**64 if len(hashes) else start


def add(a: int, b: int) -> int:
    return (a + b) % 2**64


def content_hash(rows: int, total: int) -> str:
    """The corpus's content hash from its row count and the sum of its row hashes."""
    blob = json.dumps({"rows": rows, "sum": f"{total:016x}", "row_hash": ROW_HASH_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def sample_hash(sample_id: str, task: str, split: str, prompt: str, response: str, cell_ids) -> int:
    """64-bit hash of one sample row (what the samples hash sums)."""
    import xxhash

    return xxhash.xxh64_intdigest("\x1f".join((sample_id, task, split, prompt, response, "\x1e".join(cell_ids)))
                                  .encode())


def cell_keys(dataset_ids: pa.Array, cell_ids: pa.Array) -> np.ndarray:
    """uint64 per (dataset_id, cell_id): how the validator tells cells apart across tables."""
    with np.errstate(over="ignore"):
        return _mix_np(string_hashes(dataset_ids) * np.uint64(31) ^ string_hashes(cell_ids))
