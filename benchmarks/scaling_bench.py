"""The scaling study on one corpus: C2S-Scale's headline (performance improves with model size), measured on a
lab's own corpus by one command.

    .venv/bin/python benchmarks/scaling_bench.py --quick                 # 4 sizes, 2 seeds for the 2 smallest, CPU
    .venv/bin/python benchmarks/scaling_bench.py --corpus DIR --out DIR  # the full ladder, up to Pythia-410M (GPU)

A ladder of model sizes from one family's shape rules (Pythia's width/depth/heads progression, scaled down for
--quick; the widths and depths are recorded) is trained on the same corpus with the same data order (seed), the
same schedule shape and the same tokens (--tokens fixed), or tokens proportional to parameters (--tokens
optimal, 20 per parameter, capped). Each size is then measured the same way, independently of the trainer's own
evaluation: held-out loss per task (mean NLL of the answer tokens) on `val`, and apart on `test_ood` where the
corpus holds datasets out; generation-based cell-type accuracy on `test` beside the majority baseline; wall time
and tokens/s; parameters (all and non-embedding) and training FLOPs (6 x matmul parameters x tokens).

Loss is fitted as a * N^alpha + c over the non-embedding parameters N (scipy's curve_fit); when that fit is not
stable, the log-log slope with its 95% interval. Writes scaling.json, scaling.md and PNGs (loss vs parameters,
loss vs compute, accuracy vs parameters) to --out, and prints one JSON line last with `sizes` (each with
`params`, `val_loss`, `test_accuracy`) and `loss_params_exponent`. A plateau (the largest size no better than the
one below it, beyond the seeds' spread) is reported as a finding.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from c2s import build_corpus
from evaluation import metrics
from language.corpus import open_corpus
from schemas.layout import CorpusNotFound
from training.data import tokenize_sample
from training.models import load_model_and_tokenizer
from training.periodic_eval import cell_type_accuracy
from training.sft_config import SFTConfig
from training.sft_trainer import train

ROOT = Path(__file__).resolve().parents[1]

# Pythia's (width, depth, heads) from 14M to 1B, the family's own progression
PYTHIA = {"14m": (128, 6, 4), "31m": (256, 6, 8), "70m": (512, 6, 8), "160m": (768, 12, 12),
          "410m": (1024, 24, 16), "1b": (2048, 16, 8)}
QUICK_WIDTH, QUICK_DEPTH = 8, 2  # --quick divides widths and depths by these (heads keep head_dim = width/heads)


def ladder(quick: bool) -> list[dict]:
    """The sizes: Pythia's shapes (scaled down with --quick), each {name, width, depth, heads, ffn}."""
    out = []
    for name, (w, d, h) in PYTHIA.items():
        if not quick and name == "1b":
            continue  # the full setting stops at Pythia-410M's shape
        if quick:
            w, d = w // QUICK_WIDTH, max(1, d // QUICK_DEPTH)
            h = max(2, h // 2)
        out.append({"name": f"pythia-{name}" + ("/8" if quick else ""), "width": w, "depth": d, "heads": h,
                    "ffn": 4 * w})
    return out


def _params(model) -> tuple[int, int, int]:
    """(all, non-embedding, matmul) parameters: non-embedding leaves out the input embedding table."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return total, total - emb, matmul


def heldout_loss(model, tok, rows: list[dict], max_length: int, batch: int = 16) -> tuple[float, int]:
    """Mean NLL over the answer tokens (and eos) of `rows`, computed here from logits: prompt tokens masked."""

    enc = [tokenize_sample(tok, r["prompt"], r["completion"], max_length) for r in rows]
    enc = [e for e in enc if e is not None]
    total, n = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(enc), batch):
            part = enc[i:i + batch]
            width = max(len(ids) for ids, _ in part)
            ids = torch.full((len(part), width), tok.pad_token_id, dtype=torch.long)
            labels = torch.full((len(part), width), -100, dtype=torch.long)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            for j, (x, y) in enumerate(part):
                ids[j, :len(x)], labels[j, :len(y)], mask[j, :len(x)] = torch.tensor(x), torch.tensor(y), 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                           ignore_index=-100, reduction="sum"))
            n += int((target != -100).sum())
    return total / max(n, 1), n


def measure(final: str, corpus, a) -> dict:
    """Held-out loss per task (val; test_ood apart) and cell-type accuracy on test beside the majority baseline."""

    model, tok = load_model_and_tokenizer(final)
    out: dict = {}
    for split in ("val", "test_ood"):
        per = {}
        for task in corpus.split_tasks(split):
            rows = corpus.samples(task, split, ["prompt", "completion"]).slice(0, a.eval_samples).to_pylist()
            loss, n = heldout_loss(model, tok, rows, a.max_length)
            if n:
                per[task] = round(loss, 5)
        out[f"{split}_loss_per_task"] = per
        out[f"{split}_loss"] = round(float(np.mean(list(per.values()))), 5) if per else None
    test = corpus.samples("cell_type_prediction", "test", ["prompt", "label"]).slice(0, a.eval_cells).to_pylist()
    test = [r for r in test if r["label"]]
    if test:
        out["test_accuracy"] = round(cell_type_accuracy(model, tok, [(r["prompt"], r["label"]) for r in test]), 4)
        train_labels = corpus.samples("cell_type_prediction", "train", ["label"])["label"].to_pylist()
        out["majority_baseline"] = round(metrics.majority_baseline([x for x in train_labels if x],
                                                                   [r["label"] for r in test])["accuracy"], 4)
        out["test_cells"] = len(test)
    return out


def train_one(size: dict, seed: int, steps: int, a, peft: str = "none") -> dict:

    over = [f"hidden_size={size['width']}", f"num_hidden_layers={size['depth']}",
            f"num_attention_heads={size['heads']}", f"intermediate_size={size['ffn']}"]
    out = Path(a.out) / "runs" / f"{size['name'].replace('/', '_')}_seed{seed}_{peft}"
    cfg = SFTConfig(model="tiny-pythia", corpus=a.corpus, output_dir=str(out), tiny_config=over, seed=seed,
                    max_steps=steps, per_device_batch_size=a.batch, max_length=a.max_length,
                    learning_rate=a.learning_rate * (10 if peft == "lora" else 1), warmup_steps=max(1, steps // 10),
                    eval_steps=0, save_steps=0, eval_cells=0, eval_samples_per_task=1, logging_steps=max(1, steps // 5),
                    report_to="none", peft=peft, save_total_limit=1)
    t0 = time.perf_counter()
    res = train(cfg)
    wall = time.perf_counter() - t0
    tokens = max((r.get("tokens_seen", 0) for r in res.metrics), default=0)
    return {"final": res.final_dir, "wall_s": round(wall, 1), "tokens": int(tokens),
            "tokens_per_s": round(tokens / wall) if wall else None,
            "train_loss_last": next((r["loss"] for r in reversed(res.metrics) if "loss" in r), None)}


def fit_power_law(n: np.ndarray, loss: np.ndarray) -> dict:
    """loss = a * n^alpha + c (alpha < 0 when loss falls with size); the log-log slope with its 95% interval
    beside it, and used instead when the three-parameter fit does not converge or is not finite."""
    from scipy import stats

    slope = stats.linregress(np.log(n), np.log(loss))
    t = stats.t.ppf(0.975, max(len(n) - 2, 1))
    out = {"loglog_slope": round(float(slope.slope), 4),
           "loglog_slope_ci95": [round(float(slope.slope - t * slope.stderr), 4),
                                 round(float(slope.slope + t * slope.stderr), 4)],
           "loglog_r2": round(float(slope.rvalue ** 2), 4)}
    try:
        from scipy.optimize import curve_fit

        p, _ = curve_fit(lambda x, a_, al, c: a_ * np.power(x / n.min(), al) + c, n, loss,
                         p0=[loss.max() - loss.min() + 1e-3, -0.3, loss.min() * 0.9], maxfev=20000)
        stable = all(math.isfinite(v) for v in p) and p[1] < 0 and p[2] >= 0 and len(n) >= 4
    except (RuntimeError, ValueError):
        p, stable = None, False
    if stable:
        out |= {"method": "a*N^alpha+c", "alpha": round(float(p[1]), 4), "a": float(p[0]), "c": round(float(p[2]), 4),
                "exponent": round(float(p[1]), 4)}
    else:
        out |= {"method": "log-log slope (the 3-parameter fit was not stable)", "exponent": out["loglog_slope"]}
    return out


def plots(rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for key, xlab, fname in (("params_non_embedding", "non-embedding parameters", "loss_vs_params.png"),
                             ("flops", "training FLOPs", "loss_vs_compute.png")):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for split, marker in (("val_loss", "o"), ("test_ood_loss", "s")):
            pts = [(r[key], r[split]) for r in rows if r.get(split) is not None]
            if pts:
                ax.scatter(*zip(*pts, strict=True), marker=marker, label=split.replace("_loss", ""))
        ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel(xlab), ax.set_ylabel("held-out loss")
        ax.legend(), fig.tight_layout(), fig.savefig(out / fname, dpi=120), plt.close(fig)
        made.append(fname)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    pts = [(r["params_non_embedding"], r["test_accuracy"]) for r in rows if r.get("test_accuracy") is not None]
    if pts:
        ax.scatter(*zip(*pts, strict=True), label="cell-type accuracy (test)")
        base = [r["majority_baseline"] for r in rows if r.get("majority_baseline") is not None]
        if base:
            ax.axhline(base[0], color="grey", ls="--", label="majority baseline")
    ax.set_xscale("log"), ax.set_xlabel("non-embedding parameters"), ax.set_ylabel("accuracy"), ax.legend()
    fig.tight_layout(), fig.savefig(out / "accuracy_vs_params.png", dpi=120), plt.close(fig)
    return [*made, "accuracy_vs_params.png"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the scaled-down ladder on this CPU (< 20 min on the demo)")
    ap.add_argument("--corpus", default=str(ROOT / "demo" / "corpus"), help="built with `c2s build --demo` if missing")
    ap.add_argument("--out", default=str(ROOT / ".bench" / "scaling"))
    ap.add_argument("--tokens", choices=["fixed", "optimal"], default="fixed",
                    help="fixed: every size sees --train-tokens; optimal: 20 tokens per parameter, capped by it")
    ap.add_argument("--train-tokens", type=int, default=None, help="default 600k (--quick) or 50M")
    ap.add_argument("--seeds", type=int, default=2, help="seeds of the two smallest sizes (the noise)")
    ap.add_argument("--lora", action="store_true", help="also LoRA beside full fine-tuning for the two largest")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--eval-samples", type=int, default=48, help="held-out samples per task and split")
    ap.add_argument("--eval-cells", type=int, default=64, help="test cells for the accuracy")
    a = ap.parse_args()
    a.train_tokens = a.train_tokens or (600_000 if a.quick else 50_000_000)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    try:
        corpus = open_corpus(a.corpus)
    except CorpusNotFound:

        build_corpus(a.corpus, demo=True)
        corpus = open_corpus(a.corpus)

    sizes = ladder(a.quick)
    rows = []
    t_all = time.perf_counter()
    tokens_per_step = a.batch * a.max_length  # packed rows: the step's token budget (the trainer counts the real)
    for i, size in enumerate(sizes):
        seeds = range(a.seeds) if i < 2 else range(1)
        for peft in (["none", "lora"] if a.lora and i >= len(sizes) - 2 else ["none"]):
            for seed in seeds:
                over = {"hidden_size": size["width"], "num_hidden_layers": size["depth"],
                        "num_attention_heads": size["heads"], "intermediate_size": size["ffn"]}
                probe, _ = load_model_and_tokenizer("tiny-pythia", corpus=a.corpus, tiny_overrides=over)
                total, non_emb, matmul = _params(probe)
                del probe
                budget = a.train_tokens if a.tokens == "fixed" else min(a.train_tokens, 20 * non_emb)
                steps = max(5, round(budget / tokens_per_step))
                run = train_one(size, seed, steps, a, peft)
                row = {**size, "seed": seed, "peft": peft, "params": total, "params_non_embedding": non_emb,
                       "matmul_params": matmul, "steps": steps, **run,
                       "flops": 6 * matmul * run["tokens"], **measure(run["final"], corpus, a)}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if not k.endswith("_per_task") and k != "final"}),
                      flush=True)
    full = [r for r in rows if r["peft"] == "none"]
    by_size: dict[str, list[dict]] = {}
    for r in full:
        by_size.setdefault(r["name"], []).append(r)
    summary = []
    for name, rs in by_size.items():
        vals = [r["val_loss"] for r in rs if r["val_loss"] is not None]
        summary.append({"name": name, "params": rs[0]["params"], "params_non_embedding": rs[0]["params_non_embedding"],
                        "flops": rs[0]["flops"], "tokens": rs[0]["tokens"], "wall_s": rs[0]["wall_s"],
                        "tokens_per_s": rs[0]["tokens_per_s"],
                        "val_loss": round(float(np.mean(vals)), 5) if vals else None,
                        "val_loss_seed_spread": round(float(np.ptp(vals)), 5) if len(vals) > 1 else None,
                        "test_ood_loss": rs[0].get("test_ood_loss"), "test_accuracy": rs[0].get("test_accuracy"),
                        "majority_baseline": rs[0].get("majority_baseline"), "seeds": len(rs)})
    n = np.array([s["params_non_embedding"] for s in summary if s["val_loss"]], float)
    loss = np.array([s["val_loss"] for s in summary if s["val_loss"]], float)
    fit = fit_power_law(n, loss) if len(n) >= 3 else {"exponent": None, "method": "too few sizes"}
    spread = max([s["val_loss_seed_spread"] or 0 for s in summary] + [0])
    plateau = len(loss) >= 2 and loss[-1] >= loss[-2] - spread
    report = {"corpus": a.corpus, "corpus_version": corpus.version.version, "quick": a.quick, "tokens": a.tokens,
              "train_tokens": a.train_tokens, "batch": a.batch, "max_length": a.max_length,
              "learning_rate": a.learning_rate, "ladder": sizes, "runs": rows, "sizes": summary, "fit": fit,
              "plateau": bool(plateau), "seed_spread": spread, "wall_s": round(time.perf_counter() - t_all, 1),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    report["plots"] = plots(summary, out)
    (out / "scaling.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "scaling.md").write_text(markdown(report))
    print(json.dumps({"sizes": [{k: s[k] for k in ("name", "params", "val_loss", "test_accuracy")} for s in summary],
                      "loss_params_exponent": fit.get("exponent"), "fit": fit.get("method"),
                      "plateau": report["plateau"], "wall_s": report["wall_s"], "out": str(out)}))


def markdown(r: dict) -> str:
    lines = ["# Scaling on one corpus", "", f"Corpus `{r['corpus']}` (version {r['corpus_version']}); "
             f"{'quick ladder' if r['quick'] else 'full ladder'}; tokens {r['tokens']} ({r['train_tokens']:,}); "
             f"{r['wall_s']} s.", "", "| size | width x depth | params (non-emb.) | val loss | test_ood loss | "
             "accuracy (test) | majority | seeds |", "|---|---|---|---|---|---|---|---|"]
    shapes = {s["name"]: s for s in r["ladder"]}
    for s in r["sizes"]:
        sh = shapes[s["name"]]
        lines.append(f"| {s['name']} | {sh['width']} x {sh['depth']} | {s['params']:,} ({s['params_non_embedding']:,}) "
                     f"| {s['val_loss']} | {s['test_ood_loss']} | {s['test_accuracy']} | {s['majority_baseline']} "
                     f"| {s['seeds']} |")
    f = r["fit"]
    lines += ["", f"Fit ({f.get('method')}): exponent {f.get('exponent')}; log-log slope {f.get('loglog_slope')} "
              f"(95% CI {f.get('loglog_slope_ci95')}, r² {f.get('loglog_r2')}).", "",
              ("**Plateau:** the largest size is no better than the one below it, beyond the seeds' spread "
               f"({r['seed_spread']}): on this corpus and budget, more parameters stopped paying." if r["plateau"] else
               f"Held-out loss still falls at the largest size (seed spread {r['seed_spread']})."), "",
              "test_ood (held-out datasets) is reported apart from the in-distribution val split.", ""]
    lines += [f"![{p}]({p})" for p in r["plots"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
