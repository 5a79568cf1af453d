"""Padding-free packed attention without the flash-attn package: "sdpa_varlen".

Packed samples share one flattened row; each attends only to itself. The sample boundaries arrive as the
cu_seq_lens_q / max_length_q keywords that transformers passes down to attention layers (computed on the
CPU at collate time, so nothing here waits for the device).

- CUDA, bf16/fp16: torch's own variable-length flash kernel, `torch.nn.attention.varlen.varlen_attn`
  (torch >= 2.10), causal through window_size=(-1, 0): one kernel per layer for the whole batch.
- Elsewhere (CPU, or fp32): sdpa with is_causal=True on each sample's slice (O(Σ lᵢ²), no mask in memory),
  which beats a block-diagonal mask over the whole row on CPU (BENCHMARKS.md).
Without those keywords (generation, evaluation with padding) it is plain sdpa.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools

import torch
import torch.nn.functional as F

NAME = "sdpa_varlen"
_packed = contextvars.ContextVar("sdpa_varlen_packed", default=False)


def _varlen_kernel():
    """torch.nn.attention.varlen.varlen_attn, or None where this torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def kernel_dtype(query: torch.Tensor, dropout: float) -> torch.dtype | None:
    """The half precision the fused kernel runs in here (the query's, or autocast's), None where it does not
    apply: off CUDA, in fp32 without autocast, with attention dropout, or in a torch without it."""
    if query.device.type != "cuda" or dropout > 0 or _varlen_kernel() is None:
        return None
    if query.dtype in (torch.bfloat16, torch.float16):
        return query.dtype
    return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None


def _kernel_attention(query, key, value, cu: torch.Tensor, longest: int, scaling, groups: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """[1, H, T, D] q/k/v -> [1, T, H, D] through varlen_attn (q/k/v as [T, H, D] in half precision)."""
    q, k, v = (x[0].transpose(0, 1).to(dtype) for x in (query, key, value))
    out = _varlen_kernel()(q, k, v, cu, cu, longest, longest, scale=scaling, window_size=(-1, 0),
                           enable_gqa=groups > 1)
    return out.unsqueeze(0)


def _loop_attention(query, key, value, cu: torch.Tensor, scaling, dropout: float) -> torch.Tensor:
    """Causal sdpa on each sample's slice: [1, H, T, D] -> [1, T, H, D]."""
    lengths = [e - s for s, e in itertools.pairwise(cu.tolist())]
    # split (not slicing): its backward is one concatenation, where slices would each scatter into zeros
    out = torch.cat([F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
                     for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2),
                                        value.split(lengths, dim=2), strict=True)], dim=2)
    return out.transpose(1, 2).contiguous()


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """query/key/value [B=1, H, T, D] -> ([1, T, H, D], None), causal within each [cu[i], cu[i+1])."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("sdpa_varlen does not support attention soft-capping (Gemma-2): use --attention flex "
                         "or 4d")
    if query.shape[0] != 1:
        raise ValueError("sdpa_varlen takes one packed row (batch size 1)")
    p = dropout if module.training else 0.0
    groups = query.shape[1] // key.shape[1]
    dtype = kernel_dtype(query, p)
    if dtype is not None:
        longest = kwargs.get("max_length_q")
        if longest is None:  # only callers that did not collate with ours: one sync to find it
            longest = int((cu[1:] - cu[:-1]).max())
        return _kernel_attention(query, key, value, cu, int(longest), scaling, groups, dtype), None
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    return _loop_attention(query, key, value, cu, scaling, p), None


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


def document_ids(cu_seq_lens: torch.Tensor, total: int) -> torch.Tensor:
    """[total] sample index of each token of a flattened row, on cu_seq_lens' device without a host sync."""
    lens = (cu_seq_lens[1:] - cu_seq_lens[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lens), device=lens.device), lens, output_size=total)


def sliding_layers(config) -> int | None:
    """The window of the model's sliding-window layers (Gemma-2: every other layer), None without them."""
    types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    return window if window and "sliding_attention" in types else None


def block_masks(cu_seq_lens: torch.Tensor, total: int, config):
    """flex_attention BlockMasks for one flattened packed row: causal within each sample; for a model with
    sliding-window layers, {"full_attention": ..., "sliding_attention": ...} (the window applied too)."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc = document_ids(cu_seq_lens, total)

    def causal(b, h, q, k):
        return (doc[q] == doc[k]) & (q >= k)

    full = create_block_mask(causal, 1, None, total, total, device=doc.device)
    window = sliding_layers(config)
    if window is None:
        return full

    def sliding(b, h, q, k):
        return (doc[q] == doc[k]) & (q >= k) & (q - k < window)

    return {"full_attention": full,
            "sliding_attention": create_block_mask(sliding, 1, None, total, total, device=doc.device)}


def dense_masks(segment_ids: torch.Tensor, dtype: torch.dtype, config=None):
    """Additive [B,1,L,L] block-diagonal causal masks built on segment_ids' device: 0 where query i may see
    key j (same segment, j <= i), the dtype's minimum elsewhere (a padding token sees itself, so no row is all
    masked). With sliding-window layers, a dict per layer type, the window applied to those layers."""
    width = segment_ids.shape[1]
    idx = torch.arange(width, device=segment_ids.device)
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (idx[:, None] >= idx[None, :])

    def additive(ok: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(ok.shape, dtype=dtype, device=ok.device)
        return mask.masked_fill_(~ok, torch.finfo(dtype).min)[:, None]

    window = sliding_layers(config) if config is not None else None
    if window is None:
        return additive(allowed)
    return {"full_attention": additive(allowed),
            "sliding_attention": additive(allowed & (idx[:, None] - idx[None, :] < window))}
