"""What the frozen base's linear layers take per weight, by quant.bits: the plan's bytes for 4-bit NF4, LLM.int8
and an unquantized base."""

from __future__ import annotations

from shardtune.config import QuantConfig


def weight_bytes(quant: QuantConfig, compute: int) -> float:
    """Bytes per weight: 0.5 (4-bit), 1 (LLM.int8), or the compute dtype's `compute` (16: not quantized)."""
    return {4: 0.5, 8: 1.0}.get(quant.bits, compute)


def statistics_bytes(quant: QuantConfig, weights: int, rows: int) -> float:
    """The quantization statistics of `weights` weights in `rows` output rows, whole on every GPU: 4-bit absmax
    per 64 weights (one byte with double quantization, plus fp32 per 256 blocks; else fp32); LLM.int8's fp32
    scale per row (SCB); none unquantized."""
    if quant.bits == 4:
        return weights / 64 * (1 + 4 / 256 if quant.double_quant else 4)
    return rows * 4.0 if quant.bits == 8 else 0.0


def base_part(quant: QuantConfig) -> str:
    """The plan's name for the frozen base's bytes on one GPU."""
    return "8-bit base (whole)" if quant.bits == 8 else f"{quant.bits}-bit base shard"
