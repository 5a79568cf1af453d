"""The training stream: token shards -> a mixture of tasks, sharded across processes, shuffled, resumable.

Reads pre-tokenised shards (training/tokens.py) with pyarrow, a row group at a time, and hands out token
arrays (numpy views, no per-token Python). Written here rather than on `datasets`' streaming parquet
reader, which sleeps 5 s whenever a pass ends, deep-copies its state at every example and converts every
token to a Python int; measured in docs/ARCHITECTURE.md ("The data path").

- Mixture: each sample is drawn from a task with the mixture's probability (among the tasks that still
  have samples when the stream is finite).
- Passes: each task cycles through its shards on its own, in an order reshuffled every pass (seed, task,
  pass); loop=False reads every sample of this process's shard exactly once.
- Sharding across processes, once: by file when a task's file count divides by the world size, else every
  world_size-th row of the task. Ranks see disjoint samples that together cover the split.
- Shuffling: a buffer of `shuffle_buffer` samples, drawn from at random (numpy Generator seeded from seed
  and rank).
- State: the RNG, each task's position (pass, file, row) and the buffer as references (task, file, row);
  small enough to take at every batch, exact on reload (the referenced rows are read again).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.errors import CorpusError
from training.tokens import Shard

STATE_VERSION = 2
log = logging.getLogger(__name__)


@dataclass(slots=True)
class Sample:
    """One tokenised sample: ids = prompt + response + eos, the first prompt_len of them the prompt;
    ref = (task index, file index, row) in the stream's shards, so a saved position can name it."""

    ids: np.ndarray
    prompt_len: int
    task: str
    ref: tuple[int, int, int]

    def __len__(self) -> int:
        return len(self.ids)


class _RowGroup:
    """A decoded row group: flat ids, offsets, prompt lengths; rows [first, first + n) of its file."""

    __slots__ = ("first", "flat", "n", "offsets", "prompt_len")

    def __init__(self, f: _ShardFile, index: int, first: int):
        try:
            t = f.pf.read_row_group(index, columns=["input_ids", "prompt_len"])
        except (OSError, ValueError, pa.ArrowException) as e:
            raise f.damaged(e) from None
        ids = t.column("input_ids").combine_chunks()
        self.offsets = ids.offsets.to_numpy()
        self.flat = ids.values.to_numpy()
        self.prompt_len = t.column("prompt_len").to_numpy()
        self.first, self.n = first, t.num_rows

    def row(self, i: int) -> tuple[np.ndarray, int]:
        return self.flat[self.offsets[i] : self.offsets[i + 1]], int(self.prompt_len[i])


class _ShardFile:
    """A token shard opened lazily, with the first row of each row group (to find a row)."""

    def __init__(self, shard: Shard):
        self.shard = shard
        self._pf: pq.ParquetFile | None = None
        self._starts: np.ndarray | None = None

    def damaged(self, e: Exception) -> CorpusError:
        why = " ".join(str(e).split())  # Arrow's messages span lines: the user gets one
        return CorpusError(f"token shard {self.shard.path} (of {self.shard.key}): unreadable ({why}); delete it "
                           "and the next run makes it again from the corpus")

    @property
    def pf(self) -> pq.ParquetFile:
        if self._pf is None:
            try:
                self._pf = pq.ParquetFile(self.shard.path)
            except (OSError, ValueError, pa.ArrowException) as e:
                raise self.damaged(e) from None
            if self._starts is None:
                sizes = [self._pf.metadata.row_group(g).num_rows for g in range(self._pf.num_row_groups)]
                self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return self._pf

    def close(self) -> None:
        """Close the file (it opens again when read): a stream holds one open file per task at most."""
        if self._pf is not None:
            self._pf.close()
            self._pf = None

    def group_of(self, row: int) -> tuple[int, int]:
        """(row group, its first row) holding `row`."""
        _ = self.pf
        g = int(np.searchsorted(self._starts, row, side="right")) - 1
        return g, int(self._starts[g])


