"""Padding-free packed attention without flash-attn: "sdpa_varlen".

Packed samples share one row; each attends only to itself. flash_attention_2 does this on GPU from
cu_seqlens. Elsewhere the usual fallback is a block-diagonal 4D mask over the whole packed length, which
costs O(L²) per row however short the samples are and blocks sdpa's fast causal kernels. This attention
function runs torch's sdpa with is_causal=True on each sample's slice instead (O(Σ lᵢ²), no mask in
memory), reading the boundaries from the cu_seq_lens_q keyword transformers passes down to attention
layers. Without those keywords (generation, evaluation with padding) it is plain sdpa.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools

import torch
import torch.nn.functional as F

NAME = "sdpa_varlen"
_packed = contextvars.ContextVar("sdpa_varlen_packed", default=False)


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """query/key/value [B=1, H, T, D] -> ([1, T, H, D], None), causal within each [cu[i], cu[i+1])."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("sdpa_varlen does not support attention soft-capping (Gemma-2): use --attention 4d")
    if query.shape[0] != 1:
        raise ValueError("sdpa_varlen takes one packed row (batch size 1)")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    lengths = [e - s for s, e in itertools.pairwise(cu.tolist())]
    p = dropout if module.training else 0.0
    # split (not slicing): its backward is one concatenation, where slices would each scatter into zeros
    out = torch.cat([F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=scaling, is_causal=True)
                     for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2),
                                        value.split(lengths, dim=2), strict=True)], dim=2)
    return out.transpose(1, 2).contiguous(), None


def _mask(*args, **kwargs):
    """No mask for packed training forwards (the attention splits by cu_seq_lens); sdpa's otherwise."""
    from transformers.masking_utils import sdpa_mask

    return None if _packed.get() else sdpa_mask(*args, **kwargs)


@contextlib.contextmanager
def packed():
    """Forwards inside this block are packed rows with cu_seq_lens: no 4D mask is built."""
    token = _packed.set(True)
    try:
        yield
    finally:
        _packed.reset(token)


def register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, _mask)
    return NAME


def cu_seq_lens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Boundaries of the packed samples of a [1, T] row whose positions restart at 0 per sample."""
    pos = position_ids.view(-1)
    starts = torch.nonzero(pos == 0).view(-1)
    cu = torch.cat([starts, torch.tensor([pos.numel()], device=pos.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())
