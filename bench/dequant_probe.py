"""NF4 dequantization: bitsandbytes' kernels vs shardtune.nf4_kernel's one Triton kernel, on Llama-3-70B's weight
shapes (one GPU): bit-identical output, time and bandwidth. One JSON line per shape.

    python bench/dequant_probe.py
"""

import json

import bitsandbytes.functional as F
import torch

from shardtune.kernels import nf4_kernel


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


for name, shape in {
    "mlp (28672 x 8192)": (28672, 8192),
    "q/o (8192 x 8192)": (8192, 8192),
    "k/v (1024 x 8192)": (1024, 8192),
}.items():
    w = torch.randn(shape, dtype=torch.bfloat16, device="cuda") * 0.02
    packed, state = F.quantize_4bit(
        w, blocksize=64, quant_type="nf4", compress_statistics=True, quant_storage=torch.bfloat16
    )
    ref = F.dequantize_4bit(packed, state)
    mine = nf4_kernel.dequantize(packed, state)
    bytes_moved = w.numel() * (0.5 + 2) + w.numel() / 64
    t_bnb, t_mine = (
        timed(lambda p=packed, s=state: F.dequantize_4bit(p, s)),
        timed(lambda p=packed, s=state: nf4_kernel.dequantize(p, s)),
    )
    print(
        json.dumps(
            {
                "shape": name,
                "bit_identical": torch.equal(ref, mine),
                "max_abs_diff": (ref.float() - mine.float()).abs().max().item(),
                "bnb_ms": round(t_bnb, 4),
                "triton_ms": round(t_mine, 4),
                "bnb_TBps": round(bytes_moved / t_bnb / 1e9, 2),
                "triton_TBps": round(bytes_moved / t_mine / 1e9, 2),
            }
        ),
        flush=True,
    )
