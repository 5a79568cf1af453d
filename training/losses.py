"""The loss of a collated batch: response tokens only, packed samples kept apart.

`response_loss` is what the trainer and the evaluation both call. By default the LM head and the loss are one
fused, chunked kernel (torch's `linear_cross_entropy` where torch has it, else a chunked function of ours: no
full-vocabulary logits in memory); elsewhere the
head runs at the response positions only and the summed next-token NLL has a one-pass backward (`sum_nll`):

F.cross_entropy on [N, V] logits saves log_softmax's output; in backward nll_loss zero-fills an [N, V]
gradient and scatters into it, and log_softmax's backward makes another pass with a row reduction. The
gradient of the summed NLL is simply softmax - onehot(target) = exp(log_softmax) - onehot: one pass over
the saved log-probabilities and an index update. After the LM head is cut to response positions this is
the largest remaining cost of a small model's step besides the linear layers (BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import contextvars
import types

import torch
import torch.nn.functional as F

from training.attention import block_masks, dense_masks, packed
from training.data import IGNORE_INDEX


class _SumNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=-1)
        ctx.save_for_backward(logp, target, weight)
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return (nll * weight).sum() if weight is not None else nll.sum()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logp, target, weight = ctx.saved_tensors
        grad = logp.exp()
        grad[torch.arange(target.numel(), device=target.device), target] -= 1
        if weight is not None:
            grad.mul_(weight.unsqueeze(-1))
        return grad.mul_(grad_out), None, None


def sum_nll(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Σᵢ wᵢ · −log softmax(logitsᵢ)[targetᵢ] for logits [N, V], targets [N] (no ignored entries) and optional
    weights [N] (1 when None), in float32."""
    if logits.numel() == 0:
        return logits.float().sum()
    return _SumNLL.apply(logits.float(), target, None if weight is None else weight.float())


def collate_mode(mode: str) -> str:
    """The collate mode of an attention mode: the padding-free ones take one flattened row."""
    return "flat" if mode in ("varlen", "flash", "flex") else mode


