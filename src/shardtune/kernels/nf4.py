"""bitsandbytes' Linear4bit with its training matmuls dequantizing each weight in one kernel (nf4_kernel.py).

For a training-sized input bitsandbytes dequantizes the NF4 weight to bf16 and calls `linear` in forward, and
dequantizes it again for the input gradient in backward, each time in three kernels of which the main one
moves ~2 TB/s on an H200. The same dequantize-then-matmul here goes through one Triton kernel at ~4 TB/s on the
70B MLP's weights, with bit-identical weights, so outputs and gradients are bitwise bitsandbytes' own. Only the
forward is replaced: parameters, quantization state, state dicts, FSDP and PEFT see bitsandbytes' module.
Everything else (CPU, inference on a few tokens where bitsandbytes' fused gemm wins, a trainable bias,
formats other than double-quantized NF4, no Triton) runs bitsandbytes' forward.
"""

from __future__ import annotations

from collections.abc import Callable

import bitsandbytes as bnb
import torch
from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

from shardtune.kernels import triton_available

# bitsandbytes' own crossover on CUDA (backends/cuda/ops.py, _gemm_4bit_custom_max_m): above it, it too
# dequantizes and calls linear; at or below it, inference may use its fused 4-bit gemm
FUSED_GEMM_MAX_TOKENS = 1536


class Linear4bit(bnb.nn.Linear4bit):
    """bnb.nn.Linear4bit whose dequantization runs in one kernel where nf4_kernel.py computes the same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dequantize = self.dequantizer(x, training=torch.is_grad_enabled() and x.requires_grad)
        if dequantize is None:
            return super().forward(x)
        dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _DequantizedLinear.apply(x, dequantize, bias).to(dtype)

    def dequantizer(self, x: torch.Tensor, training: bool) -> Callable[[torch.dtype], torch.Tensor] | None:
        """What dequantizes the weight for a matmul with x (`training`: one that backward needs again), in one
        kernel; None where bitsandbytes' own forward runs. It keeps a reference to the packed weight, as
        bitsandbytes does (not a tensor saved for backward): FSDP frees the gathered weight's storage after
        forward and refills the same storage before backward."""
        fix_4bit_weight_quant_state_from_module(self)  # FSDP's views of the weight lose its quant_state
        state = self.weight.quant_state
        if (
            not _supported(x, state)
            or (self.bias is not None and self.bias.requires_grad)
            or not (training or x.numel() // x.shape[-1] > FUSED_GEMM_MAX_TOKENS)
        ):
            return None
        packed = self.weight
        return lambda dtype: _dequantize(packed, state, dtype)


class _DequantizedLinear(torch.autograd.Function):
    """bitsandbytes' MatMul4Bit for large inputs: linear(x, W) with W dequantized in forward and again in
    backward (never kept), the frozen weight getting no gradient."""

    @staticmethod
    def forward(ctx, x, dequantize, bias):
        ctx.dequantize = dequantize
        return torch.nn.functional.linear(x, dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad, ctx.dequantize(grad.dtype))
        return grad_x, None, None


def _dequantize(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    from shardtune.kernels import nf4_kernel

    # bitsandbytes dequantizes to the state's dtype, then casts (a no-op in bf16 runs)
    return nf4_kernel.dequantize(packed, state).to(dtype)


def _supported(x: torch.Tensor, state) -> bool:
    """Whether nf4_kernel computes what bitsandbytes would: a CUDA input, NF4 with double quantization of
    256-block second level, an even block size, a float dtype, and Triton installed."""
    return (
        x.is_cuda
        and x.numel() > 0
        and state is not None
        and state.quant_type == "nf4"
        and state.nested
        and state.state2.blocksize == 256
        and state.blocksize % 2 == 0
        and state.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and triton_available()
    )


def describe(quant, device: torch.device) -> str:
    """How a run's 4-bit weights get dequantized (`quant`: the run's QuantConfig), for its log."""
    if device.type == "cuda" and quant.quant_type == "nf4" and quant.double_quant and triton_available():
        return "dequantized in one kernel"
    return "dequantized by bitsandbytes"
