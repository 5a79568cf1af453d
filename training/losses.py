"""The loss of a collated batch: response tokens only, packed samples kept apart.

`response_loss` is what the trainer and the evaluation both call. Summed next-token NLL with a one-pass
backward (`sum_nll`):

F.cross_entropy on [N, V] logits saves log_softmax's output; in backward nll_loss zero-fills an [N, V]
gradient and scatters into it, and log_softmax's backward makes another pass with a row reduction. The
gradient of the summed NLL is simply softmax - onehot(target) = exp(log_softmax) - onehot: one pass over
the saved log-probabilities and an index update. After the LM head is cut to response positions this is
the largest remaining cost of a small model's step besides the linear layers (BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from training import attention as ta
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
    return "flash" if mode == "varlen" else mode  # both take one flattened row with restarting positions


def model_inputs(batch: dict, mode: str, device) -> tuple[dict, torch.Tensor]:
    """Collated batch -> (forward kwargs, labels). Padding-free modes get the sample boundaries
    (cu_seq_lens) that flash-attention and sdpa_varlen split the packed row by."""
    batch = dict(batch)
    batch.pop("token_task", None)
    labels = batch.pop("labels").to(device)
    inputs = {k: v.to(device) for k, v in batch.items()}
    if mode in ("flash", "varlen"):
        cu, longest = ta.cu_seq_lens(inputs["position_ids"])
        inputs |= {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    return inputs, labels


def forward(model, inputs: dict, mode: str):
    with ta.packed() if mode == "varlen" else contextlib.nullcontext():
        return model(**inputs, use_cache=False).logits


def response_loss(model, inputs: dict, labels: torch.Tensor, mode: str,
                  weights: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(summed NLL of the response tokens, their number). On a flattened packed row the LM head runs only
    at the positions that predict a response token (transformers' logits_to_keep with indices): prompts
    are most of a cell-sentence sample, and the head is most of a small model's, or a 256k-vocabulary
    model's, compute. Through the model's own forward, so DDP/FSDP hooks still run."""
    if mode in ("flash", "varlen"):
        target = labels[0, 1:]
        keep = torch.nonzero(target != IGNORE_INDEX).view(-1)
        logits = forward(model, {**inputs, "logits_to_keep": keep}, mode).squeeze(0)  # a view: select() would
        # zero-fill an [1, N, V] gradient in backward
        w = None if weights is None else weights[0, 1:][keep]
        return sum_nll(logits, target[keep], w), int(keep.numel())
    nll, mask = token_loss(forward(model, inputs, mode), labels)
    w = mask if weights is None else weights[:, 1:] * mask
    return (nll * w).sum(), int(mask.sum())


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
