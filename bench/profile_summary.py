"""Where the GPU time of profiled steps goes, by kind of kernel, from a trace that SHARDTUNE_PROFILE wrote.

    python bench/profile_summary.py /tmp/prof/rank0.json [--top 25]

Prints one table (kind, milliseconds, share of the GPU's busy time, kernels launched) and the slowest
kernels by total time, then one JSON line with the same numbers for bench/results/."""

import argparse
import collections
import json
import re

KINDS = [  # first match wins
    ("NF4 dequantize", r"dequant|kgemm_4bit|kQuantize"),  # bitsandbytes' kernels and nf4_kernel.py's
    ("attention", r"flash|fmha|attention|cudnn.*sdpa|sdpa"),
    ("collectives (NCCL)", r"nccl"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|sm\d\d_|cublas|splitK"),
    ("LoRA dropout (lora_kernel.py)", r"lora_dropout"),
    ("Liger / Triton fused", r"triton|liger|_kernel$|rms_norm|swiglu|rope|cross_entropy"),
    ("dropout", r"dropout|bernoulli|philox"),
    ("optimizer (AdamW)", r"adam|multi_tensor"),
    ("copies and casts", r"memcpy|memset|copy|cat_|CatArray|to_copy|convert"),
    ("elementwise and reductions", r"elementwise|vectorized|reduce|unrolled|index|scatter|gather|fill"),
]


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, pat in KINDS if re.search(pat, low)), "other")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    with open(args.trace) as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    by_kind, count = collections.Counter(), collections.Counter()
    by_name, name_count = collections.Counter(), collections.Counter()
    for e in kernels:
        k = kind(e["name"])
        by_kind[k] += e["dur"]
        count[k] += 1
        by_name[e["name"][:110]] += e["dur"]
        name_count[e["name"][:110]] += 1
    # busy time: the union of kernel intervals (streams overlap); wall: first kernel start to last end
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels)
    busy, end = 0.0, float("-inf")
    for s, t in spans:
        if t > end:
            busy += t - max(s, end)
            end = t
    wall = spans[-1][1] - spans[0][0]
    total = sum(by_kind.values())
    print(
        f"GPU wall {wall / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms ({busy / wall:.1%}), kernel time {total / 1e3:.1f} ms"
    )
    print(f"{'kind':34s} {'ms':>9s} {'share':>7s} {'kernels':>8s}")
    for k, us in by_kind.most_common():
        print(f"{k:34s} {us / 1e3:9.1f} {us / total:7.1%} {count[k]:8d}")
    print(f"\nslowest {args.top} kernels by total time:")
    for n, us in by_name.most_common(args.top):
        print(f"{us / 1e3:9.1f} ms {name_count[n]:6d}x  [{kind(n)}] {n}")
    print(
        json.dumps(
            {
                "trace": args.trace,
                "wall_ms": round(wall / 1e3, 1),
                "busy_ms": round(busy / 1e3, 1),
                "kernel_ms": {k: round(v / 1e3, 1) for k, v in by_kind.most_common()},
            }
        )
    )


if __name__ == "__main__":
    main()
