"""The one batched generator: continuations of prompts by a trained model, for generation (cells), evaluation
and in-training accuracy (labels), GRPO's references and annotation (labels with scores and embeddings).

Prompts are encoded exactly as in training (training.data.encode_prompts), sorted by token length (longest
first, so a batch wastes little padding) and generated `batch_size` at a time by HF `generate` (left padding,
KV cache). Greedy by default; sampling draws with `sampler` from a generator seeded per call, so the same call
gives the same texts.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from schemas.errors import ModelError
from training.data import encode_prompts


@dataclass
class Decoded:
    """One prompt's continuation."""

    text: str  # up to the first eos
    truncated: bool  # no eos within max_new_tokens
    score: float | None = None  # mean log-probability of its tokens, the eos included (scores=True)
    embedding: np.ndarray | None = None  # the prompt's mean-pooled last hidden layer (embed=True)


def sampler(temperature: float, top_k: int, top_p: float, seed: int, device) -> LogitsProcessor:
    """A logits processor that draws the next token itself (HF's temperature, top-k and top-p warpers, then
    inverse-CDF sampling: one uniform per row from its own generator seeded with `seed`) and marks that token
    +inf, so greedy decoding takes it. The same distribution as `do_sample=True`, without
    torch.multinomial's exponential draw per vocabulary entry: about half the step time of a small model on
    CPU, and draws that no other use of the global RNG can move."""
    warpers = ([TemperatureLogitsWarper(temperature)] if temperature != 1 else []) + \
        ([TopKLogitsWarper(top_k)] if top_k > 0 else []) + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)

    class Sample(LogitsProcessor):
        def __call__(self, input_ids, scores):
            for w in warpers:
                scores = w(input_ids, scores)
            cdf = torch.softmax(scores.float(), dim=-1).cumsum_(-1)
            u = torch.rand((scores.shape[0], 1), generator=generator, device=scores.device)
            token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=scores.shape[-1] - 1)
            return scores.scatter_(1, token, float("inf"))  # the only +inf: greedy's argmax takes it

    return Sample()


def decode(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 64,
           temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0, scores: bool = False,
           embed: bool = False, skip_special_tokens: bool = False, progress: bool = False,
           desc: str = "generate") -> list[Decoded]:
    """The continuations of `prompts`, in order. temperature 0: greedy; else sampling with temperature, top_k
    (0: off) and top_p (1: off). skip_special_tokens: drop special tokens from the text (for labels; cells
    keep <unk> as a word). scores / embed: also each continuation's mean token log-probability / the prompt's
    mean-pooled last hidden layer. progress: a bar on stderr titled `desc`."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ModelError("decode: prompts must be a list of strings")
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is None or eos is None:
        raise ModelError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} needs pad and eos tokens")
    ids = encode_prompts(tokenizer, list(prompts))
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # stable: equal lengths keep their order
    device = next(model.parameters()).device
    # greedy decoding; when sampling, the processor has already drawn the token greedy decoding takes
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos,
                              use_cache=True, return_dict_in_generate=True, output_logits=scores,
                              output_hidden_states=embed)
    processors = LogitsProcessorList([sampler(temperature, top_k, top_p, seed, device)] if temperature > 0 else [])
    out: list[Decoded | None] = [None] * len(ids)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(ids), desc=desc, unit="prompt", disable=not progress, file=sys.stderr) as bar, \
                torch.inference_mode():
            for lo in range(0, len(order), batch_size):
                idx = order[lo:lo + batch_size]
                for i, d in zip(idx, _batch(model, tokenizer, [ids[i] for i in idx], config, processors, device,
                                            skip_special_tokens), strict=True):
                    out[i] = d
                bar.update(len(idx))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def _batch(model, tokenizer, ids: list[list[int]], config: GenerationConfig, processors: LogitsProcessorList,
           device, skip_special_tokens: bool) -> list[Decoded]:
    pad, eos = config.pad_token_id, config.eos_token_id
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, x in enumerate(ids):
        input_ids[r, width - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[r, width - len(x):] = 1
    mask = mask.to(device)
    res = model.generate(input_ids=input_ids.to(device), attention_mask=mask, generation_config=config,
                         logits_processor=processors)
    new = res.sequences[:, width:]
    rows = new.tolist()
    cut = []
    for row in rows:
        k = row.index(eos) if eos in row else len(row)
        cut.append(([t for t in row[:k] if t != pad], eos not in row))
    texts = tokenizer.batch_decode([c for c, _ in cut], skip_special_tokens=skip_special_tokens,
                                   clean_up_tokenization_spaces=False)
    score = embedding = None
    if config.output_logits:
        logits = torch.stack(res.logits, 1)[:, : new.shape[1]].float()
        logp = torch.log_softmax(logits, -1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        is_eos = (new == eos).long()
        valid = (is_eos.cumsum(1) - is_eos) == 0  # up to and including the first eos
        score = ((logp * valid).sum(1) / valid.sum(1).clamp(min=1)).cpu().numpy().astype(np.float64)
    if config.output_hidden_states:
        embedding = mean_pool(res.hidden_states[0][-1], mask)
    return [Decoded(text, truncated, None if score is None else float(score[r]),
                    None if embedding is None else embedding[r])
            for r, (text, (_, truncated)) in enumerate(zip(texts, cut, strict=True))]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """Hidden states averaged over the unmasked positions, one row per sequence."""
    m = mask.unsqueeze(-1).float()
    return ((hidden.float() * m).sum(1) / m.sum(1).clamp(min=1)).cpu().numpy()
