"""One GPU benchmark run per call, one JSON line out: benchmarks/gpu_bench.sh calls it once per figure, each in
its own process with its own time limit, so a crash or a hang loses one figure, not all.

    python benchmarks/gpu_bench.py ours --shape pythia410m --batch 8            # our trainer, its defaults
    python benchmarks/gpu_bench.py ours --shape pythia410m --attention 4d       # another attention path
    python benchmarks/gpu_bench.py trl --shape pythia410m --packing bfd         # TRL's SFTTrainer, packed
    python benchmarks/gpu_bench.py trl --shape qwen05b --liger                  # TRL with Liger's kernels
    python benchmarks/gpu_bench.py generate --shape pythia410m                  # c2s generate: batched vs one by one
    python benchmarks/gpu_bench.py grpo --shape pythia410m                      # one GRPO step, generation and training

Models are random-init shapes of the tiny models (the corpus's word-level tokenizer, the real vocabulary
size): pythia410m (GPT-NeoX, 24 x 1,024), qwen05b (Llama-architecture with Qwen2.5-0.5B's shape: grouped
queries, gated MLP, 151,936 rows), gemma2-410m (Gemma-2 at Pythia-410M's width and depth, its 256k
vocabulary, soft-capping and sliding window: flex against eager 4d), tiny / tiny-llama / tiny-gemma2 (the CPU
test models; --dry-run uses them). MFU = useful tokens/s x 6 x
(the weights of every Linear, LM head included) / --peak-tflops, as issue #19 measured it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from language.corpus import open_corpus
from training.decode import decode
from training.grpo import main as grpo_main
from training.models import _build_tiny, load_model_and_tokenizer, tiny_config, train_tokenizer
from training.sft_config import SFTConfig
from training.sft_trainer import resolve_attention, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

SHAPES = {
    "pythia410m": ("tiny-pythia", {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                                   "intermediate_size": 4096, "vocab_size": 50304}),
    "qwen05b": ("tiny-llama", {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                               "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936}),
    "gemma2-410m": ("tiny-gemma2", {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                                    "num_key_value_heads": 8, "intermediate_size": 4096, "vocab_size": 256000}),
    # Gemma-2-2B (C2S-Scale-Gemma-2-2B's shape): LoRA and QLoRA steps, as the released-checkpoint recipe runs
    "gemma2-2b": ("tiny-gemma2", {"hidden_size": 2304, "num_hidden_layers": 26, "num_attention_heads": 8,
                                  "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
                                  "intermediate_size": 9216, "vocab_size": 256000}),
    "tiny": ("tiny-pythia", {}),
    "tiny-llama": ("tiny-llama", {}),
    "tiny-gemma2": ("tiny-gemma2", {}),
}


def _device() -> dict:
    import torch

    if torch.cuda.is_available():
        return {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    return {"device": "cpu", "torch": torch.__version__}


def _matmul_params(model) -> int:
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def _peak_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def _mfu(tokens_per_s: float, params: int, a) -> float:
    return round(tokens_per_s * 6 * params / (a.peak_tflops * 1e12), 4)


def _shape_params(corpus: str, shape: str) -> int:
    """The matmul weights of the shape, counted on a model built on the meta device (no memory, no init:
    a 410M model on the CPU would cost seconds of each figure's time limit)."""
    import torch
    from transformers import AutoModelForCausalLM

    name, over = SHAPES[shape]
    config = tiny_config(name, train_tokenizer(corpus), over or None)
    with torch.device("meta"):
        return _matmul_params(AutoModelForCausalLM.from_config(config))


def _saved_random(a, name: str, over: dict) -> str:
    """A random model of the shape saved as a checkpoint folder (with its tokenizer), for --peft qlora."""
    import torch

    folder = os.path.join(a.out, f"random_{a.shape}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        tok = train_tokenizer(a.corpus)
        _build_tiny(name, tok, torch.bfloat16, None, over or None, 0).save_pretrained(folder)
        tok.save_pretrained(folder)
    return folder


def run_ours(a) -> dict:
    import torch

    name, over = SHAPES[a.shape]
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    model, tiny = name, [f"{k}={v}" for k, v in over.items()]
    if a.peft == "qlora":  # 4-bit loading needs a saved checkpoint: the random model of this shape, saved once
        model, tiny = _saved_random(a, name, over), []
    cfg = SFTConfig(model=model, corpus=a.corpus, output_dir=os.path.join(a.out, f"ours_{a.shape}_{a.attention}_{a.batch}_{a.peft}"),
                    max_steps=a.steps, per_device_batch_size=a.batch, max_length=a.max_length, logging_steps=a.log_every,
                    eval_steps=0, save_steps=0, eval_cells=0, eval_samples_per_task=1, report_to="none",
                    attention=a.attention, fused_loss=a.fused_loss, learning_rate=3e-4, torch_compile=a.compile,
                    tiny_config=tiny, save_total_limit=1, peft=a.peft)
    mode, _ = resolve_attention(cfg, torch.device("cuda" if torch.cuda.is_available() else "cpu"), name)
    t0 = time.perf_counter()
    res = train(cfg)
    wall = time.perf_counter() - t0
    timed = [r for r in res.metrics if "tokens_per_s" in r and r["step"] > a.warmup]
    tokens = secs = 0.0
    prev = {r["step"]: r["tokens_seen"] for r in res.metrics if "tokens_seen" in r}
    for r in timed:
        before = max((s for s in prev if s < r["step"]), default=0)
        n = r["tokens_seen"] - prev.get(before, 0)
        tokens += n
        secs += n / r["tokens_per_s"]
    tps = tokens / secs if secs else 0.0
    params = _shape_params(a.corpus, a.shape)
    losses = [r["loss"] for r in res.metrics if "loss" in r]
    return {"run": "ours", "shape": a.shape, "peft": a.peft, "attention": a.attention, "attention_used": mode,
            "fused_loss": a.fused_loss, "torch_compile": a.compile,
            "useful_tokens_per_s": round(tps), "mfu": _mfu(tps, params, a), "matmul_params": params,
            "peak_memory_gib": _peak_gib(), "loss_first": losses[0], "loss_last": losses[-1],
            "timed_steps": a.steps - a.warmup, "wall_s": round(wall, 1)}


def run_trl(a) -> dict:
    import torch
    from train_bench import trl_peer

    name, over = SHAPES[a.shape]
    if a.liger:
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            return {"run": "trl", "liger": True, "skipped": "liger-kernel is not installed"}
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    a.seed = 0
    r = trl_peer(a.corpus, a, os.path.join(a.out, f"trl_{a.shape}_{a.packing}"), packing=a.packing == "bfd",
                 model_name=name, shape=over or None, liger=a.liger, cuda=torch.cuda.is_available())
    r.pop("loss_curve", None)
    params = _shape_params(a.corpus, a.shape)
    return {"run": "trl", "packing": a.packing, "liger": a.liger, **r,
            "mfu": _mfu(r["useful_tokens_per_s"], params, a), "peak_memory_gib": _peak_gib()}


def run_generate(a) -> dict:
    """Generated tokens/s of c2s generate's batched generation (training.decode.decode: prompts
    sorted by length, batches with left padding) against one model.generate per prompt; a random-init model
    of the shape, so every completion runs to --max-new-tokens (no early eos) and both make the same count."""
    import pyarrow.parquet as pq
    import torch

    name, over = SHAPES[a.shape]
    model, tok = load_model_and_tokenizer(name, corpus=a.corpus, tiny_overrides=over or None)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(dev, dtype=torch.bfloat16 if dev == "cuda" else torch.float32).eval()
    model.generation_config.eos_token_id = None  # every completion runs to max_new_tokens: equal work
    path = open_corpus(a.corpus).sample_parts("train", ["cell_type_generation"])["cell_type_generation"][0]
    prompts = pq.read_table(path, columns=["prompt"])["prompt"].to_pylist()[: a.prompts]
    decode(model, tok, prompts[: min(4, len(prompts))], max_new_tokens=8, batch_size=a.gen_batch,
           temperature=1.0, seed=0)  # warm-up
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    decode(model, tok, prompts, max_new_tokens=a.max_new_tokens, batch_size=a.gen_batch, temperature=1.0, seed=0)
    sync()
    batched = time.perf_counter() - t0
    singles = prompts[: a.single_prompts]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in singles:
            enc = tok([p], return_tensors="pt").to(dev)
            model.generate(**enc, max_new_tokens=a.max_new_tokens, min_new_tokens=a.max_new_tokens, do_sample=True,
                           temperature=1.0, top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id)
    sync()
    single = time.perf_counter() - t0
    b_tps = len(prompts) * a.max_new_tokens / batched
    s_tps = len(singles) * a.max_new_tokens / single
    return {"run": "generate", "prompts": len(prompts), "gen_batch": a.gen_batch, "max_new_tokens": a.max_new_tokens,
            "batched_tokens_per_s": round(b_tps), "one_at_a_time_tokens_per_s": round(s_tps),
            "one_at_a_time_prompts": len(singles), "speedup": round(b_tps / s_tps, 2)}


def run_grpo(a) -> dict:
    """One GRPO run of --grpo-steps steps from a random-init model of the shape saved as an SFT output (2
    SFT steps), prompts of cell_type_prediction with the label reward: generation and training seconds per
    step apart, from c2s grpo's own metrics."""

    name, over = SHAPES[a.shape]
    sft = train(SFTConfig(model=name, corpus=a.corpus, output_dir=os.path.join(a.out, f"grpo_sft_{a.shape}"),
                          max_steps=2, per_device_batch_size=2, max_length=a.max_length, eval_steps=0, save_steps=0,
                          eval_cells=0, eval_samples_per_task=1, report_to="none", logging_steps=1,
                          tiny_config=[f"{k}={v}" for k, v in over.items()], tasks=["cell_type_prediction"]))
    out = os.path.join(a.out, f"grpo_{a.shape}")
    metrics = os.path.join(out, "metrics.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    t0 = time.perf_counter()
    rc = grpo_main(["--model", sft.final_dir, "--corpus", a.corpus, "--tasks", "cell_type_prediction",
               "--rewards", "label=1", "--max-steps", str(a.grpo_steps), "--output-dir", out,
               "--num-generations", "4", "--per-device-batch-size", "8", "--max-completion-length", "64",
               "--logging-steps", "1", "--max-prompts", "64", "--report-to", "none"])
    wall = time.perf_counter() - t0
    lines = Path(metrics).read_text().splitlines() if rc == 0 else []
    recs = [json.loads(x) for x in lines if "\"generation_s_per_step\"" in x]
    last = recs[-1] if recs else {}
    return {"run": "grpo", "exit_code": rc, "grpo_steps": a.grpo_steps, "generation_s_per_step":
            last.get("generation_s_per_step"), "training_s_per_step": last.get("training_s_per_step"),
            "wall_s": round(wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", choices=["ours", "trl", "generate", "grpo"])
    p.add_argument("--corpus", default=os.path.join(ROOT, ".bench", "train_corpus_2000"))
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, ".bench", "gpu"))
    p.add_argument("--shape", choices=list(SHAPES), default="pythia410m")
    p.add_argument("--batch", type=int, default=8, help="packed rows (ours) or sequences (TRL) per step")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10, help="first steps not timed")
    p.add_argument("--log-every", type=int, default=5, help="ours: steps per logged window (a log reads the loss)")
    p.add_argument("--attention", default="auto")
    p.add_argument("--fused-loss", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--compile", action="store_true", help="ours with --torch-compile")
    p.add_argument("--peft", choices=["none", "lora", "qlora"], default="none", help="ours: full, LoRA or QLoRA")
    p.add_argument("--packing", choices=["bfd", "none"], default="bfd", help="TRL: bfd packing or padded rows")
    p.add_argument("--liger", action="store_true", help="TRL with use_liger_kernel=True")
    p.add_argument("--prompts", type=int, default=64, help="generate: prompts generated in batches")
    p.add_argument("--single-prompts", type=int, default=8, help="generate: prompts generated one at a time")
    p.add_argument("--gen-batch", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--grpo-steps", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    a = p.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    os.makedirs(a.out, exist_ok=True)
    fn = {"ours": run_ours, "trl": run_trl, "generate": run_generate, "grpo": run_grpo}[a.run]
    result = fn(a)
    if a.run in ("ours", "trl"):
        result |= {"batch": a.batch, "max_length": a.max_length, "steps": a.steps}
    print(json.dumps({**result, "shape": a.shape, **_device(), "python": platform.python_version()}), flush=True)


if __name__ == "__main__":
    main()