class _TaskReader:
    """One task's samples for one rank, pass after pass."""

    def __init__(self, index: int, task: str, files: list[_ShardFile], *, seed: int, rank: int, world_size: int,
                 loop: bool):
        self.index, self.task, self.files = index, task, files
        self.seed, self.rank, self.world, self.loop = seed, rank, world_size, loop
        self.by_file = len(files) % world_size == 0
        self.passes = 0  # passes begun
        self.pos = 0  # index into this pass's file order
        self.row = 0  # next row in the current file
        self.counter = 0  # rows of this pass seen so far (all ranks'; for row-wise sharding)
        self.yielded = 0  # rows this rank took in this pass
        self.done = False
        self._order: list[int] = self._file_order()
        self._group: _RowGroup | None = None

    def _file_order(self) -> list[int]:
        order = np.random.default_rng([self.seed, self.index, self.passes, 7]).permutation(len(self.files))
        return [int(i) for i in (order[self.rank :: self.world] if self.by_file else order)]

    def state(self) -> list[int]:
        return [self.passes, self.pos, self.row, self.counter, self.yielded, int(self.done)]

    def load(self, s: Sequence[int]) -> None:
        self.passes, self.pos, self.row, self.counter, self.yielded, done = (int(x) for x in s)
        self.done = bool(done)
        self._order = self._file_order()
        self._group = None

    def _next_pass(self) -> None:
        if self.yielded == 0:
            raise CorpusError(f"task {self.task}: rank {self.rank} of {self.world} received no samples in a pass "
                              "over its files: fewer samples than processes?")
        self.passes += 1
        self.pos = self.row = self.counter = self.yielded = 0
        self._order = self._file_order()
        self._group = None

    def next(self) -> Sample | None:
        """The next sample of this rank, None when a finite stream (loop=False) has none left."""
        while not self.done:
            if self.pos >= len(self._order):
                if not self.loop:
                    self.done = True
                    return None
                self._next_pass()
                continue
            f_idx = self._order[self.pos]
            f = self.files[f_idx]
            if self.row >= f.shard.rows:
                f.close()
                self.pos += 1
                self.row = 0
                self._group = None
                continue
            g = self._group
            if g is None or not g.first <= self.row < g.first + g.n:
                gi, first = f.group_of(self.row)
                g = self._group = _RowGroup(f, gi, first)
            row = self.row
            self.row += 1
            mine = self.by_file or self.counter % self.world == self.rank
            self.counter += 1
            if mine:
                self.yielded += 1
                ids, plen = g.row(row - g.first)
                return Sample(ids, plen, self.task, (self.index, f_idx, row))
        return None


