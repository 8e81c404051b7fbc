"""Does torch.compile speed up shardtune's training step? One GPU, a random-weight model of Llama-3-70B widths
(--layers of them) built by shardtune's loader as a run builds it (NF4 base, LoRA r=16 dropout 0.05 on every
linear layer, the fused LoRA layers and their kernels, Liger), one --seq-token row per step, bf16 autocast:
the step time with the decoder layers as they are, then with each layer compiled (regional compilation, as
torchtitan compiles its blocks: one graph per layer class, reused by every layer), with dynamo's graph breaks.
One JSON line per arm.   python bench/compile_probe.py --layers 8 > compile.jsonl"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
from levers import build  # noqa: E402

from shardtune.train.objectives import token_loss_sum  # noqa: E402
from shardtune.train.step import compute_context  # noqa: E402

GPU, BF16 = torch.device("cuda", 0), torch.bfloat16


def step(model, batch) -> None:
    model.zero_grad(set_to_none=True)
    with compute_context(GPU, BF16):
        loss = token_loss_sum(model, batch, fused=True)
    loss.backward()


def timed(model, batch, warmup: int, steps: int) -> dict:
    start = time.perf_counter()
    for _ in range(warmup):  # (the compiled arm compiles here)
        step(model, batch)
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - start
    each = []
    for _ in range(steps):
        begin = time.perf_counter()
        step(model, batch)
        torch.cuda.synchronize()
        each.append(round(time.perf_counter() - begin, 4))
    tokens = batch["input_ids"].numel()
    return {
        "warmup_s": round(warm_s, 1),
        "step_s_each": each,
        "tokens_per_s": round(tokens * len(each) / sum(each), 1),
        "peak_gib": round(torch.cuda.max_memory_allocated(GPU) / 2**30, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=3072)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    _, model = build(
        {
            "model.name_or_path": "llama3-70b",
            "model.shape": {"num_hidden_layers": args.layers},
            "parallel.mixed_precision": "bf16",
            "model.fused_kernels": True,
            "lora.dropout": 0.05,
            "lora.alpha": 8.0,
        },
        GPU,
    )
    model.train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128000, (1, args.seq), generator=gen)
    batch = {
        "input_ids": ids.to(GPU),
        "attention_mask": torch.ones_like(ids).to(GPU),
        "labels": torch.roll(ids, -1, 1).to(GPU),
    }
    base = {"layers": args.layers, "seq": args.seq}
    print(json.dumps({**base, "arm": "eager", **timed(model, batch, args.warmup, args.steps)}), flush=True)
    from torch._dynamo.utils import counters

    for layer in model.base_model.model.model.layers:
        layer.compile()
    try:
        result = timed(model, batch, args.warmup, args.steps)
    except Exception as e:  # an arm that fails is a result too
        result = {"error": f"{type(e).__name__}: {str(e)[:1500]}"}
    breaks = sorted(counters["graph_break"].items(), key=lambda kv: -kv[1])
    print(
        json.dumps(
            {
                **base,
                "arm": "compiled layers",
                **result,
                "graph_breaks": sum(n for _, n in breaks),
                "break_reasons": [f"{n}x {reason[:300]}" for reason, n in breaks[:12]],
                "unique_graphs": counters["stats"]["unique_graphs"],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
