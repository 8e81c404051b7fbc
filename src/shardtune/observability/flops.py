"""FLOPs and MFU.

FLOPs per token of LoRA on a frozen base: 4N + 3A, with N the matmul weights and A = 2·L·d·s the causal
attention term for a row of s tokens (forward 2N + A, backward input-gradients only 2N + 2A). With
activation checkpointing the hardware also recomputes the forward: 6N + 4A (reported as HFU).
MFU divides by the device's dense peak: the bf16 rate measured on H100/H200 here, else a matmul timed
at start-up on this device (so CPU runs report an honest figure too).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class FlopModel:
    """What a step's FLOPs are counted from: the model's matmul weights, layers, width; the device's peak; the
    share of layers recomputed in backward."""

    n_matmul: int
    n_layers: int
    hidden: int
    peak_flops: float
    recompute: float  # share of the layers recomputed in backward

    def step(self, tokens: float, squares: float) -> tuple[float, float]:
        """(model FLOPs, hardware FLOPs) of one step over rows with Σs = `tokens` and Σs² = `squares`."""
        return step_flops(self.n_matmul, self.n_layers, self.hidden, tokens, squares, self.recompute)

    def forward(self, tokens: float, squares: float) -> float:
        """FLOPs of one more forward over the same rows without backward (DPO's reference): 2N per token plus
        the attention scores and values."""
        return 2 * self.n_matmul * tokens + 2 * self.n_layers * self.hidden * squares


# Dense bf16 matmul rates measured on these GPUs here (see README "Benchmarks"); others are timed.
MEASURED_PEAK_FLOPS = {"H100": 790e12, "H200": 790e12}


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(FLOP/s, how it was obtained) for dense matmuls on `device`: in `dtype` on a GPU; on a CPU the faster
    of float32 and `dtype` (CPUs run low precision no faster, often slower, than float32)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in MEASURED_PEAK_FLOPS.items():
            if key in name and dtype == torch.bfloat16:
                return value, f"{key} measured bf16 rate"
        return _timed_matmul(
            device, dtype, 2048
        ), f"timed 2048x2048 {str(dtype).removeprefix('torch.')} matmul"
    rates = {d: _timed_matmul(device, d, 512) for d in {torch.float32, dtype}}
    best = max(rates, key=rates.get)
    return rates[best], f"timed 512x512 {str(best).removeprefix('torch.')} matmul on cpu"


def _timed_matmul(device: torch.device, dtype: torch.dtype, n: int) -> float:
    # its own generator: drawing from the global one would shift a resumed run's dropout masks
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.25:
        a @ b
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def step_flops(n_matmul: int, n_layers: int, hidden: int, tokens: float, squares: float, recompute: float):
    """(model FLOPs, hardware FLOPs) of one step over rows with Σs = `tokens` and Σs² = `squares`;
    `recompute` is the share of the layers whose forward runs again in backward (activation checkpointing)."""
    attention = 2 * n_layers * hidden * squares  # A summed over every token: Σ_rows s·(2·L·d·s)
    model = 4 * n_matmul * tokens + 3 * attention
    hardware = model + float(recompute) * (2 * n_matmul * tokens + attention)
    return model, hardware
