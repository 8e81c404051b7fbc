"""NF4 dequantization in one Triton kernel, bit for bit what bitsandbytes computes (used by nf4.py).

bitsandbytes dequantizes a double-quantized NF4 weight in three kernels (the 8-bit absmax codes to fp32, the
offset added, then the 4-bit codes) and its 4-bit kernel moves about 1.9 TB/s on an H200 (40% of the
memory's rate); every frozen weight is dequantized twice per step (forward and backward), 10% of an 80-layer
70B step at one 3072-token row per GPU (bench/results/2026-12-01-1xh200-selective). Here each program reads a
run of packed bytes, their absmax codes and second-level scales, and writes the bf16 weights: one pass.
The arithmetic is bitsandbytes' own, in the same order and rounding (fp32 products, no fused multiply-add,
round to nearest even), so the weights, and so the training, are bit-identical.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dequantize_nf4(
    packed_ptr,  # uint8, two 4-bit codes per byte, the first in the high nibble
    absmax_code_ptr,  # uint8, one per block of `block` weights (double quantization)
    absmax_scale_ptr,  # fp32, one per 256 blocks
    absmax_table_ptr,  # fp32[256], the 8-bit code of the absmax
    offset_ptr,  # fp32[1], added to every dequantized absmax
    nf4_ptr,  # fp32[16], the NF4 values
    out_ptr,
    n_bytes,
    n_out,
    block: tl.constexpr,
    BYTES: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BYTES
    offs = start + tl.arange(0, BYTES)
    inside = offs < n_bytes
    byte = tl.load(packed_ptr + offs, mask=inside, other=0).to(tl.int32)
    blk = offs // (block // 2)
    code = tl.load(absmax_code_ptr + blk, mask=inside, other=0).to(tl.int32)
    absmax = tl.load(absmax_table_ptr + code) * tl.load(absmax_scale_ptr + blk // 256, mask=inside, other=0.0)
    absmax = absmax + tl.load(offset_ptr)
    high = tl.load(nf4_ptr + (byte >> 4)) * absmax
    low = tl.load(nf4_ptr + (byte & 15)) * absmax
    out = tl.interleave(high, low).to(out_ptr.dtype.element_ty)
    out_offs = 2 * start + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + out_offs, out, mask=out_offs < n_out)


def dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """The weight of shape `state.shape` in `state.dtype`, as bnb.functional.dequantize_4bit computes it (NF4,
    double quantization with 256-block second level, an even block size: nf4._supported)."""
    out = torch.empty(state.shape, dtype=state.dtype, device=packed.device)
    data = packed.view(torch.uint8).reshape(-1)  # the packed bytes, whatever the storage dtype
    n_bytes = (out.numel() + 1) // 2
    BYTES = 2048
    _dequantize_nf4[(triton.cdiv(n_bytes, BYTES),)](
        data,
        state.absmax,
        state.state2.absmax,
        state.state2.code,
        state.offset.reshape(1),  # a tensor on the GPU: reading it here would wait for the GPU
        state.code,
        out,
        n_bytes,
        out.numel(),
        block=state.blocksize,
        BYTES=BYTES,
        enable_fp_fusion=False,  # bitsandbytes rounds the absmax product and the offset sum separately
    )
    return out
