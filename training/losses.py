"""Summed next-token NLL with a one-pass backward.

F.cross_entropy on [N, V] logits saves log_softmax's output; in backward nll_loss zero-fills an [N, V]
gradient and scatters into it, and log_softmax's backward makes another pass with a row reduction. The
gradient of the summed NLL is simply softmax - onehot(target) = exp(log_softmax) - onehot: one pass over
the saved log-probabilities and an index update. After the LM head is cut to response positions this is
the largest remaining cost of a small model's step besides the linear layers (BENCHMARKS.md).
"""

from __future__ import annotations

import torch


class _SumNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=-1)
        ctx.save_for_backward(logp, target)
        return -logp.gather(-1, target.unsqueeze(-1)).sum()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logp, target = ctx.saved_tensors
        grad = logp.exp()
        grad[torch.arange(target.numel(), device=target.device), target] -= 1
        return grad.mul_(grad_out), None


def sum_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Σᵢ −log softmax(logitsᵢ)[targetᵢ] for logits [N, V] and targets [N] (no ignored entries), in float32."""
    if logits.numel() == 0:
        return logits.float().sum()
    return _SumNLL.apply(logits.float(), target)
