"""Packing tokenised samples into sequences, and collating sequences into the tensors a step takes.

Both work on token arrays (numpy), never on Python lists of ints: the collated batch of 8 × 1,024 tokens is
a handful of vectorised operations. Everything the step would otherwise compute on the device, and wait
for, is computed here on the CPU: sample boundaries (`cu_seq_lens`, the longest sample), the positions
whose next token is a response token (`loss_index`) with their targets and per-sample weights, and the
counts the loss is normalised by. The step then needs no host sync.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from training.data import IGNORE_INDEX
from training.stream import Sample, TokenStream

PACKER_STATE_VERSION = 2
COLLATE_MODES = ("flat", "4d", "padded")


class Packer:
    """Best fit over a window: each sample goes to the fullest open sequence it fits (a new one when none
    has room); a sequence is emitted as soon as it is exactly full, and the fullest one whenever the open
    sequences hold `window` samples. At the end of a finite stream the open sequences are emitted fullest
    first. pack=False: each sample is its own sequence. A sequence is a list of Samples. Resumable:
    state_dict() names the open and the built sequences' samples by reference, with the stream's state."""

    def __init__(self, stream: TokenStream, max_length: int, *, pack: bool = True, window: int = 64):
        if window < 1:
            raise ValueError(f"window must be >= 1 (got {window})")
        self.stream, self.max_length, self.pack, self.window = stream, max_length, pack, window
        self._bins: list[list[Sample]] = []
        self._used: list[int] = []
        self._held = 0  # samples in the open bins
        self._out: deque[list[Sample]] = deque()
        self._source: Iterator[Sample] | None = None

    def _config(self) -> dict:
        return {"max_length": self.max_length, "pack": self.pack, "window": self.window}

    def _emit(self, k: int) -> None:
        self._held -= len(self._bins[k])
        self._out.append(self._bins.pop(k))
        self._used.pop(k)

    def _fullest(self) -> int:
        used = self._used
        return max(range(len(used)), key=lambda k: (used[k], -k))

    def _add(self, s: Sample) -> None:
        n = len(s.ids)
        if n > self.max_length:
            raise ValueError(f"sample {s.ref} has {n} tokens > packer max_length {self.max_length} "
                             "(give the stream and the packer the same max_length)")
        if not self.pack:
            self._out.append([s])
            return
        room = self.max_length - n
        best, best_used = -1, -1
        for k, u in enumerate(self._used):
            if u <= room and u > best_used:
                best, best_used = k, u
        if best < 0:
            best = len(self._bins)
            self._bins.append([s])
            self._used.append(n)
        else:
            self._bins[best].append(s)
            self._used[best] += n
        self._held += 1
        if self._used[best] == self.max_length:
            self._emit(best)
        while self._bins and self._held >= self.window:
            self._emit(self._fullest())

    def __iter__(self) -> Iterator[list[Sample]]:
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
        return {"version": PACKER_STATE_VERSION, "config": self._config(),
                "bins": [[list(s.ref) for s in b] for b in self._bins], "used": list(self._used),
                "out": [[list(s.ref) for s in q] for q in self._out], "stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Before iterating: the open and built sequences come back and the stream continues where it stopped."""
        if state.get("version") != PACKER_STATE_VERSION:
            raise ValueError(f"packer state version {state.get('version')} is not {PACKER_STATE_VERSION} (saved by "
                             "another version of the trainer: start afresh)")
        if state["config"] != self._config():
            raise ValueError(f"packer state was saved with {state['config']}, this packer has {self._config()}")
        self.stream.load_state_dict(state["stream"])
        groups = [*state["bins"], *state["out"]]
        fetched = iter(self.stream.fetch([r for g in groups for r in g]))
        rebuilt = [[next(fetched) for _ in g] for g in groups]
        nb = len(state["bins"])
        self._bins, self._out = rebuilt[:nb], deque(rebuilt[nb:])
        self._used = [int(u) for u in state["used"]]
        self._held = sum(len(b) for b in self._bins)
        self._source = None


