"""Generation benchmark: cells/s of our batched generation (generation/generate.py: prompts sorted by token
length, batches of --batch with left padding and the KV cache, our seeded sampler, then the parse and the
inverse transform into a CSR matrix) against cell2sentence's way (one `model.generate` per prompt, decoded,
then its own `post_process_generated_cell_sentences` and `reconstruct_expression_from_cell_sentence` per cell).

    python benchmarks/generate_bench.py --cells 2000 --prompts 128 --batch 64

Builds a demo corpus and trains the tiny GPT-NeoX on it once (cached under .bench/), then generates from the
same cell_type_generation prompts with both, same model, max_new_tokens and sampling (temperature 1); runs
alternated, medians reported, and one JSON line printed. Both sides are timed from prompt strings to an
expression matrix (the model is loaded before). --threads sets torch's intra-op threads for both (default: every
CPU, as train_bench.py; a batch of 64 gains from a second thread on an idle machine, one prompt does not, and
on a busy one each op of a batch can stall waiting for the other thread: --threads 1 then).
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
from language.corpus import open_corpus
from language.inverse import c2s_postprocess, ranked_to_matrix
from language.prompts import parse_cells
from training.decode import decode
from training.models import load_model_and_tokenizer, read_provenance
from training.sft_config import SFTConfig
from training.sft_trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build_corpus(cells: int, max_genes: int) -> str:
    os.makedirs(os.path.join(ROOT, ".bench"), exist_ok=True)
    uri = ensure_demo_census(os.path.join(ROOT, ".bench", f"gen_census_{cells}"), n_cells=cells, n_genes=2000,
                             mean_nnz=600, seed=5)
    out = os.path.join(ROOT, ".bench", f"gen_corpus_{cells}_{max_genes}")
    build(BuildConfig(output=out, census_uri=uri, max_genes=max_genes,
                      tasks=["cell_type_generation", "cell_lm", "cell_type_prediction"]))
    return out


def train_model(corpus: str, steps: int, seed: int) -> str:
    out = corpus.replace("gen_corpus_", "gen_model_") + f"_{steps}"
    final = os.path.join(out, "final")
    if read_provenance(final) is None:
        train(SFTConfig(model="tiny-pythia", corpus=corpus, output_dir=out, max_steps=steps, per_device_batch_size=8,
                        max_length=1024, learning_rate=3e-3, logging_steps=25, eval_steps=0, save_steps=0,
                        eval_cells=0, eval_samples_per_task=1, report_to="none", seed=seed,
                        tasks=["cell_type_generation=2", "cell_lm=1"]))
    return final


def prompts_of(corpus: str, n: int) -> list[str]:
    import pyarrow.parquet as pq

    out: list[str] = []
    for split in ("test", "val", "train"):
        for path in open_corpus(corpus).sample_parts(split, ["cell_type_generation"])["cell_type_generation"]:
            t = pq.read_table(path, columns=["prompt", "organism"]).to_pylist()
            out += [r["prompt"] for r in t if r["organism"] == "homo_sapiens"]
    if len(out) < n:
        raise SystemExit(f"only {len(out)} prompts in {corpus}; lower --prompts or raise --cells")
    return out[:n]


def ours(model, tok, prompts: list[str], vocab: list[str], fit: tuple[float, float], a) -> dict:
    index = {s: i for i, s in enumerate(vocab)}
    t0 = time.perf_counter()
    texts = [(d.text, d.truncated) for d in decode(model, tok, prompts, max_new_tokens=a.max_new_tokens,
                                                   batch_size=a.batch, temperature=1.0, seed=a.seed)]
    t1 = time.perf_counter()
    ranked, invalid, words = [], 0, 0
    for text, _ in texts:
        cell = parse_cells(text, False)[0]
        proc, n_invalid, _ = c2s_postprocess(cell, index)
        ranked.append(proc)
        invalid += n_invalid
        words += len(cell)
    x = ranked_to_matrix(ranked, len(vocab), [fit[0]] * len(ranked), [fit[1]] * len(ranked))
    secs = time.perf_counter() - t0
    return {"cells_per_s": round(len(prompts) / secs, 2), "seconds": round(secs, 3),
            "generate_seconds": round(t1 - t0, 3), "mean_words": round(words / len(prompts), 1),
            "invalid_share": round(invalid / max(words, 1), 4), "truncated": sum(t for _, t in texts),
            "nnz": int(x.nnz)}


def one_at_a_time(model, tok, prompts: list[str], vocab: list[str], fit: tuple[float, float], a) -> dict:
    """cell2sentence 1.2.0's generate_from_prompt (one prompt per model.generate, decoded, the prompt stripped),
    then its post-processing and reconstruction per cell (the package's functions when installed)."""
    import numpy as np
    import torch

    try:
        from cell2sentence.utils import post_process_generated_cell_sentences as post
        from cell2sentence.utils import reconstruct_expression_from_cell_sentence as rebuild
        reference = "cell2sentence"
    except ImportError:  # the same rule from this project (language.inverse), per cell
        from language.inverse import c2s_postprocess, ranked_to_matrix

        index = {s: i for i, s in enumerate(vocab)}

        def post(sentence, vocab_list):
            proc, n, _ = c2s_postprocess(sentence.split(" "), index)
            return [vocab_list[g] if g is not None else "NOT_A_GENE" for g in proc], n

        def rebuild(sentence, delimiter, vocab_list, slope, intercept):
            return ranked_to_matrix([[index.get(w) for w in sentence.split(delimiter)]], len(vocab_list), [slope],
                                    [intercept]).toarray()[0]
        reference = "language.inverse"
    torch.manual_seed(a.seed)
    rows, words, truncated = [], 0, 0
    t0 = time.perf_counter()
    gen_s = 0.0
    with torch.inference_mode():
        for prompt in prompts:
            g0 = time.perf_counter()
            enc = tok([prompt], padding=True, return_tensors="pt")
            out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 max_new_tokens=a.max_new_tokens, pad_token_id=tok.pad_token_id, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0)
            truncated += int(tok.eos_token_id not in out[0, enc["input_ids"].shape[1]:].tolist())
            text = tok.batch_decode(out, skip_special_tokens=True)[0].replace(prompt, "")
            text = text.replace("<|endoftext|>", "").lstrip()
            gen_s += time.perf_counter() - g0
            sentence = text.split("\n")[0].strip().rstrip(".")  # our response format ends the sentence with "."
            genes, _ = post(sentence, vocab)
            words += len(sentence.split())
            rows.append(rebuild(" ".join(genes), " ", vocab, fit[0], fit[1]))
    x = np.vstack(rows)
    secs = time.perf_counter() - t0
    return {"cells_per_s": round(len(prompts) / secs, 2), "seconds": round(secs, 3),
            "generate_seconds": round(gen_s, 3), "mean_words": round(words / len(prompts), 1),
            "truncated": truncated, "nnz": int((x > 0).sum()), "post_processing": reference}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=2000)
    p.add_argument("--max-genes", type=int, default=100, help="genes per cell sentence in the corpus")
    p.add_argument("--steps", type=int, default=300, help="training steps of the tiny model (cached)")
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: --max-genes + 8 (a sentence, '.', eos)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3, help="runs of each, alternated; medians reported")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    a.max_new_tokens = a.max_new_tokens or a.max_genes + 8
    import logging

    logging.basicConfig(level=logging.WARNING)
    import torch

    corpus = build_corpus(a.cells, a.max_genes)
    final = train_model(corpus, a.steps, a.seed)
    torch.set_num_threads(a.threads)
    model, tok = load_model_and_tokenizer(final)
    model.eval()
    c = open_corpus(corpus)
    vocab = c.vocab("homo_sapiens")["gene_symbol"].to_pylist()
    pooled = c.fits("homo_sapiens")["pooled:homo_sapiens"]
    fit = (pooled["slope"], pooled["intercept"])
    prompts = prompts_of(corpus, a.prompts)
    ours(model, tok, prompts[: a.batch], vocab, fit, a)  # warm-up (first-call allocations), not timed
    runs_o, runs_b = [], []
    for _ in range(a.repeats):
        runs_o.append(ours(model, tok, prompts, vocab, fit, a))
        runs_b.append(one_at_a_time(model, tok, prompts, vocab, fit, a))
    med = lambda runs: sorted(runs, key=lambda r: r["cells_per_s"])[len(runs) // 2]  # noqa: E731
    ratios = sorted(o["cells_per_s"] / b["cells_per_s"] for o, b in zip(runs_o, runs_b, strict=True))
    print(json.dumps({"ours_batched": med(runs_o), "one_prompt_at_a_time": med(runs_b),
                      "speedup": round(ratios[len(ratios) // 2], 2),
                      "all_runs": {"ours": [r["cells_per_s"] for r in runs_o],
                                   "one_at_a_time": [r["cells_per_s"] for r in runs_b]},
                      "prompts": a.prompts, "batch": a.batch, "max_new_tokens": a.max_new_tokens,
                      "max_genes": a.max_genes, "train_steps": a.steps, "threads": a.threads, "model": "tiny-pythia",
                      "vocab": len(tok), "device": "cpu", "torch": torch.__version__,
                      "python": platform.python_version(), "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
