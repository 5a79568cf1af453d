"""The SFT trainer's data path: corpus files -> mixture -> streamed, sharded, shuffled, tokenised samples ->
packed sequences -> padded batches with attention kept inside each sample.

Everything here streams: parquet is read with HF `datasets` in streaming mode (a few rows at a time), the only
buffers are the shuffle buffer and the packing window, and both are part of the resumable state, so a resumed
run yields exactly the sequences the uninterrupted run would have yielded.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from schemas.errors import InputError
from schemas.layout import parse_sample_rel

IGNORE_INDEX = -100
COLUMNS = ["sample_id", "task", "prompt", "completion"]
ATTENTION_MODES = ("4d", "flash", "padded")
STATE_VERSION = 1
_READ_BATCH = 64  # rows pulled from the parquet stream at a time
_TOKENIZE_BATCH = 32  # samples tokenised together (tokenizer(list) is much faster than one call per text)


class CorpusError(InputError):
    """Bad corpus or data options; the message names the corpus directory, task, split or file."""


# ------------------------------------------------------------------ corpus files and mixture


def _known_tasks() -> dict:
    from schemas.tasks import TASKS

    return TASKS


def open_corpus(corpus: str | Path):
    """The corpus version a reader of `corpus` sees (DIR's latest, or a pinned DIR/versions/<id>)."""
    from schemas.layout import CorpusNotFound, resolve

    try:
        return resolve(str(corpus))
    except CorpusNotFound as e:
        raise CorpusError(str(e)) from None


def samples_root(corpus: str | Path) -> Path:
    """The folder holding samples/<task>/<split>/ of the version `corpus` resolves to."""
    return Path(open_corpus(corpus).path("samples"))


def _read_manifest(corpus: Path) -> dict:
    manifest = open_corpus(corpus).manifest
    if "samples" not in manifest:
        raise CorpusError(f"corpus {corpus}: manifest.json has no 'samples' section: run the samples stage "
                          "(etl build with tasks) before training")
    return manifest


def _check_part(path: str) -> None:
    import pyarrow.parquet as pq

    from schemas import SAMPLES, SchemaMismatch, check

    try:
        schema = pq.read_schema(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise CorpusError(f"sample part {path}: not a readable parquet file ({e})") from e
    try:
        check(schema, SAMPLES, path)
    except SchemaMismatch as e:
        raise CorpusError(f"sample part {path} does not match the samples schema: {e}") from e


def corpus_files(corpus: str, split: str, tasks: Sequence[str] | None = None) -> dict[str, list[str]]:
    """task -> sorted parquet files under DIR/samples/<task>/<split>/, checked before any training.

    Raises CorpusError for a missing corpus or manifest, a manifest without a samples section, an unknown task,
    a requested task without files in the split, an empty split, a part whose schema is not schemas.SAMPLES,
    or a part the manifest lists that is not on disk (a task would silently drop out of the mixture).
    tasks=None: every task that has files in the split.
    """
    root = Path(corpus)
    manifest = _read_manifest(root)
    known = _known_tasks()
    if tasks is not None:
        tasks = list(tasks)
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise CorpusError(f"corpus {corpus}: unknown task(s) {', '.join(unknown)}; known tasks: "
                              f"{', '.join(known)}")
    samples = samples_root(root)
    found = {}
    for d in sorted(p for p in samples.iterdir() if p.is_dir()) if samples.is_dir() else []:
        parts = sorted(str(p) for p in (d / split).glob("*.parquet"))
        if parts:
            found[d.name] = parts
    listed: dict[str, list[str]] = {}  # task -> the parts of this split the manifest lists
    for rel in manifest["samples"].get("files", {}):
        task, rel_split = parse_sample_rel(rel)
        if rel_split == split:
            listed.setdefault(task, []).append(rel)
    damaged = {}
    for t in (listed if tasks is None else [t for t in tasks if t in listed]):
        absent = [rel for rel in listed[t] if not (samples.parent / rel).is_file()]
        if absent:
            damaged[t] = (len(absent), len(listed[t]))
    if damaged:
        what = "; ".join(f"{t}: {a} of its {n} part(s) missing" for t, (a, n) in sorted(damaged.items()))
        raise CorpusError(f"corpus {corpus}: split '{split}' lacks sample files its manifest lists ({what}); the "
                          f"corpus is damaged: rebuild it, or check it with `python -m etl.validate {corpus}`")
    if tasks is None:
        if not found:
            raise CorpusError(f"corpus {corpus}: no sample files for split '{split}' under {samples} "
                              "(empty corpus or unknown split)")
        selected = found
    else:
        missing = [t for t in tasks if t not in found]
        if missing:
            raise CorpusError(f"corpus {corpus}: task(s) {', '.join(missing)} have no files in split '{split}' "
                              f"(tasks with files there: {', '.join(found) or 'none'})")
        selected = {t: found[t] for t in dict.fromkeys(tasks)}
    for parts in selected.values():
        for p in parts:
            _check_part(p)
    return selected


def _rows(files: Sequence[str]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _parse_spec(spec: str | Mapping) -> dict[str, float]:
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = []
        for entry in (e.strip() for e in str(spec).split(",")):
            if not entry:
                continue
            name, sep, weight = entry.partition("=")
            items.append((name.strip(), weight.strip() if sep else "1"))
    out: dict[str, float] = {}
    for name, weight in items:
        if name in out:
            raise CorpusError(f"mixture {spec!r}: task {name} is named twice")
        try:
            w = float(weight)
        except (TypeError, ValueError):
            raise CorpusError(f"mixture {spec!r}: weight of {name} is not a number ({weight!r})") from None
        if not math.isfinite(w) or w < 0:
            raise CorpusError(f"mixture {spec!r}: weight of {name} must be a finite number >= 0 (got {weight!r})")
        out[name] = w
    return out


def _normalise(weights: dict[str, float], what: str) -> dict[str, float]:
    total = sum(weights.values())
    if total <= 0:
        raise CorpusError(f"mixture {what}: no task has a positive weight")
    return {t: w / total for t, w in weights.items() if w > 0}


def parse_mixture(spec: str | dict | None, available: Sequence[str] | Mapping[str, Sequence[str]], *,
                  files: Mapping[str, Sequence[str]] | None = None) -> dict[str, float]:
    """'cell_type_prediction=2,cell_lm=1' (a name without '=w' weighs 1) or a dict -> probabilities over the
    named tasks, summing to 1 (zero weights dropped). None -> proportional to the rows each task has, read from
    the parquet footers: that needs the files, so pass corpus_files()'s dict as `available` (or `files=`)."""
    if isinstance(available, Mapping):
        files = available if files is None else files
    names = list(available)
    if spec is None:
        if files is None:
            raise CorpusError("mixture None weighs tasks by their rows: pass the task -> files mapping from "
                              "corpus_files() as `available` (or files=), not only the task names")
        return _normalise({t: float(_rows(files[t])) for t in names}, "(rows per task)")
    weights = _parse_spec(spec)
    known = _known_tasks()
    unknown = [t for t in weights if t not in known]
    if unknown:
        raise CorpusError(f"mixture {spec!r}: unknown task(s) {', '.join(unknown)}; known tasks: {', '.join(known)}")
    absent = [t for t in weights if t not in names]
    if absent:
        raise CorpusError(f"mixture {spec!r}: task(s) {', '.join(absent)} have no samples in this split "
                          f"(available: {', '.join(names) or 'none'})")
    if not weights:
        raise CorpusError(f"mixture {spec!r}: names no task")
    return _normalise(weights, repr(spec))


# ------------------------------------------------------------------ tokenising


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos token: set tokenizer.eos_token "
                         "(every sample ends with eos)")
    return int(eos)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def prompt_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (Gemma's and Llama's BOS; [] for GPT-NeoX): what
    every prompt starts with. Any special token it appends (an eos) is left out: a prompt continues."""
    with_specials = tokenizer("", add_special_tokens=True)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None and with_specials[:1] == [bos] else []


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """THE prompt encoding, for training, evaluation and generation alike: the tokenizer's leading special
    tokens (BOS, when it adds one), then the prompt's tokens. A model never sees a prompt at generation time
    encoded otherwise than in training."""
    prefix = prompt_prefix(tokenizer)
    return [prefix + ids for ids in _encode(tokenizer, list(prompts))]


def _join(p_ids: list[int], r_ids: list[int], eos: int, max_length: int) -> tuple[list[int], list[int]] | None:
    n = len(p_ids) + len(r_ids) + 1
    if n > max_length:
        return None
    ids = list(p_ids) + list(r_ids) + [eos]
    return ids, [IGNORE_INDEX] * len(p_ids) + ids[len(p_ids):]


def tokenize_batch(tokenizer, prompts: list[str], responses: list[str], max_length: int
                   ) -> list[tuple[list[int], list[int]] | None]:
    """tokenize_sample over a batch, with one tokenizer call for the prompts and one for the responses."""
    eos = _eos_id(tokenizer)
    if not prompts:
        return []
    return [_join(p, r, eos, max_length)
            for p, r in zip(encode_prompts(tokenizer, list(prompts)), _encode(tokenizer, list(responses)),
                            strict=True)]


def tokenize_sample(tokenizer, prompt: str, response: str, max_length: int
                    ) -> tuple[list[int], list[int]] | None:
    """input_ids = encode_prompts(prompt) + ids(response) + [eos]; labels = -100 on the prompt tokens, the ids
    on the response and the eos (loss only on what the model should write). Prompt and response are tokenised
    separately; the prompt starts with the tokenizer's BOS when it adds one (as at generation), the response
    has no special tokens. None when longer than max_length (the caller counts it)."""
    return tokenize_batch(tokenizer, [prompt], [response], max_length)[0]


# ------------------------------------------------------------------ the sample stream


@contextlib.contextmanager
def _shutdown_wait(seconds: float | None):
    """datasets sleeps SLEEP_TIME_ON_THREADS_SHUTDOWN (5 s) whenever an interleaved parquet stream ends or is
    closed (a guard for apache/arrow#45214). Optionally shorten it, only around our own calls."""
    if seconds is None:
        yield
        return
    import datasets.config as dc

    old = dc.SLEEP_TIME_ON_THREADS_SHUTDOWN
    dc.SLEEP_TIME_ON_THREADS_SHUTDOWN = seconds
    try:
        yield
    finally:
        dc.SLEEP_TIME_ON_THREADS_SHUTDOWN = old


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _file_key(path: str) -> str:
    """The part's name inside the corpus (task/split/part): the same corpus moved elsewhere still resumes."""
    return "/".join(Path(path).parts[-3:])


class SampleStream:
    """Resumable, shuffled, interleaved stream of tokenised samples for one process.

    One `datasets` parquet stream per task (columns sample_id, task, prompt, response), interleaved with the
    mixture probabilities; loop=True: stopping strategy "all_exhausted" and, when an epoch ends, a new one with
    a reshuffled file order and interleave seed (both from seed+epoch); loop=False: every sample of this
    process's shard exactly once ("all_exhausted_without_replacement"). Sharded once across processes with
    split_dataset_by_node (by file when the file count allows, else every world_size-th row). Shuffled with its
    own buffer (numpy Generator seeded from seed and rank), whose contents are part of state_dict(), unlike
    datasets' shuffle buffer. The buffer and the state hold raw text, so the state is tokenizer-independent.

    close_wait_s: None keeps datasets' 5 s sleep when a stream ends or is closed; a number replaces it.
    """

    def __init__(self, files: dict[str, list[str]], tokenizer, *, max_length: int, weights: dict[str, float],
                 seed: int = 0, shuffle_buffer: int = 1000, rank: int = 0, world_size: int = 1,
                 loop: bool = True, close_wait_s: float | None = None):
        self.tasks = [t for t in weights if weights[t] > 0]
        missing = [t for t in self.tasks if not files.get(t)]
        if missing:
            raise CorpusError(f"mixture names task(s) {', '.join(missing)} without files "
                              f"(tasks with files: {', '.join(t for t in files if files[t]) or 'none'})")
        if not self.tasks:
            raise CorpusError("mixture: no task has a positive weight")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (got {max_length})")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1 (got {shuffle_buffer}; 1 means no shuffling)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.files = {t: list(files[t]) for t in self.tasks}
        total = sum(weights[t] for t in self.tasks)
        self.weights = {t: weights[t] / total for t in self.tasks}
        self.tokenizer, self.max_length, self.seed = tokenizer, max_length, seed
        self.shuffle_buffer, self.rank, self.world_size, self.loop = shuffle_buffer, rank, world_size, loop
        self.close_wait_s = close_wait_s
        _eos_id(tokenizer)
        self.skipped: dict[str, int] = {}
        self.epoch = 0
        self._rng = np.random.default_rng([seed, rank])
        self._incoming: deque[list] = deque()  # rows read from parquet, not yet in the buffer
        self._buffer: list[list] = []  # the shuffle buffer: [sample_id, task, prompt, response]
        self._ready: deque[list] = deque()  # drawn from the buffer, not yet yielded
        self._ready_tok: deque | None = None  # their tokenisation (rebuilt after a resume)
        self._ds = self._it = None
        self._ds_state: dict | None = None  # to load into the next epoch's stream (resume)
        self._rows_this_epoch = 0
        self._exhausted = False

    # -- reading

    def _fingerprint(self) -> dict:
        return {"files": {t: [_file_key(f) for f in fs] for t, fs in self.files.items()},
                "weights": {t: round(w, 12) for t, w in self.weights.items()}, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "max_length": self.max_length,
                "shuffle_buffer": self.shuffle_buffer, "loop": self.loop}

    def _open_epoch(self) -> None:
        from datasets import Features, Value, interleave_datasets, load_dataset
        from datasets.distributed import split_dataset_by_node

        order = np.random.default_rng([self.seed, self.epoch, 1])
        data_files = {t: [fs[i] for i in order.permutation(len(fs))] for t, fs in self.files.items()}
        features = Features({c: Value("string") for c in COLUMNS})  # one type for all parts (large_string too)
        parts = load_dataset("parquet", data_files=data_files, streaming=True, columns=COLUMNS, features=features)
        ds = interleave_datasets([parts[t] for t in self.tasks], probabilities=[self.weights[t] for t in self.tasks],
                                 seed=_derived_seed(self.seed, self.epoch),
                                 stopping_strategy="all_exhausted" if self.loop else
                                 "all_exhausted_without_replacement")
        ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        if self._ds_state is not None:
            ds.load_state_dict(self._ds_state)
            self._ds_state = None
        self._ds, self._it = ds, ds.iter(batch_size=_READ_BATCH)

    def _read(self) -> bool:
        """Move one batch of rows from parquet into `_incoming`; False when this process's data is done."""
        while not self._exhausted:
            if self._it is None:
                self._open_epoch()
            with _shutdown_wait(self.close_wait_s):
                batch = next(self._it, None)
            if batch is not None:
                rows = [list(r) for r in zip(*(batch[c] for c in COLUMNS), strict=True)]
                self._incoming.extend(rows)
                self._rows_this_epoch += len(rows)
                return True
            self._ds = self._it = None
            if not self.loop:
                self._exhausted = True
            elif self._rows_this_epoch == 0:
                raise CorpusError(f"rank {self.rank} of {self.world_size} received no samples in epoch {self.epoch} "
                                  f"(tasks {', '.join(self.tasks)}): fewer samples than processes?")
            else:
                self.epoch += 1
                self._rows_this_epoch = 0
        return False

    def _draw(self) -> list | None:
        """One row out of the shuffle buffer, refilled first; None when everything has been drawn."""
        while len(self._buffer) < self.shuffle_buffer:
            if not self._incoming and not self._read():
                break
            self._buffer.append(self._incoming.popleft())
        if not self._buffer:
            return None
        i = int(self._rng.integers(len(self._buffer)))
        row, self._buffer[i] = self._buffer[i], self._buffer[-1]
        self._buffer.pop()
        return row

    def _fill_ready(self) -> None:
        while len(self._ready) < _TOKENIZE_BATCH:
            row = self._draw()
            if row is None:
                break
            self._ready.append(row)
        self._tokenize_ready()

    def _tokenize_ready(self) -> None:
        rows = list(self._ready)
        self._ready_tok = deque(tokenize_batch(self.tokenizer, [r[2] for r in rows], [r[3] for r in rows],
                                               self.max_length))

    def __iter__(self) -> Iterator[dict]:
        """{"input_ids", "labels", "task", "sample_id"}; endless when loop=True."""
        while True:
            if not self._ready:
                self._fill_ready()
                if not self._ready:
                    return
            elif self._ready_tok is None:
                self._tokenize_ready()
            row, tok = self._ready.popleft(), self._ready_tok.popleft()
            if tok is None:
                self.skipped["longer_than_max_length"] = self.skipped.get("longer_than_max_length", 0) + 1
                continue
            yield {"input_ids": tok[0], "labels": tok[1], "task": row[1], "sample_id": row[0]}

    # -- state

    def state_dict(self) -> dict:
        """JSON-serialisable exact position: the datasets stream's state, the buffers, RNG state and epoch."""
        ds_state = self._ds.state_dict() if self._ds is not None else self._ds_state
        return {"version": STATE_VERSION, "config": self._fingerprint(), "epoch": self.epoch,
                "rows_this_epoch": self._rows_this_epoch, "exhausted": self._exhausted, "datasets": ds_state,
                "rng": self._rng.bit_generator.state, "incoming": list(self._incoming),
                "buffer": list(self._buffer), "ready": list(self._ready), "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        """Before iterating: continue exactly where the saved stream stopped (same files, weights, seed, rank,
        world size, max_length, buffer size; otherwise ValueError naming what differs)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')} is not {STATE_VERSION}")
        mine, saved = self._fingerprint(), state["config"]
        diff = sorted(k for k in mine.keys() | saved.keys() if mine.get(k) != saved.get(k))
        if diff:
            raise ValueError(f"data state was saved with different {', '.join(diff)}: cannot resume exactly "
                             f"(saved {[saved.get(k) for k in diff]}, now {[mine.get(k) for k in diff]})")
        self.close()
        self.epoch, self._rows_this_epoch = int(state["epoch"]), int(state["rows_this_epoch"])
        self._exhausted = bool(state["exhausted"])
        self._ds_state = state["datasets"]
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = state["rng"]
        self._incoming = deque(list(r) for r in state["incoming"])
        self._buffer = [list(r) for r in state["buffer"]]
        self._ready = deque(list(r) for r in state["ready"])
        self._ready_tok = None
        self.skipped = dict(state["skipped"])

    def close(self) -> None:
        """Close the underlying parquet stream (its state is kept for state_dict)."""
        if self._it is not None:
            self._ds_state = self._ds.state_dict()
            with _shutdown_wait(self.close_wait_s):
                self._it.close()
        self._ds = self._it = None

    def __del__(self) -> None:
        # Close here, with close_wait_s, rather than when the parquet generator is collected (datasets' 5 s).
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> SampleStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------ packing


def _sequence(samples: list[list]) -> dict:
    """Samples [sample_id, task, input_ids, labels] -> one sequence dict."""
    return {"input_ids": [i for s in samples for i in s[2]], "labels": [i for s in samples for i in s[3]],
            "seq_lens": [len(s[2]) for s in samples], "tasks": [s[1] for s in samples],
            "sample_ids": [s[0] for s in samples]}


class Packer:
    """Packs tokenised samples into sequences of at most max_length tokens.

    Best fit over a window: each sample goes to the fullest open sequence it fits (a new one when none has
    room); a sequence is emitted as soon as it is exactly full, and the fullest one is emitted whenever the open
    sequences hold `window` samples. At the end of a finite stream the open sequences are emitted fullest
    first. pack=False: each sample is its own sequence. Sequences carry "input_ids", "labels", "seq_lens",
    "tasks" and "sample_ids". Resumable: state_dict() holds the open sequences, the sequences built but not yet
    yielded, and the stream's state.
    """

    def __init__(self, stream: SampleStream, max_length: int, *, pack: bool = True, window: int = 64):
        if window < 1:
            raise ValueError(f"window must be >= 1 (got {window})")
        self.stream, self.max_length, self.pack, self.window = stream, max_length, pack, window
        self._bins: list[list[list]] = []  # open sequences, each a list of samples
        self._used: list[int] = []
        self._out: deque[dict] = deque()
        self._source: Iterator[dict] | None = None

    def _config(self) -> dict:
        return {"max_length": self.max_length, "pack": self.pack, "window": self.window}

    def _emit(self, k: int) -> None:
        self._out.append(_sequence(self._bins.pop(k)))
        self._used.pop(k)

    def _fullest(self) -> int:
        return max(range(len(self._used)), key=lambda k: (self._used[k], -k))

    def _add(self, s: dict) -> None:
        n = len(s["input_ids"])
        if n > self.max_length:
            raise ValueError(f"sample {s['sample_id']} has {n} tokens > packer max_length {self.max_length} "
                             "(give the stream and the packer the same max_length)")
        sample = [s["sample_id"], s["task"], s["input_ids"], s["labels"]]
        if not self.pack:
            self._out.append(_sequence([sample]))
            return
        fits = [k for k, u in enumerate(self._used) if u + n <= self.max_length]
        if fits:
            k = max(fits, key=lambda j: (self._used[j], -j))
            self._bins[k].append(sample)
            self._used[k] += n
        else:
            k = len(self._bins)
            self._bins.append([sample])
            self._used.append(n)
        if self._used[k] == self.max_length:
            self._emit(k)
        while self._bins and sum(len(b) for b in self._bins) >= self.window:
            self._emit(self._fullest())

    def __iter__(self) -> Iterator[dict]:
        if self._source is None:
            self._source = iter(self.stream)
        while True:
            while not self._out:
                s = next(self._source, None)
                if s is None:
                    while self._bins:
                        self._emit(self._fullest())
                    if not self._out:
                        return
                    break
                self._add(s)
            yield self._out.popleft()

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "config": self._config(), "bins": self._bins, "used": self._used,
                "out": list(self._out), "stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Before iterating: the open and built sequences come back and the stream continues where it stopped."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"packer state version {state.get('version')} is not {STATE_VERSION}")
        if state["config"] != self._config():
            raise ValueError(f"packer state was saved with {state['config']}, this packer has {self._config()}")
        self.stream.load_state_dict(state["stream"])
        self._bins = [[list(s) for s in b] for b in state["bins"]]
        self._used = [int(u) for u in state["used"]]
        self._out = deque(state["out"])
        self._source = None

    def close(self) -> None:
        self.stream.close()

    def __enter__(self) -> Packer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def batches(packer: Packer, batch_size: int, *, drop_last: bool = False) -> Iterator[list[dict]]:
    """Groups of batch_size sequences. A last partial group only exists when the stream is finite (loop=False,
    e.g. evaluation): it is yielded unless drop_last. Packer state saved between groups resumes exactly."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    group: list[dict] = []
    for seq in packer:
        group.append(seq)
        if len(group) == batch_size:
            yield group
            group = []
    if group and not drop_last:
        yield group


# ------------------------------------------------------------------ collation


def _default_task_index() -> dict[str, int]:
    return {t: i for i, t in enumerate(_known_tasks())}


def _check_sequence(i: int, s: dict) -> int:
    n = len(s["input_ids"])
    if len(s["labels"]) != n or sum(s["seq_lens"]) != n or len(s["tasks"]) != len(s["seq_lens"]):
        raise ValueError(f"sequence {i}: input_ids ({n}), labels ({len(s['labels'])}), seq_lens (sum "
                         f"{sum(s['seq_lens'])}) and tasks ({len(s['tasks'])} for {len(s['seq_lens'])} samples) "
                         "do not agree")
    return n


def _segments(sequences: list[dict], width: int, task_index: Mapping[str, int]):
    """Per row: position ids restarting per sample (padding restarts too, as its own run), a segment id per
    token (samples 0.., each padding token its own negative id) and the task index per token (-1 on padding)."""
    b = len(sequences)
    pos = np.zeros((b, width), np.int64)
    seg = np.zeros((b, width), np.int64)
    task = np.full((b, width), -1, np.int64)
    for r, s in enumerate(sequences):
        off = 0
        for k, (n, t) in enumerate(zip(s["seq_lens"], s["tasks"], strict=True)):
            if t not in task_index:
                raise ValueError(f"sequence {r}: task {t!r} is not in task_index ({', '.join(task_index)})")
            pos[r, off:off + n] = np.arange(n)
            seg[r, off:off + n] = k
            task[r, off:off + n] = task_index[t]
            off += n
        pos[r, off:] = np.arange(width - off)
        seg[r, off:] = -1 - np.arange(width - off)
    return pos, seg, task


def _sample_weights(labels: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """1 / (labelled tokens of its sample) at every labelled position; 0 elsewhere."""
    counted = labels != IGNORE_INDEX
    out = np.zeros(labels.shape, np.float32)
    for r in range(labels.shape[0]):
        ids = seg[r][counted[r]]
        if ids.size:
            n = np.bincount(ids)
            out[r, counted[r]] = 1.0 / n[ids]
    return out


def samples_with_labels(sequences: list[dict]) -> int:
    """Samples holding at least one labelled (completion) token: the denominator of per-sample losses."""
    total = 0
    for s in sequences:
        off = 0
        for n in s["seq_lens"]:
            total += any(x != IGNORE_INDEX for x in s["labels"][off:off + n])
            off += n
    return total


def _additive_mask(seg: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B,1,L,L]: 0 where query i may see key j (same segment, j <= i), finfo(dtype).min elsewhere."""
    width = seg.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril_()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def collate(sequences: list[dict], *, pad_id: int, attention: str = "4d", dtype=torch.float32,
            task_index: dict[str, int] | None = None, pad_to: int | None = None,
            loss_weights: bool = False) -> dict[str, torch.Tensor]:
    """Packed sequences -> model inputs, with each sample seeing only itself.

    input_ids [B,L] (pad_id), labels [B,L] (-100 on padding and prompts), position_ids [B,L] restarting at 0
    for every sample, token_task [B,L] (task_index of the sample a token belongs to, -1 on padding; default
    index: etl.tasks.TASKS order). L = longest sequence (or pad_to). attention:
      "4d": attention_mask [B,1,L,L] additive float of `dtype` (block-diagonal causal; padding tokens see only
        themselves, so no NaN): the correct path under sdpa/eager, where restarting position_ids alone do not
        isolate packed samples.
      "flash": no attention_mask; the whole batch is flattened into ONE row [1, sum of lengths] (transformers'
        padding-free flash-attention path only recognises packed samples from position_ids when batch size is
        1); pad_to pads that row.
      "padded": one sample per row (ValueError otherwise), attention_mask [B,L] of 0/1.
    loss_weights: also loss_weights [B,L] float32, 1 / (completion tokens of the sample) on each completion
    token, 0 elsewhere: Σ weight × NLL is the sum over samples of each sample's mean token loss.
    """
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention={attention!r}: expected one of {', '.join(ATTENTION_MODES)}")
    if not sequences:
        raise ValueError("collate: empty batch")
    task_index = _default_task_index() if task_index is None else task_index
    lengths = [_check_sequence(i, s) for i, s in enumerate(sequences)]
    if attention == "padded":
        several = [i for i, s in enumerate(sequences) if len(s["seq_lens"]) != 1]
        if several:
            raise ValueError(f"attention='padded' takes one sample per row; sequences {several} hold several "
                             "(use pack=False, or attention='4d'/'flash')")
    if attention == "flash":
        sequences = [{"input_ids": [i for s in sequences for i in s["input_ids"]],
                      "labels": [i for s in sequences for i in s["labels"]],
                      "seq_lens": [n for s in sequences for n in s["seq_lens"]],
                      "tasks": [t for s in sequences for t in s["tasks"]]}]
        lengths = [sum(lengths)]
    width = max(lengths) if pad_to is None else pad_to
    if width < max(lengths):
        raise ValueError(f"pad_to={pad_to} is shorter than the longest sequence ({max(lengths)} tokens)")
    ids = np.full((len(sequences), width), pad_id, np.int64)
    labels = np.full((len(sequences), width), IGNORE_INDEX, np.int64)
    for r, (s, n) in enumerate(zip(sequences, lengths, strict=True)):
        ids[r, :n] = s["input_ids"]
        labels[r, :n] = s["labels"]
    pos, seg, task = _segments(sequences, width, task_index)
    out = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
           "position_ids": torch.from_numpy(pos), "token_task": torch.from_numpy(task)}
    if loss_weights:
        out["loss_weights"] = torch.from_numpy(_sample_weights(labels, seg))
    if attention == "4d":
        out["attention_mask"] = _additive_mask(torch.from_numpy(seg), dtype)
    elif attention == "padded":
        out["attention_mask"] = torch.from_numpy((np.arange(width)[None, :] < np.array(lengths)[:, None])
                                                 .astype(np.int64))
    return out


__all__ = ["ATTENTION_MODES", "COLUMNS", "IGNORE_INDEX", "CorpusError", "Packer", "SampleStream", "batches",
           "collate", "corpus_files", "encode_prompts", "parse_mixture", "tokenize_batch", "tokenize_sample"]