class TokenStream:
    """Resumable, shuffled mixture of tokenised samples for one process (see the module's docstring).

    shards: task -> its token shards (training.tokens.pretokenize); weights: task -> mixture weight;
    tokenizer_key: recorded in the state, so a resume with another tokenizer is refused."""

    def __init__(self, shards: dict[str, list[Shard]], *, max_length: int, weights: dict[str, float],
                 seed: int = 0, shuffle_buffer: int = 1000, rank: int = 0, world_size: int = 1, loop: bool = True,
                 tokenizer_key: str = ""):
        self.tasks = [t for t in weights if weights[t] > 0]
        missing = [t for t in self.tasks if not shards.get(t)]
        if missing:
            raise CorpusError(f"mixture names task(s) {', '.join(missing)} without files "
                              f"(tasks with files: {', '.join(t for t in shards if shards[t]) or 'none'})")
        if not self.tasks:
            raise CorpusError("mixture: no task has a positive weight")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (got {max_length})")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1 (got {shuffle_buffer}; 1 means no shuffling)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.shards = {t: list(shards[t]) for t in self.tasks}
        total = sum(weights[t] for t in self.tasks)
        self.weights = {t: weights[t] / total for t in self.tasks}
        self.max_length, self.seed, self.shuffle_buffer = max_length, seed, shuffle_buffer
        self.rank, self.world_size, self.loop, self.tokenizer_key = rank, world_size, loop, tokenizer_key
        self._files = [[_ShardFile(s) for s in self.shards[t]] for t in self.tasks]
        self._readers = [_TaskReader(i, t, self._files[i], seed=seed, rank=rank, world_size=world_size, loop=loop)
                         for i, t in enumerate(self.tasks)]
        self._p = np.array([self.weights[t] for t in self.tasks])
        self._rng = np.random.default_rng([seed, rank])
        self._buffer: list[Sample] = []
        self.skipped: dict[str, int] = {}

    @property
    def epoch(self) -> int:
        """Passes over its shard that every task has completed (the least of the tasks')."""
        return min(r.passes + int(r.done) for r in self._readers)

    def _fingerprint(self) -> dict:
        return {"files": {t: [f"{s.key}@{Path(s.path).stem}" for s in self.shards[t]] for t in self.tasks},
                "weights": {t: round(w, 12) for t, w in self.weights.items()}, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "max_length": self.max_length,
                "shuffle_buffer": self.shuffle_buffer, "loop": self.loop, "tokenizer": self.tokenizer_key}

    # -- reading

    def _pick(self) -> Sample | None:
        """One sample from a task drawn by the mixture (among the tasks with samples left); None at the end."""
        while True:
            live = [i for i, r in enumerate(self._readers) if not r.done]
            if not live:
                return None
            p = self._p[live]
            k = live[int(np.searchsorted(np.cumsum(p), self._rng.random() * p.sum(), side="right").clip(0, len(live) - 1))]
            s = self._readers[k].next()
            if s is None:
                continue
            if len(s.ids) > self.max_length:
                n = self.skipped["longer_than_max_length"] = self.skipped.get("longer_than_max_length", 0) + 1
                if n == 1:
                    log.warning("samples longer than --max-length %d are skipped (first: %s of %s); raise "
                                "--max-length to keep them", self.max_length, s.ref, self.tasks[s.ref[0]])
                continue
            return s

    def __iter__(self) -> Iterator[Sample]:
        """Samples; endless when loop=True."""
        buf = self._buffer
        while True:
            while len(buf) < self.shuffle_buffer:
                s = self._pick()
                if s is None:
                    break
                buf.append(s)
            if not buf:
                return
            i = int(self._rng.integers(len(buf)))
            s, buf[i] = buf[i], buf[-1]
            buf.pop()
            yield s

    # -- references

    def fetch(self, refs: Sequence[Sequence[int]]) -> list[Sample]:
        """The samples named by (task, file, row) references, in order (read again from their shards)."""
        out: list[Sample | None] = [None] * len(refs)
        by_group: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
        for k, (t, f, row) in enumerate(refs):
            if not (0 <= t < len(self._files) and 0 <= f < len(self._files[t])
                    and 0 <= row < self._files[t][f].shard.rows):
                raise ValueError(f"data state names sample {(t, f, row)}, which these shards do not have")
            g, first = self._files[t][f].group_of(int(row))
            by_group.setdefault((t, f, g), []).append((k, int(row) - first))
        for (t, f, g), items in by_group.items():
            sf = self._files[t][f]
            group = _RowGroup(sf, g, 0)
            for k, i in items:
                ids, plen = group.row(i)
                out[k] = Sample(ids, plen, self.tasks[t], (t, f, int(refs[k][2])))
        for files in self._files:  # the readers reopen what they read from
            for sf in files:
                sf.close()
        return out  # type: ignore[return-value]

    # -- state

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "config": self._fingerprint(), "rng": self._rng.bit_generator.state,
                "readers": [r.state() for r in self._readers], "buffer": [list(s.ref) for s in self._buffer],
                "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        """Before iterating: continue exactly where the saved stream stopped (same shards, weights, seed, rank,
        world size, max_length, buffer size and tokenizer; otherwise ValueError naming what differs)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')} is not {STATE_VERSION} (saved by "
                             "another version of the trainer: start afresh)")
        mine, saved = self._fingerprint(), state["config"]
        diff = sorted(k for k in mine.keys() | saved.keys() if mine.get(k) != saved.get(k))
        if diff:
            shown = [f"{k} {saved.get(k)!r} then, {mine.get(k)!r} now" for k in diff
                     if not isinstance(mine.get(k), dict | list) and not isinstance(saved.get(k), dict | list)]
            changed = [k for k in diff if isinstance(mine.get(k), dict | list) or isinstance(saved.get(k), dict | list)]
            what = "; ".join(shown + [f"{k} differ" + (" (a corpus part changed, or another task mixture)"
                                                       if k in ("files", "weights") else "") for k in changed])
            raise ValueError(f"data state was saved with different {', '.join(diff)}: cannot resume exactly ({what}); "
                             "resume with the settings and corpus it was written with, or start afresh in another "
                             "--output-dir")
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = state["rng"]
        for r, s in zip(self._readers, state["readers"], strict=True):
            r.load(s)
        self._buffer = self.fetch(state["buffer"])
        self.skipped = dict(state["skipped"])