def batches(packer: Packer, batch_size: int, *, drop_last: bool = False) -> Iterator[list[list[Sample]]]:
    """Groups of batch_size sequences. A last partial group only exists when the stream is finite (loop=False,
    e.g. evaluation): it is yielded unless drop_last. Packer state saved between groups resumes exactly."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    group: list[list[Sample]] = []
    for seq in packer:
        group.append(seq)
        if len(group) == batch_size:
            yield group
            group = []
    if group and not drop_last:
        yield group


# ------------------------------------------------------------------ collation


def sample_from_tokens(ids, labels, task: str) -> Sample:
    """A Sample from tokenize_sample's (input_ids, labels): the prompt is the leading -100 labels."""
    lab = np.asarray(labels)
    resp = np.flatnonzero(lab != IGNORE_INDEX)
    return Sample(np.asarray(ids, dtype=np.int64), int(resp[0]) if resp.size else len(lab), task, (-1, -1, -1))


def _lengths(samples: list[Sample]) -> tuple[np.ndarray, np.ndarray]:
    lens = np.fromiter((len(s.ids) for s in samples), np.int64, len(samples))
    # a sample's first token is never a label: nothing before it in its sample could predict it
    plen = np.fromiter((max(s.prompt_len, 1) for s in samples), np.int64, len(samples))
    return lens, np.minimum(plen, lens)


def _flat_fields(samples: list[Sample], task_index: Mapping[str, int]):
    """Concatenated ids, labels, positions, task ids and per-token sample weights of samples laid end to end."""
    lens, plen = _lengths(samples)
    total = int(lens.sum())
    ids = np.concatenate([s.ids for s in samples]).astype(np.int64, copy=False) if samples else np.zeros(0, np.int64)
    starts = np.cumsum(lens) - lens
    pos = np.arange(total, dtype=np.int64) - np.repeat(starts, lens)
    resp = pos >= np.repeat(plen, lens)
    labels = np.where(resp, ids, IGNORE_INDEX)
    try:
        tasks = np.fromiter((task_index[s.task] for s in samples), np.int64, len(samples))
    except KeyError as e:
        raise ValueError(f"task {e.args[0]!r} is not in task_index ({', '.join(task_index)})") from None
    n_resp = lens - plen
    weight = np.repeat(np.where(n_resp > 0, 1.0 / np.maximum(n_resp, 1), 0.0), lens).astype(np.float32) * resp
    return ids, labels, pos, np.repeat(tasks, lens), weight, lens, int((n_resp > 0).sum())


