"""PyTorch's own variable-length attention for packed batches, as a transformers attention implementation.

A packed micro-batch lays its rows end to end in one sequence (`data.packing`). Through SDPA that sequence
gets a block-diagonal mask, built by transformers from the position ids, and a masked SDPA runs its
memory-efficient kernel over the whole square: 8 rows of ~600 tokens cost the attention of one 5,000-token
row, most of it masked out. `torch.nn.attention.varlen.varlen_attn` (a Flash kernel shipped with torch)
takes the rows' boundaries instead and computes each row's causal attention alone, as flash-attn's varlen
kernel does where flash-attn is installed.

'sdpa_varlen' is SDPA with that one difference: a batch that comes with its rows' boundaries
(`cu_seq_lens_q`, the keyword transformers' own padding-free collator passes; the trainer passes it for
packed batches) goes to the varlen kernel; anything else (padded batches, fp32, the CPU, a torch before 2.10)
goes to transformers' SDPA unchanged, mask and all.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect

import torch

NAME = "sdpa_varlen"


@functools.cache
def available() -> bool:
    """Whether this torch ships the varlen kernel with a `scale` argument (2.10 and later)."""
    try:
        if importlib.util.find_spec("torch.nn.attention.varlen") is None:
            return False
    except ModuleNotFoundError:
        return False
    return "scale" in _kernel()[1]


@functools.cache
def register() -> None:
    """Make NAME a value transformers accepts for `attn_implementation` (its masks are SDPA's)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """(batch, heads, tokens, head_dim) in, (batch, tokens, heads, head_dim) out, as transformers' SDPA."""
    if (
        cu_seq_lens_q is None
        or query.shape[0] != 1
        or not query.is_cuda
        or query.dtype not in (torch.bfloat16, torch.float16)
        or dropout
        or not getattr(module, "is_causal", True)
        or not available()
    ):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    # (1, heads, tokens, head_dim) -> (tokens, heads, head_dim): the projections' own layout, so no copy
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    cu_k = cu_seq_lens_q if cu_seq_lens_k is None else cu_seq_lens_k
    out = _varlen_attn(q, k, v, cu_seq_lens_q, cu_k, max_length_q, max_length_k or max_length_q, scaling)
    return out.unsqueeze(0), None


@functools.cache
def _kernel():
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _varlen_attn(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float | None) -> torch.Tensor:
    """Causal varlen attention through whichever signature this torch has: a (left, right) window, (-1, 0)
    being causal, or `is_causal`; `enable_gqa` where it asks to be told of fewer key/value heads."""
    kernel, params = _kernel()
    kw = {"scale": scale}
    if "window_size" in params:
        kw["window_size"] = (-1, 0)
    else:
        kw["is_causal"] = True
    if q.shape[1] != k.shape[1] and "enable_gqa" in params:
        kw["enable_gqa"] = True
    return kernel(q, k, v, cu_q, cu_k, max_q, max_k, **kw)
