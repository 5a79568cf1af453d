"""Pre-tokenised sample shards: each sample part tokenised once per tokenizer, kept in a cache.

Tokenising on the fly ran in the training process, in series with the model (~65% of the data path's time,
BENCHMARKS.md). Here every part of the corpus is tokenised once, with the tokenizer's own threads, into a
parquet shard of token ids (`input_ids`: prompt + response + eos; `prompt_len`: how many of them are the
prompt); the stream then reads ids, never text. The encoding is THE one of training, evaluation and
generation (`training.data.tokenize_batch`), so nothing a model sees changes.

The cache is keyed by content, not by path: a shard's name is a hash of the tokenizer (its serialised
vocabulary, merges, normaliser, specials and the prompt prefix) and of the part (the corpus manifest's
content hash and size, else size and mtime). A moved corpus reuses its shards; a rebuilt part or another
tokenizer gets new ones. Shards are written under a temporary name and renamed, so a killed run never
leaves a shard that looks complete. Default location: $C2S_CACHE_DIR, else $XDG_CACHE_HOME/c2s, else
~/.cache/c2s (as HF datasets keeps its cache), under tokens/.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.errors import CorpusError
from schemas.layout import file_identity, open_parquet
from training.data import encode_prompts, encode_texts, eos_id

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the shard layout or the encoding rule changes: old shards are then not reused
ROW_GROUP = 2048  # rows per row group: what the stream decodes at a time (~8 MB at 1,000 tokens per row)
_ENCODE_ROWS = 4096  # rows per tokenizer call (the fast tokenizer spreads a batch over its threads)


def default_cache_dir() -> Path:
    """$C2S_CACHE_DIR, else $XDG_CACHE_HOME/c2s, else ~/.cache/c2s; token shards live under tokens/."""
    if os.environ.get("C2S_CACHE_DIR"):
        return Path(os.environ["C2S_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "c2s"


def tokenizer_key(tokenizer) -> str:
    """A hash of everything that decides the ids a text gets: the serialised fast tokenizer (vocabulary,
    merges, normaliser, pre-tokenizer, added tokens), the prompt prefix (BOS) and eos."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary and class
        h.update(type(tokenizer).__name__.encode())
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps({"eos": eos_id(tokenizer), "prefix": encode_prompts(tokenizer, [""])[0],
                         "format": FORMAT}).encode())
    return h.hexdigest()[:20]


def source_key(path: str) -> str:
    """The part's name inside the corpus (task/split/part): what a stream position refers to, wherever the
    corpus lies."""
    return "/".join(str(path).replace("\\", "/").split("/")[-3:])


def _part_identity(path: str, manifest_files: dict) -> str:
    entry = manifest_files.get("samples/" + source_key(path))
    if entry and entry.get("hash"):
        return f"{entry['hash']}:{entry.get('bytes')}"
    return file_identity(path)


def id_type(tokenizer) -> pa.DataType:
    """uint16 when every id fits (GPT-NeoX's 50k, the word-level tokenizers), else int32 (Gemma's 256k)."""
    return pa.uint16() if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else pa.int32()


@dataclass(frozen=True)
class Shard:
    """One tokenised part: `key` (task/split/part in the corpus), `path` (the token shard), `rows`."""

    key: str
    path: str
    rows: int