def collate(sequences: list[list[Sample]], *, pad_id: int, mode: str = "flat", task_index: Mapping[str, int],
            loss_weights: bool = False, pad_to: int | None = None, pad_multiple: int | None = None) -> dict:
    """Packed sequences -> the step's inputs, each sample seeing only itself.

    Always: input_ids, labels (-100 on prompts and padding), position_ids restarting at 0 for every sample,
    token_task (task_index of each token's sample, -1 on padding), and the counts n_tokens (real tokens),
    n_labels (response tokens), n_samples (samples with a response token), n_slots (tokens incl. padding).
    mode:
      "flat": the whole batch as ONE row [1, T] (padding-free attention: varlen, flash-attention, flex), with
        cu_seq_lens [S+1] (int32) and max_seqlen; loss_index (positions t whose token t+1 is a response token)
        and loss_target (those tokens): the LM head runs there only. pad_multiple: pad T up to a multiple (a
        padding run of its own, for torch.compile's shape buckets).
      "4d": one row per sequence, [B, L] (L = longest, or pad_to), with segment_ids (the sample of each token;
        each padding token its own): the block-diagonal mask is built from them on the device.
      "padded": one sample per row (ValueError otherwise), attention_mask [B, L] of 0/1.
    loss_weights: 1 / (response tokens of its sample) at each response token ("loss_weight" [K] beside
    loss_index in flat mode, "loss_weights" [B, L] otherwise): Σ weight × NLL sums each sample's mean.
    """
    if mode not in COLLATE_MODES:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(COLLATE_MODES)}")
    if not sequences:
        raise ValueError("collate: empty batch")
    if mode == "padded":
        several = [i for i, q in enumerate(sequences) if len(q) != 1]
        if several:
            raise ValueError(f"mode='padded' takes one sample per row; sequences {several} hold several "
                             "(use pack=False, or mode='4d'/'flat')")
    samples = [s for q in sequences for s in q]
    ids, labels, pos, task, weight, lens, n_samples = _flat_fields(samples, task_index)
    total = len(ids)
    out: dict = {"n_tokens": total, "n_labels": int((labels != IGNORE_INDEX).sum()), "n_samples": n_samples}
    if mode == "flat":
        pad = (-total) % pad_multiple if pad_multiple else 0
        if pad:
            ids = np.concatenate([ids, np.full(pad, pad_id, np.int64)])
            labels = np.concatenate([labels, np.full(pad, IGNORE_INDEX, np.int64)])
            pos = np.concatenate([pos, np.arange(pad, dtype=np.int64)])
            task = np.concatenate([task, np.full(pad, -1, np.int64)])
            weight = np.concatenate([weight, np.zeros(pad, np.float32)])
            lens = np.concatenate([lens, [pad]])
        cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        target = labels[1:]
        keep = np.flatnonzero(target != IGNORE_INDEX)
        arrays = {"input_ids": ids[None], "labels": labels[None], "position_ids": pos[None], "token_task": task[None],
                  "cu_seq_lens": cu, "loss_index": keep, "loss_target": target[keep]}
        if loss_weights:
            arrays["loss_weight"] = weight[1:][keep]
        return out | _tensors(arrays) | {"max_seqlen": int(lens.max()), "n_slots": len(ids)}
    # one row per sequence
    row_lens = np.fromiter((sum(len(s.ids) for s in q) for q in sequences), np.int64, len(sequences))
    width = int(row_lens.max()) if pad_to is None else pad_to
    if width < row_lens.max():
        raise ValueError(f"pad_to={pad_to} is shorter than the longest sequence ({int(row_lens.max())} tokens)")
    b = len(sequences)
    rows = np.repeat(np.arange(b), row_lens)
    cols = np.arange(total) - np.repeat(np.cumsum(row_lens) - row_lens, row_lens)
    grid = lambda fill: np.full((b, width), fill, np.int64)  # noqa: E731
    ids2, lab2, pos2, task2 = grid(pad_id), grid(IGNORE_INDEX), grid(0), grid(-1)
    for arr, src in ((ids2, ids), (lab2, labels), (pos2, pos), (task2, task)):
        arr[rows, cols] = src
    real = np.zeros((b, width), bool)
    real[rows, cols] = True
    pad_pos = np.cumsum(~real, axis=1) - 1  # padding restarts its own run of positions
    pos2 = np.where(real, pos2, pad_pos)
    arrays = {"input_ids": ids2, "labels": lab2, "position_ids": pos2, "token_task": task2}
    if loss_weights:
        w2 = np.zeros((b, width), np.float32)
        w2[rows, cols] = weight
        arrays["loss_weights"] = w2
    if mode == "4d":
        seg = -1 - np.arange(b * width, dtype=np.int64).reshape(b, width)  # padding: each token its own
        seg[rows, cols] = np.repeat(np.arange(len(samples)), lens)
        arrays["segment_ids"] = seg
    else:
        arrays["attention_mask"] = real.astype(np.int64)
    return out | _tensors(arrays) | {"n_slots": b * width}


def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Tensors of the arrays, all views of ONE storage (each array in its own 8-byte-aligned run of it): a
    batch crosses from a worker process as one shared-memory block, where each storage costs a file
    descriptor and a mapping (measured from one worker on 2 cores: one block per field 1.1M, one per dtype
    1.5-1.8M, one in all ~3M tokens/s delivered)."""
    slots = {k: -(-a.nbytes // 8) for k, a in arrays.items()}
    buf = torch.empty(sum(slots.values()), dtype=torch.int64)
    raw = buf.numpy().view(np.uint8)
    out: dict[str, torch.Tensor] = {}
    at = 0
    for k, a in arrays.items():
        n = slots[k]
        raw[at * 8 : at * 8 + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        dtype = torch.from_numpy(np.zeros(0, a.dtype)).dtype
        out[k] = buf[at : at + n].view(dtype)[: a.size].view(a.shape)
        at += n
    return out
