"""The trainer's fast paths: the CUDA varlen kernel's plumbing (checked on CPU against the per-sample loop with a
reference kernel in its place), flex attention for Gemma-2's soft-capping, torch.compile, the gradient
checkpointing choice, fused AdamW; and, marked `gpu`, the same on a real GPU (run by benchmarks/gpu_bench.sh,
skipped elsewhere)."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from language.corpus import open_corpus
from schemas.errors import InputError
from training import attention as ta
from training import data as td
from training import models as tm
from training.losses import collate_mode, model_inputs, response_loss
from training.packing import collate, sample_from_tokens
from training.sft_config import SFTConfig
from training.sft_trainer import checkpointing_choice, step_memory_estimate, train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
QUICK = {"per_device_batch_size": 4, "max_length": 512, "shuffle_buffer": 64, "eval_samples_per_task": 4,
         "eval_cells": 0, "report_to": "none", "logging_steps": 1, "warmup_steps": 2, "eval_steps": 0,
         "save_steps": 0, "learning_rate": 3e-3}


def _packed(tok, corpus: str, tasks=("cell_type_prediction", "cell_lm", "tissue_prediction"), n: int = 2):
    rows = []
    for paths in open_corpus(corpus).sample_parts("train", list(tasks)).values():
        rows += pq.read_table(paths[0], columns=["prompt", "completion"]).slice(0, n).to_pylist()
    return [sample_from_tokens(*td.tokenize_sample(tok, r["prompt"], r["completion"], 10**6), "a") for r in rows]


def _loss(model, tok, packed, mode: str, device="cpu", dtype=torch.float32) -> torch.Tensor:
    batch = collate([packed], pad_id=tok.pad_token_id, mode=collate_mode(mode), task_index={"a": 0})
    inputs, loss = model_inputs(batch, mode, device, dtype, model.config)
    return response_loss(model, inputs, loss, mode)


def _reference_varlen(calls: list):
    """A stand-in for torch's varlen_attn with its signature and layout ([T, H, D], cumulative lengths, the
    longest sample, window_size=(-1, 0) for causal), computed with sdpa per sample."""

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        lens = (cu_q[1:] - cu_q[:-1]).tolist()
        calls.append({"window": window_size, "max": (max_q, max_k), "longest": max(lens), "gqa": enable_gqa,
                      "shape": tuple(q.shape), "same_cu": cu_q is cu_k})
        assert window_size == (-1, 0)  # causal
        out = []
        for s, e in itertools.pairwise(cu_q.tolist()):
            qq, kk, vv = (x[s:e].transpose(0, 1)[None] for x in (q, k, v))
            o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale, enable_gqa=enable_gqa)
            out.append(o[0].transpose(0, 1))
        return torch.cat(out)

    return kernel


@pytest.mark.parametrize("name", ["tiny-pythia", "tiny-llama"])
def test_varlen_kernel_path_gives_the_loop_paths_loss(train_corpus, monkeypatch, name):
    """The CUDA branch of sdpa_varlen (q/k/v to [T, H, D], cu_seq_lens and the longest sample from collate
    with no device read, causal window, grouped-query heads for Llama) gives the per-sample loop's loss and
    gradients, with a reference kernel standing in for torch's (which runs on CUDA only)."""
    model, tok = tm.load_model_and_tokenizer(name, corpus=train_corpus, attn_implementation=ta.register())
    model.eval()
    packed = _packed(tok, train_corpus)
    loop = _loss(model, tok, packed, "varlen")
    (g_loop,) = torch.autograd.grad(loop, model.get_input_embeddings().weight)
    calls: list = []
    monkeypatch.setattr(ta, "_varlen_kernel", lambda: _reference_varlen(calls))
    monkeypatch.setattr(ta, "kernel_dtype", lambda q, p: q.dtype)
    kernel = _loss(model, tok, packed, "varlen")
    (g_kernel,) = torch.autograd.grad(kernel, model.get_input_embeddings().weight)
    assert float(kernel) == pytest.approx(float(loop), rel=1e-5)
    torch.testing.assert_close(g_kernel, g_loop, rtol=1e-4, atol=1e-6)
    layers = model.config.num_hidden_layers
    assert len(calls) == layers  # one kernel call per layer for the whole packed row
    heads = model.config.num_attention_heads
    longest = max(len(s) for s in packed)
    assert all(c["max"] == (longest, longest) and c["longest"] == longest and c["same_cu"] for c in calls)
    assert all(c["shape"] == (sum(len(s) for s in packed), heads, model.config.hidden_size // heads) for c in calls)
    assert all(c["gqa"] == (name == "tiny-llama") for c in calls)


def test_attention_choice_reads_the_models_config_and_refuses_what_cannot_train(train_corpus, tmp_path):
    """A Gemma-2 saved in a folder of any name is still Gemma-2 (soft-capping: 4d on CPU, flex on CUDA, never
    sdpa); flex refuses the CPU, where it has no backward."""
    from training.sft_trainer import resolve_attention

    model, tok = tm.load_model_and_tokenizer("tiny-gemma2", corpus=train_corpus)
    model.save_pretrained(tmp_path / "m2")
    tok.save_pretrained(tmp_path / "m2")
    cfg = SFTConfig(model=str(tmp_path / "m2"), corpus=train_corpus, **QUICK)
    assert resolve_attention(cfg, torch.device("cpu"), str(tmp_path / "m2")) == ("4d", "eager")
    assert resolve_attention(cfg, torch.device("cuda"), str(tmp_path / "m2")) == ("flex", "flex_attention")
    flex = SFTConfig(model="tiny-gemma2", corpus=train_corpus, attention="flex", **QUICK)
    with pytest.raises(InputError, match=r"flex trains on CUDA only.*--attention 4d"):
        resolve_attention(flex, torch.device("cpu"), "tiny-gemma2")
    assert resolve_attention(SFTConfig(model="tiny-pythia", corpus=train_corpus, **QUICK), torch.device("cpu"),
                             "tiny-pythia")[0] == "varlen"


def test_no_kernel_off_cuda_or_in_fp32():
    q = torch.zeros(1, 2, 4, 8)
    assert ta.kernel_dtype(q, 0.0) is None  # CPU
    assert ta.kernel_dtype(q.bfloat16(), 0.0) is None


def test_dense_masks_apply_gemma2s_sliding_window(train_corpus):
    """4d rows for a model with sliding-window layers get a mask per layer type, the window applied to the
    sliding ones: the packed loss equals each sample run alone with the model's own masks."""
    model, tok = tm.load_model_and_tokenizer("tiny-gemma2", corpus=train_corpus,
                                             tiny_overrides={"sliding_window": 16})
    model.eval()
    packed = _packed(tok, train_corpus, ("cell_lm", "cell_type_prediction"), n=1)
    assert max(len(s) for s in packed) > 16  # the window bites
    with torch.no_grad():
        got = float(_loss(model, tok, packed, "4d"))
        want = 0.0
        for s in packed:
            logits = model(torch.tensor([s.ids.tolist()]), use_cache=False).logits[0]
            want += float(F.cross_entropy(logits[s.prompt_len - 1 : -1], torch.tensor(s.ids[s.prompt_len:].tolist()),
                                          reduction="sum"))
    assert got == pytest.approx(want, rel=1e-4)
    seg = torch.tensor([[0, 0, 0, 1, 1]])
    m = ta.dense_masks(seg, torch.float32, model.config)
    assert set(m) == {"full_attention", "sliding_attention"}


@pytest.mark.slow
def test_flex_attention_keeps_gemma2_soft_capping_and_samples_apart(train_corpus):
    """--attention flex (Gemma-2's fast GPU path; compiled on CPU here): the packed row's loss equals the
    eager 4d path's, soft-capping and sliding window included."""
    model, tok = tm.load_model_and_tokenizer("tiny-gemma2", corpus=train_corpus, attn_implementation="eager",
                                             tiny_overrides={"sliding_window": 16})
    model.eval()
    assert model.config.attn_logit_softcapping
    packed = _packed(tok, train_corpus, ("cell_lm", "cell_type_prediction"), n=1)
    with torch.no_grad():
        eager = float(_loss(model, tok, packed, "4d"))
        model.set_attn_implementation("flex_attention")
        flex = float(_loss(model, tok, packed, "flex"))
    assert flex == pytest.approx(eager, rel=1e-4)


def test_gradient_checkpointing_is_chosen_by_memory_and_said_why(train_corpus, monkeypatch):
    model, _ = tm.load_model_and_tokenizer("tiny-pythia", corpus=train_corpus)
    cfg = SFTConfig(model="tiny-pythia", corpus=train_corpus, **QUICK)
    on, why = checkpointing_choice(cfg, model, torch.device("cpu"), fused=False, bf16=False)
    assert not on and "CPU" in why
    need = step_memory_estimate(model, cfg, fused=True, bf16=True)
    # the estimate: 16 bytes per trained parameter, plus activations that grow with the batch's tokens
    params = sum(p.numel() for p in model.parameters())
    more = step_memory_estimate(model, SFTConfig(model="tiny-pythia", corpus=train_corpus,
                                                 **{**QUICK, "per_device_batch_size": 8}), fused=True, bf16=True)
    assert need > 16 * params and more - need == need - 16 * params
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (need * 2, need * 4))
    on, why = checkpointing_choice(cfg, model, torch.device("cuda"), fused=True, bf16=True)
    assert not on and "GiB" in why
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (need // 2, need * 4))
    on, why = checkpointing_choice(cfg, model, torch.device("cuda"), fused=True, bf16=True)
    assert on and "recomputing" in why
    asked = SFTConfig(model="tiny-pythia", corpus=train_corpus, gradient_checkpointing=True, **QUICK)
    assert checkpointing_choice(asked, model, torch.device("cuda"), fused=True, bf16=True) == (True, "as asked "
                                                                                             "(--gradient-checkpointing)")


def test_the_optimizer_is_torchs_fused_adamw(train_corpus):
    from training.sft_trainer import _adamw

    model, _ = tm.load_model_and_tokenizer("tiny-pythia", corpus=train_corpus)
    cfg = SFTConfig(model="tiny-pythia", corpus=train_corpus, **QUICK)
    opt = _adamw(list(model.parameters()), cfg, torch.device("cpu"))
    assert opt.defaults["fused"] is True


@pytest.mark.slow
def test_torch_compile_trains_like_eager(train_corpus, tmp_path):
    """--torch-compile (each decoder layer compiled, dynamic shapes): the same losses as the eager run."""
    common = {**QUICK, "max_steps": 4, "tasks": ["cell_type_prediction=1", "cell_lm=1"], "max_grad_norm": 0.0}
    eager = train(SFTConfig(model="tiny-pythia", corpus=train_corpus, output_dir=str(tmp_path / "e"), **common))
    compiled = train(SFTConfig(model="tiny-pythia", corpus=train_corpus, output_dir=str(tmp_path / "c"),
                               torch_compile=True, **common))
    a = {r["step"]: r["loss"] for r in eager.metrics if "loss" in r}
    b = {r["step"]: r["loss"] for r in compiled.metrics if "loss" in r}
    assert b == pytest.approx(a, rel=1e-3)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(Path(compiled.final_dir)) is not None


# ------------------------------------------------------------------ on a GPU (benchmarks/gpu_bench.sh runs these)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", ["tiny-pythia", "tiny-llama"])
def test_gpu_varlen_kernel_matches_the_loop(train_corpus, name):
    model, tok = tm.load_model_and_tokenizer(name, corpus=train_corpus, attn_implementation=ta.register())
    model = model.cuda().eval()
    packed = _packed(tok, train_corpus)
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        kernel = float(_loss(model, tok, packed, "varlen", "cuda"))
    with torch.no_grad():  # fp32: the per-sample loop
        loop = float(_loss(model, tok, packed, "varlen", "cuda"))
    assert kernel == pytest.approx(loop, rel=2e-2)


@pytest.mark.gpu
@cuda
def test_gpu_fused_loss_matches_the_logits_path(train_corpus):
    from training.losses import install_fused_head

    model, tok = tm.load_model_and_tokenizer("tiny-pythia", corpus=train_corpus, attn_implementation=ta.register())
    model = model.cuda().eval()
    packed = _packed(tok, train_corpus)
    batch = collate([packed], pad_id=tok.pad_token_id, mode="flat", task_index={"a": 0}, loss_weights=True)
    inputs, loss = model_inputs(batch, "varlen", "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        plain = float(response_loss(model, inputs, loss, "varlen"))
        assert install_fused_head(model) is None
        fused = float(response_loss(model, inputs, loss, "varlen", fused=True))
    assert fused == pytest.approx(plain, rel=1e-2)


@pytest.mark.gpu
@cuda
def test_gpu_flex_matches_eager_for_gemma2(train_corpus):
    model, tok = tm.load_model_and_tokenizer("tiny-gemma2", corpus=train_corpus, attn_implementation="eager")
    model = model.cuda().eval()
    packed = _packed(tok, train_corpus, ("cell_lm", "cell_type_prediction"), n=1)
    with torch.no_grad():
        eager = float(_loss(model, tok, packed, "4d", "cuda"))
        model.set_attn_implementation("flex_attention")
        flex = float(_loss(model, tok, packed, "flex", "cuda"))
    assert flex == pytest.approx(eager, rel=1e-3)


@pytest.mark.gpu
@cuda
def test_gpu_defaults_train_and_resume_exactly(train_corpus, tmp_path):
    """The GPU defaults (auto: varlen kernel, fused loss, bf16, a dataloader worker): the loss falls, and a
    resume from the middle checkpoint logs the uninterrupted run's losses."""
    common = {**QUICK, "max_steps": 20, "save_steps": 10, "tasks": ["cell_type_prediction=2", "cell_lm=1"]}
    full = train(SFTConfig(model="tiny-pythia", corpus=train_corpus, output_dir=str(tmp_path / "a"), **common))
    losses = {r["step"]: r["loss"] for r in full.metrics if "loss" in r}
    assert all(math.isfinite(v) for v in losses.values()) and losses[20] < losses[1]
    out = tmp_path / "b"
    out.mkdir()
    shutil.copytree(Path(full.output_dir) / "checkpoint-10", out / "checkpoint-10")
    res = train(SFTConfig(model="tiny-pythia", corpus=train_corpus, output_dir=str(out),
                          resume_from_checkpoint="latest", **common))
    got = {r["step"]: r["loss"] for r in res.metrics if "loss" in r}
    assert sorted(got) == list(range(11, 21))
    for s in got:
        assert got[s] == pytest.approx(losses[s], rel=1e-4), s
    cfg = json.loads((Path(full.output_dir) / "sft_config.json").read_text())
    assert cfg["attention"] == "auto"


@pytest.mark.parametrize("weighted", [False, True], ids=["token", "sample"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_chunked_linear_ce_fallback_matches_cross_entropy(monkeypatch, weighted, bias):
    """Where torch has no linear_cross_entropy (< 2.13), the fused head uses our chunked function: its value
    and gradients (input, weight, bias) are F.cross_entropy's on the full logits, whatever the chunk size."""
    from training import losses as tl

    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(101, 16, requires_grad=True)
    b = torch.randn(101, requires_grad=True) if bias else None
    t = torch.randint(0, 101, (37,))
    w = torch.rand(37) if weighted else None
    leaves = [x for x in (h, weight, b) if x is not None]
    want = F.cross_entropy(F.linear(h, weight, b), t, reduction="none")
    want = (want * w).sum() if weighted else want.sum()
    g_want = torch.autograd.grad(want * 0.5, leaves)
    for chunk in (5, 37, 1000):
        got = tl._ChunkedLinearCE.apply(h, weight, b, t, w, chunk)
        assert float(got) == pytest.approx(float(want), rel=1e-5)
        for a, c in zip(torch.autograd.grad(got * 0.5, leaves), g_want, strict=True):
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)
    monkeypatch.delattr(F, "linear_cross_entropy")  # the dispatch picks it on such a torch
    got = tl.linear_nll(h, weight, b, t, w)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
