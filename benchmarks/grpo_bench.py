"""GRPO after SFT on the demo, on CPU: does the biology reward rise, and what does evaluation say before and
after? SFT of the tiny model on perturbation_prediction (and cell types), then `c2s grpo` with the default
perturbation rewards (gene_program over each perturbation's most changed genes, validity), then
`c2s evaluate` of both models on the test split.

    .venv/bin/python benchmarks/grpo_bench.py --sft-steps 300 --grpo-steps 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from c2s.build import build_corpus
from evaluation.evaluate import main as evaluate
from training.grpo import main as grpo_main
from training.sft_config import SFTConfig
from training.sft_trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--grpo-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sft-tasks", default="perturbation_prediction=2,cell_type_prediction=1")
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", default="1e-5")
    p.add_argument("--temperature", default="1.0")
    p.add_argument("--beta", default=None, help="KL coefficient against the SFT model (default: c2s grpo's)")
    p.add_argument("--rewards", default="", help="NAME=WEIGHT,... (default: c2s grpo's)")
    p.add_argument("--aggregation", default="sum_then_normalize", choices=["sum_then_normalize", "normalize_then_sum"])
    p.add_argument("--sft-model", help="reuse this SFT output (its final/ folder) instead of training one")
    a = p.parse_args()

    bench = os.path.join(ROOT, ".bench", f"grpo_{a.sft_steps}_{a.grpo_steps}_{a.lr}_b{a.beta or 'default'}_{a.rewards.replace('=', '').replace(',', '_')}_{a.aggregation}")
    corpus = os.path.join(ROOT, ".bench", "demo", "corpus")
    build_corpus(corpus, demo=True, demo_dir=os.path.join(ROOT, ".bench", "demo", "data"))
    t0 = time.perf_counter()
    sft_final = a.sft_model or train(SFTConfig(model="tiny-pythia", corpus=corpus, output_dir=os.path.join(bench, "sft"),
                          max_steps=a.sft_steps, tasks=a.sft_tasks.split(","),
                          eval_steps=0, save_steps=0, eval_cells=0, eval_samples_per_task=1, report_to="none", seed=a.seed, logging_steps=10)).final_dir
    sft_s = time.perf_counter() - t0
    out = os.path.join(bench, "grpo")
    if os.path.exists(os.path.join(out, "metrics.jsonl")):
        os.remove(os.path.join(out, "metrics.jsonl"))
    t0 = time.perf_counter()
    assert grpo_main(["--model", sft_final, "--max-steps", str(a.grpo_steps), "--output-dir", out,
                 "--max-completion-length", "200", "--num-generations", str(a.num_generations),
                 "--per-device-batch-size", str(a.batch), "--learning-rate", a.lr, "--temperature", a.temperature, *(["--beta", a.beta] if a.beta is not None else []),
                 *(["--rewards", a.rewards] if a.rewards else []), "--reward-aggregation", a.aggregation, "--seed", str(a.seed),
                 "--logging-steps", "1"]) == 0
    grpo_s = time.perf_counter() - t0
    lines = Path(out, "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines if '"reward"' in x]
    k = max(1, len(recs) // 5)
    mean = lambda rs, key: round(sum(r[key] for r in rs) / len(rs), 4)  # noqa: E731
    from scipy.stats import mannwhitneyu

    rise_p = float(mannwhitneyu([r["reward"] for r in recs[-k:]], [r["reward"] for r in recs[:k]],
                                alternative="greater").pvalue)  # per-step means, last vs first 20%
    result = {"reward_rise_p": round(rise_p, 4), "sft_steps": a.sft_steps, "sft_tasks": a.sft_tasks, "grpo_steps": a.grpo_steps,
              "num_generations": a.num_generations, "batch": a.batch, "lr": a.lr, "temperature": a.temperature, "beta": a.beta or "default", "rewards": a.rewards or "default", "aggregation": a.aggregation, "sft_seconds": round(sft_s, 1),
              "grpo_seconds": round(grpo_s, 1),
              "reward_first_20pct": mean(recs[:k], "reward"), "reward_last_20pct": mean(recs[-k:], "reward"),
              "gene_program_first_20pct": mean(recs[:k], "rewards/gene_program/mean"),
              "gene_program_last_20pct": mean(recs[-k:], "rewards/gene_program/mean"),
              "validity_first_20pct": mean(recs[:k], "rewards/validity/mean"),
              "validity_last_20pct": mean(recs[-k:], "rewards/validity/mean"),
              "generation_s_per_step": mean(recs, "generation_s_per_step"),
              "training_s_per_step": mean(recs, "training_s_per_step")}
    keys = sorted(k for k in recs[0] if k.startswith("rewards/") and k.endswith("/mean"))
    result["per_reward"] = {k.split("/")[1]: [mean(recs[:k2], k), mean(recs[-k2:], k)] for k in keys
                            for k2 in [max(1, len(recs) // 5)]}
    for name, model in (("before", sft_final), ("after", os.path.join(out, "final"))):
        report = os.path.join(bench, f"eval_{name}", "report.json")
        assert evaluate(["--model", model, "--split", "test", "--tasks", "perturbation_prediction",
                         "--tasks", "cell_type_prediction", "--n-per-condition", "8", "--no-plots",
                         "--out", report]) == 0
        r = json.loads(Path(report).read_text())
        result[f"eval_{name}"] = {"cell_type_accuracy": r["cell_type_accuracy"],
                                  **{k2: round(v, 4) for k2, v in r["perturbation"].get("mean", {}).items()}}
    result |= {"python": platform.python_version(), "cpus": os.cpu_count()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
