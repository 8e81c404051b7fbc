"""`shardtune plan RECIPE.py [key=value ...] --gpus N --gpu-mem 24GiB [--fit]`: will this configuration fit, and
how long will it take, before any GPU is touched (planning/)."""

from __future__ import annotations

import re

from shardtune.cli.args import recipe_config
from shardtune.errors import ConfigError
from shardtune.model.modeling import liger_installed
from shardtune.planning.auto import batch_problem, describe_auto, fit, resolve_auto
from shardtune.planning.estimate import GIB, GPU_MEMORY, GPU_PEAKS, Estimate, estimate, fused_on_gpus


def command(args, rest: list[str]) -> int:
    """`shardtune plan`: the plan of one configuration; with --fit, the fastest settings that fit."""

    if args.gpu.lower() not in GPU_PEAKS:
        raise ConfigError(f"--gpu {args.gpu}: no peak rate known; use one of {', '.join(GPU_PEAKS)}")
    cfg, hf_config, note = recipe_config("plan", args.recipe, rest)
    problem = batch_problem(cfg.train, args.gpus, micro_batch=not args.fit)
    if problem:  # a plan of a run that would not start
        raise ConfigError(problem)
    gpu_mem = parse_size(args.gpu_mem) if args.gpu_mem else None
    host_ram = parse_size(args.host_ram) if args.host_ram else None
    if note:
        print(note)
    print(
        f"{args.recipe} on {args.gpus} GPU(s), {args.nodes} node(s): seq {cfg.data.max_len}, "
        f"global batch {cfg.train.global_batch_size}, LoRA r={cfg.lora.r}"
    )
    memory = gpu_mem or GPU_MEMORY[args.gpu.lower()]
    resolved, _ = resolve_auto(cfg, hf_config, args.gpus, memory, args.nodes, host_ram)
    if resolved is not cfg:
        print(f"auto: {describe_auto(cfg, resolved)}")
        cfg = resolved
    est = estimate(cfg, hf_config, args.gpus, args.nodes, args.gpu)
    if cfg.model.fused_kernels == "auto" and not liger_installed() and fused_on_gpus(cfg, hf_config):
        print(
            "model.fused_kernels=auto: planned with Liger's fused loss (no logits held), which the GPU run uses where "
            "liger-kernel is installed (pip install 'shardtune[gpu]'); it is not installed here. For GPU machines "
            "without it, plan with model.fused_kernels=false."
        )
    print(format_plan(est, args.gpus, gpu_mem, host_ram))
    if not args.fit:
        return 0 if gpu_mem is None or est.gpu_peak <= 0.95 * gpu_mem else 1
    if gpu_mem is None:
        raise ConfigError("--fit needs --gpu-mem (the memory of one GPU)")
    fits = fit(cfg, hf_config, args.gpus, gpu_mem, args.nodes, args.gpu)
    if not fits:
        print(
            f"\n--fit: no configuration fits {gpu_mem / 2**30:.0f} GiB per GPU on {args.gpus} GPU(s), even "
            "with micro-batch 1, checkpointing and offload: use more GPUs or a shorter data.max_len"
        )
        return 1
    best = fits[0]
    print(
        f"\n--fit: fastest that fits ({best.gpu_peak / 2**30:.1f} GiB peak), paste:\n  {override_line(best)}"
    )
    return 0


def parse_size(text: str) -> float:
    """'24GiB', '24G', '80GB', '1.5TiB' -> bytes (G and GiB both mean 2^30, as nvidia-smi and Slurm do)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT])?(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"{text!r} is not a size; write e.g. 24GiB or 80G")
    unit = {"K": 1, "M": 2, "G": 3, "T": 4}.get((m.group(2) or "G").upper())
    return float(m.group(1)) * 1024**unit


def format_plan(est: Estimate, gpus: int, gpu_mem: float | None, host_ram: float | None) -> str:
    lines = ["GPU memory per GPU at the training peak:"]
    for part, b in est.gpu.items():
        lines.append(f"  {part:<36} {b / GIB:8.2f} GiB")
    verdict = ""
    if gpu_mem:
        verdict = "fits" if est.gpu_peak <= 0.95 * gpu_mem else "DOES NOT FIT"
        verdict = f"   {verdict} in {gpu_mem / GIB:.0f} GiB (5% kept for the allocator)"
    lines.append(f"  {'training peak':<36} {sum(est.gpu.values()) / GIB:8.2f} GiB")
    lines.append(f"  {'eval forward (eval.batch_size rows)':<36} {est.eval_bytes / GIB:8.2f} GiB")
    lines.append(f"  {'peak':<36} {est.gpu_peak / GIB:8.2f} GiB{verdict}")
    lines.append("host memory per node:")
    for phase, b in est.host.items():
        warn = "   MORE THAN --host-ram" if host_ram and b > host_ram else ""
        lines.append(f"  {phase:<36} {b / GIB:8.2f} GiB{warn}")
    lines.append(f"checkpoint on disk: {est.checkpoint_bytes / GIB:.2f} GiB each")
    total = (
        f", {est.total_s / 3600:.1f} h for the planned steps"
        if est.total_s
        else "; the total follows from train.epochs and the data's size: give train.max_steps to plan it "
        "(`shardtune doctor` counts the rows)"
    )
    lines.append(
        f"speed (rough, from FLOPs and MFU measured on H200s): {est.step_s:.2f} s/step, "
        f"{est.tokens_per_s_per_gpu:,.0f} tokens/s/GPU on {gpus} GPU(s){total}"
    )
    return "\n".join(lines)


def override_line(est: Estimate) -> str:
    return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in est.settings.items())
