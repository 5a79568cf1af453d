"""Trainer benchmark: useful tokens/s of our SFT trainer against TRL's SFTTrainer at its best for this data
(prompt/completion rows, completion-only loss, bfd packing, padding-free batches) and a C2S-style baseline
(HF Trainer, per-batch padding, no packing): same rows, model, tokenizer, tokens per step, learning rate and
steps; runs alternated, medians reported, and the loss curves of all three.

    python benchmarks/train_bench.py --cells 3000 --steps 40

Builds a demo corpus once (cached under .bench/), trains the tiny GPT-NeoX (tokenizer trained from the
corpus) with both, and prints one JSON line. "Useful" tokens are the non-padding tokens a step processes;
the first --warmup steps of each run are not timed. It also times the data path alone (no model):
`data_path_tokens_per_s`, the useful tokens/s it delivers into the batch tensors a step takes, beside peers
on HF `datasets` (--data-path-only: that alone). The GPU figures come from benchmarks/gpu_bench.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from etl.config import BuildConfig
from etl.demo import ensure_demo_census
from etl.pipeline import build
from etl.stages import samples_plan
from language.corpus import open_corpus
from training.data import IGNORE_INDEX, parse_mixture, tokenize_batch, tokenize_sample
from training.loader import BatchSpec, PackedBatches, make_loader
from training.models import load_model_and_tokenizer
from training.packing import Packer, batches, collate
from training.sft_config import SFTConfig
from training.sft_trainer import train
from training.stream import Sample
from training.tokens import pretokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build_corpus(cells: int) -> str:
    os.makedirs(os.path.join(ROOT, ".bench"), exist_ok=True)
    uri = ensure_demo_census(os.path.join(ROOT, ".bench", f"train_census_{cells}"), n_cells=cells,
                             n_genes=2000, mean_nnz=600, seed=5)
    out = os.path.join(ROOT, ".bench", f"train_corpus_{cells}")
    k = samples_plan.demo_knowledge()
    build(BuildConfig(output=out, census_uri=uri, max_genes=400, **k))
    return out


def ours(corpus: str, a, out: str) -> dict:
    cfg = SFTConfig(model="tiny-pythia", loss_normalization="token",  # TRL's normalisation: like for like
                    corpus=corpus, output_dir=out, max_steps=a.steps, per_device_batch_size=a.batch,
                    max_length=a.max_length, logging_steps=1, eval_steps=0, save_steps=0, eval_cells=0,
                    eval_samples_per_task=1, report_to="none", attention=a.attention, seed=a.seed,
                    shuffle_buffer=1000)
    res = train(cfg)
    steps = [r for r in res.metrics if "tokens_per_s" in r and r["step"] > a.warmup]
    secs, tokens = 0.0, 0
    prev = {r["step"]: r["tokens_seen"] for r in res.metrics if "tokens_seen" in r}
    for r in steps:
        n = r["tokens_seen"] - prev.get(r["step"] - 1, 0)
        tokens += n
        secs += n / r["tokens_per_s"]
    pad = sum(r["padding_share"] for r in steps) / len(steps)
    losses = [r["loss"] for r in res.metrics if "loss" in r]
    return {"useful_tokens_per_s": round(tokens / secs), "padding_share": round(pad, 4),
            "timed_steps": len(steps), "loss_first": losses[0], "loss_last": losses[-1],
            "loss_curve": [round(x, 4) for x in losses]}


def baseline(corpus: str, a, out: str) -> dict:
    """cell2sentence's recipe: HF Trainer over a map-style dataset of tokenised samples (random order),
    per-batch padding (DataCollatorForSeq2Seq), no packing; loss on the response tokens as ours."""
    import datasets
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    model, tok = load_model_and_tokenizer("tiny-pythia", corpus=corpus, attn_implementation="sdpa",
                                             seed=a.seed)
    ds = datasets.Dataset.from_list([{"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}
                                     for _, _, ids, labels in _rows(corpus, tok, a.max_length)])
    pad = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)
    counts: list[tuple[int, int]] = []

    def collate(features):
        batch = pad(features)
        real = int(batch["attention_mask"].sum())
        counts.append((real, batch["input_ids"].numel()))
        return batch

    marks: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks[state.global_step] = time.perf_counter()

    args = TrainingArguments(output_dir=out, max_steps=a.steps, per_device_train_batch_size=a.batch,
                             learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=5, logging_steps=1,
                             report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0,
                             seed=a.seed, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate, callbacks=[Clock()])
    trainer.train()
    timed = counts[a.warmup : a.steps]
    secs = marks[a.steps] - marks[a.warmup]
    real = sum(r for r, _ in timed)
    total = sum(n for _, n in timed)
    return {"useful_tokens_per_s": round(real / secs), "padding_share": round(1 - real / total, 4),
            "timed_steps": len(timed)}


def _rows(corpus: str, tok, max_length: int) -> list[tuple[str, str, list[int], list[int]]]:
    """The training rows both peers train on: (prompt, response, input_ids, labels), samples that fit."""
    import pyarrow.parquet as pq

    rows = []
    for paths in open_corpus(corpus).sample_parts("train").values():
        for p in paths:
            t = pq.read_table(p, columns=["prompt", "completion"])
            for pr, rs in zip(t["prompt"].to_pylist(), t["completion"].to_pylist(), strict=True):
                x = tokenize_sample(tok, pr, rs, max_length)
                if x is not None:
                    rows.append((pr, rs, x[0], x[1]))
    return rows


def trl_peer(corpus: str, a, out: str, packing: bool = True, *, model_name: str = "tiny-pythia",
             shape: dict | None = None, liger: bool = False, cuda: bool = False) -> dict:
    """TRL's SFTTrainer for this data: prompt/completion rows (loss on the completion only); with `packing`,
    the bfd strategy and padding-free batches (transformers' own packed-position attention on CPU, use_cache
    off; same tokens per step as ours: batch x max_length), without it padded batches of `batch` samples.
    Same model, tokenizer, learning rate, schedule and steps. TRL tokenises (and packs) the whole dataset
    before its first step (not timed). On a GPU (cuda=True, benchmarks/gpu_bench.py): bf16, `shape` overrides
    of the tiny model's config, and liger=True for TRL's `use_liger_kernel` (Liger's fused kernels)."""
    import datasets
    from transformers import TrainerCallback
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    model, tok = load_model_and_tokenizer(model_name, corpus=corpus, attn_implementation="sdpa",
                                             seed=a.seed, tiny_overrides=shape)
    model.config.use_cache = False
    ds = datasets.Dataset.from_list([{"prompt": p, "completion": r} for p, r, _, _ in _rows(corpus, tok,
                                                                                            a.max_length)])
    args = TRLConfig(output_dir=out, max_steps=a.steps, per_device_train_batch_size=a.batch, max_length=a.max_length,
                     packing=packing, packing_strategy="bfd", padding_free=packing, completion_only_loss=True,
                     learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=5, logging_steps=1, report_to=[],
                     save_strategy="no", use_cpu=not cuda, bf16=cuda, gradient_checkpointing=False, seed=a.seed,
                     dataloader_num_workers=0, eos_token=tok.eos_token, pad_token=tok.pad_token,
                     use_liger_kernel=liger)
    marks: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks[state.global_step] = time.perf_counter()

    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    inner = trainer.data_collator
    counts: list[int] = []

    pads: list[int] = []

    def counting(features):
        counts.append(sum(len(f["input_ids"]) for f in features))  # real tokens (packed sequences: no padding)
        batch = inner(features)
        pads.append(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting
    trainer.train()
    secs = marks[a.steps] - marks[a.warmup]
    tokens = sum(counts[a.warmup : a.steps])
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"useful_tokens_per_s": round(tokens / secs),
            "padding_share": round(1 - tokens / max(sum(pads[a.warmup : a.steps]), 1), 4),
            "timed_steps": a.steps - a.warmup, "packing": packing,
            "loss_first": losses[0], "loss_last": losses[-1], "loss_curve": [round(x, 4) for x in losses]}


def data_path(corpus: str, a) -> dict:
    """Useful tokens/s delivered into the batch tensors a step takes (8 x 1,024 packed, flattened, with the
    loss positions and per-sample weights), no model: ours in this process and from a worker process, the
    one-time tokenisation of the corpus into the token cache, and two peers built on `datasets`' streaming
    parquet reader feeding the same packer and collator: tokenising on the fly (what this trainer did
    before) and reading our token shards (the reader alone)."""
    import tempfile

    import numpy as np

    _, tok = load_model_and_tokenizer("tiny-pythia", corpus=corpus)
    files = open_corpus(corpus).sample_parts("train")
    mixture = parse_mixture(None, files)
    index = {t: i for i, t in enumerate(sorted(mixture))}
    manifest = open_corpus(corpus).manifest
    rows = sum(pq_rows(f) for fs in files.values() for f in fs)
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        shards, key = pretokenize(files, tok, cache_dir=cache, manifest=manifest, progress=False)
        pre_s = time.perf_counter() - t0
        pre_tokens = sum(sh_tokens(s.path) for ss in shards.values() for s in ss)
        spec = BatchSpec(shards=shards, weights=mixture, max_length=a.max_length, batch_size=a.batch,
                         pad_id=tok.pad_token_id, mode="flat", task_index=index, loss_weights=True, tokenizer_key=key)

        def rate(batch_iter) -> float:
            next(batch_iter)  # first batch: opening files, filling the shuffle buffer
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < a.data_seconds:
                n += next(batch_iter)["n_tokens"]
            return n / (time.perf_counter() - t0)

        ours_in = rate(iter(PackedBatches(spec)))
        ours_worker = rate(iter(make_loader(spec, workers=1, pin_memory=False)))

        def peer(read_tokens: bool) -> float:
            import datasets
            import datasets.config as dc
            from datasets import interleave_datasets, load_dataset

            dc.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0  # its 5 s guard at every pass end would dominate this small corpus
            datasets.disable_progress_bars()
            tasks = list(mixture)
            if read_tokens:
                data = {t: [s.path for s in shards[t]] for t in tasks}
                cols = ["input_ids", "prompt_len"]
            else:
                data = {t: files[t] for t in tasks}
                cols = ["prompt", "completion"]
            parts = load_dataset("parquet", data_files=data, streaming=True, columns=cols)
            ds = interleave_datasets([parts[t] for t in tasks], probabilities=[mixture[t] for t in tasks], seed=0,
                                     stopping_strategy="all_exhausted").shuffle(seed=0, buffer_size=1000)

            def samples():
                while True:
                    for b in ds.iter(batch_size=64):
                        if read_tokens:
                            pairs = zip(b["input_ids"], b["prompt_len"], strict=True)
                        else:
                            toks = tokenize_batch(tok, b["prompt"], b["completion"], a.max_length)
                            pairs = ((x[0], sum(v == IGNORE_INDEX for v in x[1])) for x in toks if x)
                        for ids, plen in pairs:
                            if len(ids) <= a.max_length:
                                yield Sample(np.asarray(ids), int(plen), "t", (0, 0, 0))

            class Source:
                def __iter__(self):
                    return samples()

            groups = batches(Packer(Source(), a.max_length), a.batch)
            return rate(collate(g, pad_id=tok.pad_token_id, mode="flat", task_index={"t": 0}, loss_weights=True)
                        for g in groups)

        peer_tokenise = peer(False)
        peer_reader = peer(True)
    return {"data_path_tokens_per_s": round(ours_in), "data_path_worker_tokens_per_s": round(ours_worker),
            "pretokenize_tokens_per_s": round(pre_tokens / pre_s), "pretokenize_seconds": round(pre_s, 2),
            "corpus_train_samples": rows, "corpus_train_tokens": pre_tokens,
            "peer_datasets_tokenise_on_the_fly_tokens_per_s": round(peer_tokenise),
            "peer_datasets_reading_token_shards_tokens_per_s": round(peer_reader)}


def pq_rows(path: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def sh_tokens(path: str) -> int:
    import pyarrow.parquet as pq

    return len(pq.read_table(path, columns=["input_ids"]).column(0).combine_chunks().values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=3000)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="first steps not timed")
    p.add_argument("--batch", type=int, default=8, help="sequences (ours) / samples (baseline) per step")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--attention", default="auto", help="our trainer's --attention (auto: varlen on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="runs of each, alternated; the medians are reported")
    p.add_argument("--data-seconds", type=float, default=5.0, help="seconds each data path is timed")
    p.add_argument("--data-path-only", action="store_true", help="measure the data path alone (no model)")
    p.add_argument("--skip-trl", action="store_true", help="leave out the TRL SFTTrainer peer")
    p.add_argument("--corpus", default=None, help="a built corpus to use instead of building the demo one")
    a = p.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    corpus = a.corpus or build_corpus(a.cells)
    import torch

    dp = data_path(corpus, a)
    if a.data_path_only:
        print(json.dumps({**dp, "batch": a.batch, "max_length": a.max_length, "cells": a.cells,
                          "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count()}))
        return

    torch.set_num_threads(os.cpu_count() or 1)
    runs_o, runs_t, runs_b = [], [], []
    for _ in range(a.repeats):  # alternated, so drift in the machine's speed hits all alike
        runs_o.append(ours(corpus, a, os.path.join(ROOT, ".bench", "train_ours")))
        if not a.skip_trl:  # TRL's two ways to batch this data on CPU; its better one is its figure
            both = [trl_peer(corpus, a, os.path.join(ROOT, ".bench", "train_trl"), packing=k) for k in (True, False)]
            runs_t.append(max(both, key=lambda r: r["useful_tokens_per_s"]))
            runs_t[-1]["other"] = {k: v for k, v in min(both, key=lambda r: r["useful_tokens_per_s"]).items()
                                   if k != "loss_curve"}
        runs_b.append(baseline(corpus, a, os.path.join(ROOT, ".bench", "train_baseline")))
    med = lambda runs: sorted(runs, key=lambda r: r["useful_tokens_per_s"])[len(runs) // 2]  # noqa: E731
    o, b = med(runs_o), med(runs_b)
    t = med(runs_t) if runs_t else None
    # per-round ratios: each round's runs ran back to back
    vs_trl = sorted(x["useful_tokens_per_s"] / y["useful_tokens_per_s"] for x, y in zip(runs_o, runs_t, strict=False))
    print(json.dumps({"ours": o, "trl_sft_trainer_best": t, "baseline_hf_trainer_padded": b, **dp,
                      "useful_tokens_speedup_vs_trl": round(vs_trl[len(vs_trl) // 2], 2) if vs_trl else None,
                      "useful_tokens_speedup": round(o["useful_tokens_per_s"] / b["useful_tokens_per_s"], 2),
                      "all_runs": {"ours": [r["useful_tokens_per_s"] for r in runs_o],
                                   "trl": [r["useful_tokens_per_s"] for r in runs_t],
                                   "baseline": [r["useful_tokens_per_s"] for r in runs_b]},
                      "steps": a.steps, "batch": a.batch, "max_length": a.max_length, "cells": a.cells,
                      "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
