"""The batches a training step takes, made off the critical path: token shards -> stream -> packer -> collate,
in a DataLoader worker process when asked, with pinned memory and batches prefetched ahead of the step.

torchdata's StatefulDataLoader carries each worker's position back with every batch, so a checkpoint holds
exactly the position after the last batch the loop consumed (never a prefetched one) and a resume with
workers continues token for token.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from schemas.errors import InputError
from training.packing import Packer, batches, collate
from training.stream import TokenStream
from training.tokens import Shard

log = logging.getLogger(__name__)
# torchdata 0.11 calls a torch API that torch >= 2.9 deprecates, at every iterator; nothing for a user to do
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)


@dataclass
class BatchSpec:
    """Everything that makes the batches of one process: picklable, so a worker process rebuilds them."""

    shards: dict[str, list[Shard]]
    weights: dict[str, float]
    max_length: int
    batch_size: int
    pad_id: int
    mode: str  # collate mode: flat / 4d / padded
    task_index: dict[str, int]
    seed: int = 0
    shuffle_buffer: int = 1000
    rank: int = 0
    world_size: int = 1
    pack: bool = True
    loop: bool = True
    loss_weights: bool = False
    pad_multiple: int | None = None
    tokenizer_key: str = ""
    window: int = 64

    def packer(self) -> Packer:
        """A fresh stream and packer as this spec describes them (at the start of the stream)."""
        stream = TokenStream(self.shards, max_length=self.max_length, weights=self.weights, seed=self.seed,
                             shuffle_buffer=self.shuffle_buffer, rank=self.rank, world_size=self.world_size,
                             loop=self.loop, tokenizer_key=self.tokenizer_key)
        return Packer(stream, self.max_length, pack=self.pack, window=self.window)


class PackedBatches(torch.utils.data.IterableDataset):
    """Collated micro-batches of one process (its own iterator), stateful in torchdata's sense: state_dict()
    is the packer's and the stream's position after the last batch it made."""

    def __init__(self, spec: BatchSpec):
        super().__init__()
        self.spec = spec
        self._packer: Packer | None = None
        self._groups = None
        self._pending: dict | None = None

    def _build(self) -> None:
        self._packer = self.spec.packer()
        if self._pending is not None:
            self._packer.load_state_dict(self._pending)
            self._pending = None
        self._groups = batches(self._packer, self.spec.batch_size)

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> dict:
        if self._packer is None:
            self._build()
        seqs = next(self._groups)
        s = self.spec
        return collate(seqs, pad_id=s.pad_id, mode=s.mode, task_index=s.task_index, loss_weights=s.loss_weights,
                       pad_multiple=s.pad_multiple)

    def state_dict(self) -> dict:
        if self._packer is None:
            if self._pending is not None:
                return self._pending
            self._build()
        return self._packer.state_dict()

    def load_state_dict(self, state: Mapping) -> None:
        self._pending = dict(state)
        self._packer = self._groups = None


class BatchLoader:
    """torchdata's StatefulDataLoader over PackedBatches, with the state reduced to the stream's own position
    after the last batch taken: a checkpoint then resumes with or without a worker, whatever it was written
    with (the loader's own state differs between the two)."""

    def __init__(self, spec: BatchSpec, *, workers: int, pin_memory: bool, prefetch: int = 4,
                 state: Mapping | None = None):
        from torchdata.stateful_dataloader import StatefulDataLoader

        if workers not in (0, 1):
            raise ValueError(f"dataloader workers must be 0 or 1 (got {workers}): one worker makes well over a "
                             "GPU's tokens per second (BENCHMARKS.md)")
        self.dataset = PackedBatches(spec)
        if state is not None:  # travels to the worker with the dataset
            self.dataset.load_state_dict(state)
        self.workers = workers
        kw = {}
        if workers:
            kw = {"prefetch_factor": prefetch, "persistent_workers": True, "multiprocessing_context": "spawn"}
        self.loader = StatefulDataLoader(self.dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                         snapshot_every_n_steps=1, **kw)
        self._taken = 0

    def __iter__(self):
        try:
            for batch in self.loader:
                self._taken += 1
                yield batch
        except InputError as e:  # raised in the worker: torch wraps its traceback into the message
            raise type(e)(worker_message(str(e))) from None

    def close(self) -> None:
        """Stop the worker process (a persistent worker otherwise lives until the loader is collected)."""
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def state_dict(self) -> dict:
        """The packer's and stream's position after the last batch this loader yielded."""
        if self._taken == 0:
            return self.dataset.state_dict()
        state = self.loader.state_dict()
        if not self.workers:
            return state["fetcher_state"]["dataset_iter_state"]
        if state.get("_steps_since_snapshot", 0) != 0:
            raise RuntimeError("the data loader's last snapshot is behind the last batch taken")
        snap = state["_snapshot"]["_worker_snapshots"]
        return snap[f"worker_{state['_snapshot']['_last_yielded_worker_id']}"]["fetcher_state"]["dataset_iter_state"]


def worker_message(text: str) -> str:
    """The original one-line message of an error torch re-raised from a worker ("Caught X in DataLoader
    worker process 0. Original Traceback ...: X: <message>")."""
    if not text.startswith("Caught "):
        return text
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    name, sep, message = last.partition(": ")
    return message if sep and "Error" in name else last


def make_loader(spec: BatchSpec, *, workers: int, pin_memory: bool, prefetch: int = 4,
                state: Mapping | None = None) -> BatchLoader:
    """The step's batches: `workers` processes (0: in this process) making them ahead, `prefetch` per worker,
    pinned when `pin_memory`; `state` (a BatchLoader.state_dict()) continues where it was taken. One worker is
    one stream: more than one would each need a shard of the process's samples, which changes the order with
    the worker count."""
    return BatchLoader(spec, workers=workers, pin_memory=pin_memory, prefetch=prefetch, state=state)
