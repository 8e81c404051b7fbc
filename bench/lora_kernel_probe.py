"""The LoRA dropout kernel (lora_kernel.py) on one GPU: its outputs and gradients against dropout with the same
mask as autograd runs it (bf16) and in fp64, and its time and kept memory against the two other paths
(PEFT's: dropout then the matmul, the dropped copy and mask kept; selective: x kept, the mask drawn again).
One JSON line per check, then a table.   python bench/lora_kernel_probe.py > probe.jsonl"""

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
from levers import dropout_kernel_accuracy  # noqa: E402

from shardtune.kernels import lora_kernel  # noqa: E402
from shardtune.kernels.fused_lora import _adapter_input  # noqa: E402

GPU, BF16, P = torch.device("cuda", 0), torch.bfloat16, 0.05


def accuracy(M: int, K: int, R: int) -> dict:
    """Forward and both gradients: the kernel and autograd's bf16 dropout + linear, each against fp64 with the
    kernel's own mask (the GPU levers test's check, tests/levers.py, at more shapes)."""
    return {"M": M, "K": K, "R": R, **dropout_kernel_accuracy(M, K, R, GPU, P)}


def timed(M: int, K: int, R: int, path: str) -> dict:
    """Forward + backward of one adapter's A under bf16 autocast (mean of 20), and the memory kept between them."""
    x = torch.randn(M, K, device=GPU, dtype=BF16, requires_grad=True)
    lora_a = torch.nn.Linear(K, R, bias=False, device=GPU)
    dropout = torch.nn.Dropout(P).train()
    g = torch.randn(M, R, device=GPU, dtype=BF16)
    if path == "kernel":
        run = lambda: _adapter_input(x, dropout, lora_a, True, False)  # noqa: E731
    elif path == "selective":  # the replay path (what runs without Triton)
        run = lambda: _replay(x, dropout, lora_a)  # noqa: E731
    else:
        run = lambda: lora_a(dropout(x))  # noqa: E731

    def step():
        with torch.autocast("cuda", dtype=BF16):
            h = run()
        h.backward(g)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(GPU)
    with torch.autocast("cuda", dtype=BF16):
        h = run()
    kept = torch.cuda.memory_allocated(GPU) - before - h.numel() * h.element_size()
    h.backward(g)
    # 20 steps queued back to back (where the GPU's work is short, the host's launches still show)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        step()
    end.record()
    torch.cuda.synchronize()
    return {
        "M": M,
        "K": K,
        "path": path,
        "fwd_bwd_ms": start.elapsed_time(end) / 20,
        "kept_mib": kept / 2**20,
    }


def _replay(x, dropout, lora_a):
    from shardtune.kernels import fused_lora

    weight = lora_a.weight.to(BF16)
    with torch.autocast("cuda", enabled=False):
        return fused_lora._DroppedMatmul.apply(x, weight, dropout.p, BF16)


def tiles(M: int, K: int) -> list[dict]:
    """The kernels alone (triton.testing.do_bench, no host work between them) for tile settings around the
    defaults: milliseconds and the rate at which they move the bytes they must (forward reads x; backward reads
    x and writes its gradient), beside a copy of x (read + write) for the memory's rate."""
    from triton.testing import do_bench

    x = torch.randn(M, K, device=GPU, dtype=BF16)
    w = (torch.randn(16, K, device=GPU) / K**0.5).to(BF16)
    g = torch.randn(M, 16, device=GPU, dtype=BF16)
    out = [{"check": "tiles", "M": M, "K": K, "what": "copy of x", "ms": do_bench(lambda: x.clone())}]
    out[-1]["tb_s"] = 4 * M * K / out[-1]["ms"] / 1e9
    for rounds in (10, 7):
        ms = do_bench(lambda r=rounds: lora_kernel.keep_mask((M, K), GPU, P, 1, 0, r))
        out.append(
            {
                "check": "tiles",
                "M": M,
                "K": K,
                "what": f"mask only r{rounds}",
                "ms": ms,
                "tb_s": M * K / ms / 1e9,
            }
        )
    for bm, bk, warps, stages, rounds in (
        (64, 128, 4, 3, 10),
        (64, 128, 4, 3, 7),
        (64, 128, 8, 3, 10),
        (32, 256, 4, 3, 10),
        (32, 256, 4, 3, 7),
        (64, 128, 4, 2, 10),
    ):
        t = {"BM": bm, "BK": bk, "num_warps": warps, "num_stages": stages, "ROUNDS": rounds}
        f = do_bench(lambda t=t: lora_kernel.forward(x, w, P, 1, 0, t))
        b = do_bench(lambda t=t: lora_kernel.backward(x, w, g, P, 1, 0, True, t))
        out.append(
            {
                "check": "tiles",
                "M": M,
                "K": K,
                "what": f"{bm}x{bk} w{warps} s{stages} r{rounds}",
                "fwd_ms": f,
                "bwd_ms": b,
                "fwd_tb_s": 2 * M * K / f / 1e9,
                "bwd_tb_s": 4 * M * K / b / 1e9,
            }
        )
    return out


rows = []
if "--tiles" in sys.argv:
    for M, K in ((3072, 8192), (3072, 28672), (12288, 28672)):
        for r in tiles(M, K):
            rows.append(r)
            print(json.dumps(r), flush=True)
            ms = (
                f"{r['ms']:.3f} ms {r['tb_s']:.2f} TB/s"
                if "ms" in r
                else (
                    f"fwd {r['fwd_ms']:.3f} ms {r['fwd_tb_s']:.2f} TB/s  bwd {r['bwd_ms']:.3f} ms {r['bwd_tb_s']:.2f} TB/s"
                )
            )
            print(f"{M:>6}{K:>7} {r['what']:<18} {ms}", file=sys.stderr)
    sys.exit(0)
for M, K, R in ((6144, 8192, 16), (6144, 28672, 16), (3000, 8200, 8), (4096, 4096, 64)):
    rows.append({"check": "accuracy", **accuracy(M, K, R)})
    print(json.dumps(rows[-1]), flush=True)
for M, K in ((3072, 8192), (3072, 28672), (12288, 8192), (12288, 28672)):
    for path in ("peft", "selective", "kernel"):
        rows.append({"check": "speed", **timed(M, K, 16, path)})
        print(json.dumps(rows[-1]), flush=True)
print(f"{'M':>6}{'K':>7} {'path':<10}{'fwd+bwd ms':>11}{'kept MiB':>10}", file=sys.stderr)
for r in rows:
    if r["check"] == "speed":
        print(
            f"{r['M']:>6}{r['K']:>7} {r['path']:<10}{r['fwd_bwd_ms']:>11.3f}{r['kept_mib']:>10.1f}",
            file=sys.stderr,
        )
    else:
        print({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}, file=sys.stderr)