def _tokenize_part(src: str, dest: Path, tokenizer, ids_type: pa.DataType) -> int:
    """Write the token shard of one sample part; returns its rows."""
    eos = eos_id(tokenizer)
    pf = open_parquet(src)
    schema = pa.schema([("sample_id", pa.string()), ("input_ids", pa.list_(ids_type)), ("prompt_len", pa.int32())])
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    rows = 0
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for batch in pf.iter_batches(batch_size=_ENCODE_ROWS, columns=["sample_id", "prompt", "completion"]):
                prompts = [p or "" for p in batch.column("prompt").to_pylist()]
                responses = [r or "" for r in batch.column("completion").to_pylist()]
                p_ids = encode_prompts(tokenizer, prompts)
                r_ids = encode_texts(tokenizer, responses)
                p_len = np.fromiter((len(p) for p in p_ids), np.int64, len(p_ids))
                r_len = np.fromiter((len(r) for r in r_ids), np.int64, len(r_ids))
                lengths = p_len + r_len + 1
                flat = np.empty(int(lengths.sum()), np.int64)
                starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
                for s, p, r in zip(starts.tolist(), p_ids, r_ids, strict=True):
                    flat[s : s + len(p)] = p
                    flat[s + len(p) : s + len(p) + len(r)] = r
                flat[starts + lengths - 1] = eos
                offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
                ids = pa.ListArray.from_arrays(offsets, pa.array(flat.astype(ids_type.to_pandas_dtype())))
                table = pa.table({"sample_id": batch.column("sample_id").cast(pa.string()), "input_ids": ids,
                                  "prompt_len": pa.array(p_len.astype(np.int32))}, schema=schema)
                writer.write_table(table, row_group_size=ROW_GROUP)
                rows += table.num_rows
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return rows


def _cached_rows(dest: Path) -> int | None:
    """The rows of a shard in the cache whose footer reads; None when it is missing, or damaged (then removed,
    to be made again)."""
    if not dest.exists():
        return None
    try:
        with pq.ParquetFile(dest) as pf:
            return pf.metadata.num_rows
    except (OSError, ValueError, pa.ArrowException) as e:
        log.warning("token cache: %s is damaged (%s): making it again", dest, e)
        dest.unlink(missing_ok=True)
        return None


def pretokenize(files: dict[str, list[str]], tokenizer, *, cache_dir: str | Path | None = None,
                manifest: dict | None = None, progress: bool = True) -> tuple[dict[str, list[Shard]], str]:
    """task -> its parts' token shards (made where missing), and the tokenizer's key.

    Parts already in the cache are reused; the others are tokenised once, with a progress bar. Several
    processes may call this at once (they write under temporary names and rename)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = tokenizer_key(tokenizer)
    folder = root / "tokens" / key
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CorpusError(f"token cache {folder}: cannot create it ({e.strerror or e}); set --token-cache or "
                          "C2S_CACHE_DIR to a writable folder") from None
    ids_type = id_type(tokenizer)
    listed = (manifest or {}).get("samples", {}).get("files", {})
    todo: list[tuple[str, str, Path]] = []
    plan: dict[str, list[tuple[str, Path]]] = {}
    rows_of: dict[Path, int] = {}
    for task, paths in files.items():
        for p in paths:
            ident = hashlib.sha256(f"{FORMAT}:{source_key(p)}:{_part_identity(p, listed)}".encode()).hexdigest()[:24]
            dest = folder / f"{ident}.parquet"
            plan.setdefault(task, []).append((p, dest))
            cached = _cached_rows(dest)
            if cached is None:
                todo.append((task, p, dest))
            else:
                rows_of[dest] = cached
    if todo:
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        log.info("tokenising %d of %d sample part(s) once for this tokenizer, into %s", len(todo),
                 sum(map(len, plan.values())), folder)
        rows = 0
        for _task, src, dest in tqdm(todo, desc="tokenise", unit="part", disable=not progress):
            try:
                rows_of[dest] = _tokenize_part(src, dest, tokenizer, ids_type)
                rows += rows_of[dest]
            except OSError as e:  # a full disk, a quota, a read-only mount: nothing half-written stays
                raise CorpusError(f"token cache {folder}: cannot write the tokens of {source_key(src)} "
                                  f"({e.strerror or e}); free space there or point --token-cache / "
                                  "C2S_CACHE_DIR elsewhere") from None
        log.info("tokenised %d samples in %.1f s (%.0f samples/s)", rows, time.perf_counter() - t0,
                 rows / max(time.perf_counter() - t0, 1e-9))
    out = {task: [Shard(source_key(src), str(dest), rows_of[dest]) for src, dest in items]
           for task, items in plan.items()}
    return out, key
