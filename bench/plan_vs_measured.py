"""`shardtune plan`'s predicted peak GPU memory and speed against `shardtune bench` lines (BENCHMARKS.md's table):
    python bench/plan_vs_measured.py bench/results/2026-11-23-2xh200-c/speed.jsonl
The plan is asked about exactly what each bench run trained: the benchmark recipe, the shape, sequence,
micro-batch, GPUs, the run's overrides and the settings it resolved ('auto' checkpointing, sharding and fused kernels).
"""

import json
import sys

from shardtune.cli import bench
from shardtune.cli.args import resolve_config
from shardtune.planning.auto import resolve_auto
from shardtune.planning.estimate import GPU_MEMORY, architecture, estimate


def predict(r: dict):
    name, shape = bench.SHAPES[r["shape"]]
    mb, gpus = r["micro_batch"], r["gpus"]
    overrides = [f"model.name_or_path={name}", *(f"{k}={v}" for k, v in shape.items())]
    overrides += [
        f"data.max_len={r['seq']}",
        f"train.global_batch_size={mb * gpus}",
        f"train.micro_batch_size={mb}",
    ]
    # the fused kernels, checkpointing and sharding as the run resolved them ('auto' planned here would depend on this
    # machine's Liger and on the plan's version)
    ran = r["settings"]
    resolved = [
        f"model.fused_kernels={str(ran['fused_kernels']).lower()}",
        f"parallel.activation_checkpointing={str(ran['activation_checkpointing']).lower()}",
        f"parallel.checkpoint_every={ran['checkpoint_every']}",
    ]
    if ran.get("sharding_strategy"):  # recorded since 'auto' could choose it
        resolved.append(f"parallel.sharding_strategy={ran['sharding_strategy']}")
    # runs from before lora.fused existed (no record of it) ran PEFT's LoRA forward
    if "fused" not in ran["lora"]:
        overrides.append("lora.fused=false")
    cfg = resolve_config(
        bench.config(), [*overrides, f"eval.max_rows={gpus}", *r["overrides"], *resolved], env={}
    )
    hf_config, _ = architecture(cfg)
    memory = (
        cfg.parallel.gpu_memory_limit_gib * 2**30 if cfg.parallel.gpu_memory_limit_gib else GPU_MEMORY["h200"]
    )
    cfg, _ = resolve_auto(cfg, hf_config, gpus, memory)
    return estimate(cfg, hf_config, gpus)


print(
    "| run | GPUs | seq | mb | overrides | predicted GiB | measured GiB | error | predicted tok/s/GPU | measured |"
)
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
with open(sys.argv[1]) as f:
    for line in f:
        r = json.loads(line)
        if "error" in r:
            continue
        est = predict(r)
        measured = max(x for x in r["gpu_peak_gib_per_rank"] if x)
        predicted = est.gpu_peak / 2**30
        print(
            f"| {r['shape']} ({r['lengths']}) | {r['gpus']} | {r['seq']} | {r['micro_batch']} | "
            f"{' '.join(r['overrides'])} | {predicted:.1f} | {measured:.1f} | {(predicted - measured) / measured:+.0%} | "
            f"{est.tokens_per_s_per_gpu:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} |"
        )
