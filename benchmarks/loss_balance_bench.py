"""Does a multi-task mixture learn its prediction tasks? Token-normalised vs per-sample-normalised loss.

With the loss averaged over every completion token of a step, a 300-gene cell_lm answer carries ~100× the
weight of a one-word cell-type answer, so a mixture `cell_type_prediction=3,cell_lm=1` can leave the model
answering the majority label. This trains the tiny model on the demo corpus both ways (same seed, data,
steps) and reports the test-split cell-type accuracy beside the majority baseline (the most common train
label, scored on the same test cells).

    .venv/bin/python benchmarks/loss_balance_bench.py --steps 400
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter

from c2s.build import build_corpus
from schemas.layout import resolve
from training.models import load_model_and_tokenizer
from training.periodic_eval import cell_type_accuracy
from training.sft_config import SFTConfig
from training.sft_trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def demo_corpus() -> str:
    out = os.path.join(ROOT, ".bench", "demo", "corpus")
    build_corpus(out, demo=True, demo_dir=os.path.join(ROOT, ".bench", "demo", "data"))
    return out


def labelled(corpus: str, split: str) -> list[tuple[str, str]]:
    import pandas as pd

    df = pd.read_parquet(resolve(corpus).path("samples", "cell_type_prediction", split),
                         columns=["prompt", "label"])
    return list(zip(df["prompt"], df["label"], strict=True))


def run(corpus: str, norm: str, a) -> dict:
    out = os.path.join(ROOT, ".bench", f"loss_{norm}")
    cfg = SFTConfig(model="tiny-pythia", corpus=corpus, output_dir=out, max_steps=a.steps, seed=a.seed,
                    tasks=a.tasks.split(","), loss_normalization=norm, eval_steps=0, save_steps=0,
                    eval_cells=0, eval_samples_per_task=1, report_to="none", logging_steps=10)
    t0 = time.perf_counter()
    res = train(cfg)
    seconds = time.perf_counter() - t0
    model, tok = load_model_and_tokenizer(res.final_dir)
    test = labelled(corpus, "test")
    return {"accuracy": round(cell_type_accuracy(model, tok, test), 4), "train_seconds": round(seconds, 1),
            "loss_last": round([r["loss"] for r in res.metrics if "loss" in r][-1], 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--tasks", default="cell_type_prediction=3,cell_lm=1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="token,sample")
    a = p.parse_args()
    corpus = demo_corpus()
    train_labels = [lab for _, lab in labelled(corpus, "train")]
    test = labelled(corpus, "test")
    majority = Counter(train_labels).most_common(1)[0][0]
    baseline = sum(lab == majority for _, lab in test) / len(test)
    result = {"steps": a.steps, "tasks": a.tasks, "test_cells": len(test), "majority_label": majority,
              "majority_baseline": round(baseline, 4)}
    for mode in a.modes.split(","):
        result[mode] = run(corpus, mode, a)
    result |= {"python": platform.python_version(), "cpus": os.cpu_count()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