def model_inputs(batch: dict, mode: str, device, dtype: torch.dtype = torch.float32, config=None
                 ) -> tuple[dict, dict]:
    """A collated batch (training.packing.collate) -> (forward kwargs, what the loss needs), on `device`.

    Copies are non-blocking from pinned memory on CUDA; nothing here reads a device value back. Flattened
    rows get the sample boundaries flash-attention and sdpa_varlen split by (cu_seq_lens and the longest
    sample, from collate), or with --attention flex the BlockMasks built from them on the device; 4d rows
    get their block-diagonal masks built on the device from segment ids (no [B,1,L,L] tensor on the host)."""
    device = torch.device(device)
    nb = device.type == "cuda"

    def mv(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=nb)

    inputs = {"input_ids": mv(batch["input_ids"]), "position_ids": mv(batch["position_ids"])}
    if "cu_seq_lens" in batch:
        cu, longest = mv(batch["cu_seq_lens"]), int(batch["max_seqlen"])
        if mode == "flex":
            inputs["attention_mask"] = block_masks(cu, inputs["input_ids"].shape[1], config)
        else:
            inputs |= {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
        loss = {"index": mv(batch["loss_index"]), "target": mv(batch["loss_target"]),
                "weight": mv(batch["loss_weight"]) if "loss_weight" in batch else None}
        return inputs, loss
    if "segment_ids" in batch:
        inputs["attention_mask"] = dense_masks(mv(batch["segment_ids"]), dtype, config)
    else:
        inputs["attention_mask"] = mv(batch["attention_mask"])
    return inputs, {"labels": mv(batch["labels"]),
                    "weights": mv(batch["loss_weights"]) if "loss_weights" in batch else None}


def forward(model, inputs: dict, mode: str):
    with packed() if mode == "varlen" else contextlib.nullcontext():
        return model(**inputs, use_cache=False).logits


# ------------------------------------------------------------------ the fused LM head + loss

_FUSED: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("c2s_fused_loss", default=None)


class _ChunkedLinearCE(torch.autograd.Function):
    """Σ w·NLL of linear(h) for torches without linear_cross_entropy: the logits of a chunk of rows at a time,
    their gradients computed at once in forward (softmax − onehot, times w), so no [N, V] tensor outlives a
    chunk. Backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, w, chunk: int):
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_b = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc, t = h[s : s + chunk], target[s : s + chunk]
            logits = F.linear(hc, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            nll = lse - logits.gather(1, t[:, None]).squeeze(1)
            g = logits.sub_(lse[:, None]).exp_()
            g[torch.arange(len(t), device=g.device), t] -= 1
            if w is not None:
                wc = w[s : s + chunk].float()
                nll = nll * wc
                g.mul_(wc[:, None])
            total += nll.sum()
            g = g.to(h.dtype)
            grad_h[s : s + chunk] = g @ weight.to(h.dtype)
            grad_w += (g.t() @ hc).float()
            if grad_b is not None:
                grad_b += g.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype), None if grad_b is None else grad_b.to(bias.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw, gb = ctx.saved_tensors
        return gh * grad_out, gw * grad_out, None if gb is None else gb * grad_out, None, None, None


def linear_nll(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
               w: torch.Tensor | None) -> torch.Tensor:
    """Σ (w ×) −log softmax(h·Wᵀ + b)[target] in float32 without keeping [N, V] logits: torch's chunked
    linear_cross_entropy where this torch has it (>= 2.13), else the chunked function above."""
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        nll = F.linear_cross_entropy(h, weight, target, linear_bias=bias, reduction="sum" if w is None else "none",
                                     options=torch.nn.LinearCrossEntropyOptions())
        return nll.float() if w is None else (nll.float() * w).sum()
    chunk = max(1, (1 << 26) // max(weight.shape[0], 1))  # ~64M logits (256 MB in fp32) per chunk
    return _ChunkedLinearCE.apply(h, weight, bias, target, w, chunk)


def _fused_head_forward(self, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head's forward: plain logits, or inside response_loss(fused=True) the summed (weighted) NLL of
    the targets (linear_nll: no [N, V] logits kept for backward)."""
    spec = _FUSED.get()
    if spec is None:
        return F.linear(hidden, self.weight, self.bias)
    target, weight = spec
    h = hidden.reshape(-1, hidden.shape[-1])
    if target.numel() == 0:
        return (h.sum() * 0.0).float()
    w, b = self.weight, self.bias
    kind = h.device.type
    with contextlib.ExitStack() as stack:
        if torch.is_autocast_enabled(kind):  # half-precision matmuls with fp32 sums, as autocast would run them
            dt = torch.get_autocast_dtype(kind)
            h, w, b = h.to(dt), w.to(dt), None if b is None else b.to(dt)
            stack.enter_context(torch.autocast(kind, enabled=False))
        return linear_nll(h, w, b, target, weight)


def install_fused_head(model) -> str | None:
    """Let the model's LM head compute the loss itself (fused linear + cross-entropy) when response_loss asks
    for it; elsewhere (generation, evaluation) it stays a plain Linear. Returns None when installed, else
    why it cannot be: LoRA on the head, or soft-capped logits (Gemma-2). The head's parameters and their
    names are untouched."""
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None):
        return "the model soft-caps its logits (Gemma-2), which the fused kernel does not"
    scaled = [k for k in ("logits_scaling", "logit_scale", "output_multiplier_scale")
              if getattr(config, k, None) not in (None, 1, 1.0)]
    if scaled:  # Granite, Cohere, ...: the model rescales the head's output, which the fused loss would skip
        return f"the model scales its logits after the head ({scaled[0]})"
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return (f"the LM head is {type(head).__module__}.{type(head).__name__}, not torch.nn.Linear (LoRA on the "
                "head?)")
    head.forward = types.MethodType(_fused_head_forward, head)
    return None


# ------------------------------------------------------------------ the loss


def response_loss(model, inputs: dict, loss: dict, mode: str, *, fused: bool = False) -> torch.Tensor:
    """Σ (weight ×) NLL of the response tokens, in float32, through the model's own forward (so DDP/FSDP
    hooks run).

    Flattened rows: the LM head runs only at the positions that predict a response token (loss["index"],
    transformers' logits_to_keep): prompts are most of a cell-sentence sample, and the head is most of a
    small model's, or a 256k-vocabulary model's, compute. fused=True (the head installed by
    install_fused_head): the head returns the loss itself, without [N, V] logits. Rows with masks: the
    logits of every position, masked to the response tokens."""
    if "index" in loss:
        if fused:
            token = _FUSED.set((loss["target"], loss["weight"]))
            try:
                return forward(model, {**inputs, "logits_to_keep": loss["index"]}, mode)
            finally:
                _FUSED.reset(token)
        logits = forward(model, {**inputs, "logits_to_keep": loss["index"]}, mode).squeeze(0)  # a view: select()
        # would zero-fill an [1, N, V] gradient in backward
        return sum_nll(logits, loss["target"], loss["weight"])
    nll, mask = token_loss(forward(model, inputs, mode), loss["labels"])
    w = mask if loss["weights"] is None else loss["weights"][:, 1:] * mask
    return (nll * w).sum()


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position next-token NLL (0 where the label is -100) and the mask of positions that count.

    Label t is predicted from position t-1. Packed samples never leak into each other here: the first
    token of a sample is a prompt token (label -100), so no position is trained to predict across a
    boundary."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none").view_as(shift_labels)
    return nll, mask
