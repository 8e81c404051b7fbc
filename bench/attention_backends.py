"""SDPA's kernels on this GPU for Llama-3-70B attention (64 query heads, 8 KV heads, head dim 128, causal):
forward + backward time of each backend, GQA through `enable_gqa` and through repeated KV heads.

    python bench/attention_backends.py [--batch 4] [--seq 3072]"""

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--seq", type=int, default=3072)
args = ap.parse_args()
B, S, H, KV, D = args.batch, args.seq, 64, 8, 128
dev, dt = torch.device("cuda"), torch.bfloat16
q = torch.randn(B, H, S, D, device=dev, dtype=dt, requires_grad=True)
k = torch.randn(B, KV, S, D, device=dev, dtype=dt, requires_grad=True)
v = torch.randn(B, KV, S, D, device=dev, dtype=dt, requires_grad=True)
g = torch.randn(B, H, S, D, device=dev, dtype=dt)
flops = 4 * B * H * S * S * D / 2 * 3.5  # causal: half the score matrix; fwd 1 + bwd 2.5


def run(backend, gqa: bool) -> float:
    def once():
        with sdpa_kernel([backend]):
            if gqa:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                rk, rv = (t.repeat_interleave(H // KV, dim=1) for t in (k, v))
                o = F.scaled_dot_product_attention(q, rk, rv, is_causal=True)
            o.backward(g)

    for _ in range(3):
        once()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        once()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 10


for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
    for gqa in (True, False):
        try:
            ms = run(backend, gqa)
            rec = {
                "backend": backend.name,
                "gqa": gqa,
                "ms_fwd_bwd": round(ms, 2),
                "tflops": round(flops / ms / 1e9, 1),
            }
        except RuntimeError as e:
            rec = {"backend": backend.name, "gqa": gqa, "error": str(e).splitlines()[0][:150]}
        print(json.dumps({"check": "attention", "batch": B, "seq": S, **rec}), flush=True)
