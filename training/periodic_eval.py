"""Evaluation during training: loss per task on a fixed validation set, and generation-based cell-type
accuracy on a fixed number of validation cells.

The set is the first N rows of each task's validation parts (read with pyarrow, bounded), so every
evaluation of a run, and of a resumed run, scores the same samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from language.corpus import open_corpus
from language.prompts import answer_budget, predicted_label
from schemas.layout import open_parquet
from training.data import tokenize_sample
from training.decode import decode
from training.losses import collate_mode, model_inputs, response_loss
from training.packing import collate, sample_from_tokens
from training.stream import Sample

log = logging.getLogger(__name__)

CELL_TYPE_TASK = "cell_type_prediction"
__all__ = ["CELL_TYPE_TASK", "EvalSet", "answer_budget", "cell_type_accuracy", "loss_per_task",
           "predicted_label"]


def _head(paths: list[str], n: int, columns: list[str]) -> list[dict]:
    rows: list[dict] = []
    for path in paths:
        f = open_parquet(path)
        for g in range(f.num_row_groups):
            rows += f.read_row_group(g, columns=columns).slice(0, n - len(rows)).to_pylist()
            if len(rows) >= n:
                return rows
    return rows


@dataclass
class EvalSet:
    sequences: dict[str, list[list[Sample]]] = field(default_factory=dict)  # task -> one-sample sequences
    cells: list[tuple[str, str]] = field(default_factory=list)  # (prompt, cell type)
    texts: list[str] = field(default_factory=list)  # prompt + response, for the tokenizer check

    @property
    def tasks(self) -> list[str]:
        return sorted(self.sequences)

    @classmethod
    def load(cls, corpus: str, split: str, tasks: list[str], tokenizer, max_length: int, *, per_task: int,
             cells: int) -> EvalSet:
        """The first `per_task` samples of each task in `split` (tasks the split lacks are left out and
        logged), and the first `cells` cell_type_prediction samples for the accuracy."""
        parts = open_corpus(corpus).split_parts(split)
        out = cls()
        missing = []
        for task in tasks:
            paths = parts.get(task, [])
            if not paths:
                missing.append(task)
                continue
            rows = _head(paths, max(per_task, cells if task == CELL_TYPE_TASK else 0),
                         ["sample_id", "prompt", "completion", "label"])
            seqs = []
            for r in rows[:per_task]:
                out.texts.append(r["prompt"] + r["completion"])
                tok = tokenize_sample(tokenizer, r["prompt"], r["completion"], max_length)
                if tok is not None:
                    seqs.append([sample_from_tokens(tok[0], tok[1], task)])
            if seqs:
                out.sequences[task] = seqs
            if task == CELL_TYPE_TASK and cells:
                out.cells = [(r["prompt"], r["label"]) for r in rows[:cells]]  # the corpus's bare answer
        if missing:
            log.warning("the %s split has no samples of %s: not evaluated", split, ", ".join(missing))
        return out


def cell_type_accuracy(model, tokenizer, cells: list[tuple[str, str]], max_new_tokens: int | None = None) -> float:
    """Share of cells whose greedy continuation names their cell type (case-insensitive, exact label); the
    generation budget fits the longest label unless given."""

    if not cells:
        return 0.0
    budget = max_new_tokens or answer_budget(tokenizer, [label for _, label in cells])
    outs = [d.text for d in decode(model, tokenizer, [p for p, _ in cells], max_new_tokens=budget, batch_size=16,
                                   skip_special_tokens=True)]
    hits = sum(predicted_label(o).lower() == label.lower() for o, (_, label) in zip(outs, cells, strict=True))
    return hits / max(len(cells), 1)


def loss_per_task(model, evalset: EvalSet, pad_id: int, device, mode: str, dtype, task_index: dict,
                  batch_size: int, *, fused: bool = False) -> dict[str, tuple[float, int]]:
    """task -> (mean response-token NLL, response tokens), one sample per row (no packing needed)."""
    config = getattr(getattr(model, "module", model), "config", None)
    out = {}
    for task, seqs in evalset.sequences.items():
        total, n = 0.0, 0
        for i in range(0, len(seqs), batch_size):
            batch = collate(seqs[i : i + batch_size], pad_id=pad_id, mode=collate_mode(mode), task_index=task_index)
            inputs, loss = model_inputs(batch, mode, device, dtype, config)
            total += float(response_loss(model, inputs, loss, mode, fused=fused))
            n += batch["n_labels"]
        out[task] = (total / max(n, 1), n)
    return out
