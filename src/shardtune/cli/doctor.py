"""`shardtune doctor`: what will go wrong with this setup, found before a queue wait, each with its fix.

    shardtune doctor RECIPE [key=value ...] [--gpus N] [--signal-lead SECONDS]
    torchrun ... recipes/X.py --doctor        # the same checks at the start of a run, then the run
    torchrun ... -m shardtune.cli doctor RECIPE --numerics   # sharded against unsharded (numerics.py)

Checks: library versions against the ones shardtune is tested with; CUDA, NCCL and a 4-bit round trip
through bitsandbytes on this machine's device; the dtype rule (4-bit storage = FSDP parameter dtype =
compute dtype); that the wrap class exists in the model's code; the attention implementation that will
run; the tokenizer and data, prepared as the run prepares them; free disk for the checkpoints the run keeps;
on SLURM, that the signal's lead time covers a step and a checkpoint save (from `shardtune plan`'s
estimates, or from the run's own logged save times).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from shardtune.cli.args import recipe_config
from shardtune.config import Config, ParallelConfig, TrainConfig
from shardtune.parallel.backend import DEEPSPEED_MISSING, deepspeed_installed

# (lowest, highest) versions the CPU CI and the GPU machines ran; outside them things may still work.
TESTED = {
    "torch": ("2.11", "2.13"),
    "transformers": ("5.17", "5.24"),
    "peft": ("0.21", "0.21"),
    "accelerate": ("1.15", "1.16"),
    "bitsandbytes": ("0.50", "0.50"),
    "datasets": ("5.2", "5.2"),
    "submitit": ("1.5.4", "1.5.4"),
}


@dataclass
class Finding:
    level: str  # ok | warn | error
    what: str
    fix: str = ""

    def __str__(self) -> str:
        mark = {"ok": "  ok  ", "warn": " WARN ", "error": "ERROR "}[self.level]
        return f"[{mark}] {self.what}" + (f"\n         fix: {self.fix}" if self.fix else "")


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def versions() -> list[Finding]:
    out = []
    for name, (low, high) in TESTED.items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            level = "warn" if name == "submitit" else "error"
            out.append(Finding(level, f"{name} is not installed", f"pip install '{name}>={low}'"))
            continue
        n = len(_release(low))
        inside = _release(low) <= _release(have)[:n] <= _release(high)
        out.append(
            Finding(
                "ok" if inside else "warn",
                f"{name} {have}" + ("" if inside else f" (tested: {low} to {high})"),
                "" if inside else f"pin {name} within the tested range if something misbehaves",
            )
        )
    return out


def backend(p: ParallelConfig) -> list[Finding]:
    """The library that shards the base: DeepSpeed must be importable for parallel.backend=deepspeed."""
    if p.backend != "deepspeed":
        return []
    if not deepspeed_installed():
        return [
            Finding(
                "error",
                "parallel.backend=deepspeed but DeepSpeed is not installed in this Python",
                DEEPSPEED_MISSING,
            )
        ]
    return [Finding("ok", f"DeepSpeed {importlib.metadata.version('deepspeed')} (ZeRO-3 backend)")]


def _run_device(p: ParallelConfig) -> torch.device:
    """The device the run will train on (parallel.device, 'auto' meaning CUDA when there is one)."""
    return torch.device("cuda" if torch.cuda.is_available() and p.device != "cpu" else "cpu")


def device(cfg: Config) -> list[Finding]:
    """CUDA, NCCL and a 4-bit round trip on the device the run will use."""
    out = []
    cuda = torch.cuda.is_available()
    if cfg.parallel.device == "cuda" and not cuda:
        return [Finding("error", "parallel.device=cuda but CUDA is not available", "run on a GPU node")]
    if cuda:
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
        out.append(Finding("ok", f"{torch.cuda.device_count()} GPU(s): {', '.join(names)}; NCCL {nccl}"))
    else:
        out.append(Finding("ok", "no CUDA: training runs on the CPU (gloo)"))
    dev = _run_device(cfg.parallel)
    try:
        import bitsandbytes.functional as bnbf

        w = torch.randn(256, 256, device=dev, dtype=torch.float32)
        packed, state = bnbf.quantize_4bit(w, quant_type=cfg.quant.quant_type, quant_storage=torch.uint8)
        back = bnbf.dequantize_4bit(packed, state)
        err = float((back - w).norm() / w.norm())
        level = "ok" if err < 0.15 else "error"
        out.append(Finding(level, f"bitsandbytes 4-bit round trip on {dev.type}: relative error {err:.3f}"))
    except Exception as e:  # a wheel without this GPU's kernels, a missing CUDA library
        out.append(
            Finding(
                "error",
                f"bitsandbytes cannot quantize on {dev.type}: {type(e).__name__}: {e}"[:300],
                "install a bitsandbytes build for this CUDA version (pip install -U bitsandbytes)",
            )
        )
    return out


def model(cfg: Config, hf_config) -> list[Finding]:
    """The dtype rule, the wrap class, the attention implementation, the fused kernels."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from shardtune.model.modeling import attention_implementation

    sharder, verb = (
        ("FSDP", "wraps")
        if cfg.parallel.backend == "fsdp"
        else ("DeepSpeed ZeRO-3", "partitions layer by layer:")
    )
    out = [
        Finding(
            "ok",
            f"4-bit storage {cfg.storage_dtype} = {sharder} parameter dtype {cfg.param_dtype} = compute dtype "
            f"{cfg.param_dtype}",
        )
    ]
    cls_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(hf_config.model_type)
    module = None
    if cls_name:
        try:
            module = importlib.import_module(
                f"transformers.models.{hf_config.model_type}.modeling_{hf_config.model_type}"
            )
        except ImportError:
            module = None
    wrap = cfg.parallel.wrap_class
    if module is None:
        out.append(
            Finding("warn", f"cannot locate the code of model type {hf_config.model_type!r} to check {wrap}")
        )
    elif hasattr(module, wrap):
        out.append(Finding("ok", f"{sharder} {verb} {wrap} (found in {module.__name__})"))
    else:
        layers = sorted(n for n in dir(module) if n.endswith(("DecoderLayer", "Block")))
        out.append(
            Finding(
                "error",
                f"parallel.wrap_class={wrap} is not a class of {module.__name__}",
                f"set parallel.wrap_class to one of: {', '.join(layers) or '(none found)'}",
            )
        )
    dev = _run_device(cfg.parallel)
    attn = attention_implementation(cfg.model.attn_implementation, dev)
    on_gpu_without_flash = attn in ("sdpa", "sdpa_varlen") and dev.type != "cpu"
    why = " (pip install flash-attn for flash_attention_2)" if on_gpu_without_flash else ""
    out.append(Finding("ok", f"attention: {attn}{why}"))
    out.append(_fused_kernels(cfg, hf_config, dev))
    if dev.type == "cuda":
        out.append(triton_kernels())
    return out


def triton_kernels() -> Finding:
    """shardtune's own GPU kernels (nf4_kernel.py, lora_kernel.py) need Triton; without it the run still
    trains, slower, and with LoRA dropout it keeps more than `shardtune plan` counts."""
    from shardtune.kernels import triton_available

    if triton_available():
        return Finding("ok", "Triton kernels: one-kernel NF4 dequantization, LoRA dropout inside the matmul")
    return Finding(
        "warn",
        "Triton is not installed: bitsandbytes' slower dequantization, and LoRA dropout keeps a masked copy of "
        "every adapter's input (more GPU memory than shardtune plan predicts)",
        "pip install triton (it comes with torch's CUDA wheels)",
    )


def _fused_kernels(cfg: Config, hf_config, dev: torch.device) -> Finding:
    from shardtune.model.modeling import fused_kernels_problem

    wanted = cfg.model.fused_kernels
    problem = fused_kernels_problem(hf_config, dev.type, cfg.parallel.backend) if wanted else None
    if wanted and problem is None:
        return Finding("ok", "Liger fused kernels: on")
    if wanted is True:
        return Finding(
            "error", f"model.fused_kernels=true: {problem}", "set model.fused_kernels=auto or false"
        )
    if wanted == "auto" and dev.type == "cuda" and importlib.util.find_spec("liger_kernel") is None:
        return Finding("warn", f"Liger fused kernels: off ({problem})", "pip install liger-kernel")
    return Finding("ok", f"Liger fused kernels: off ({problem})" if problem else "Liger fused kernels: off")


def data(cfg: Config) -> list[Finding]:
    """The tokenizer and the data, prepared as the run's first step prepares them (no model is loaded): a
    missing file, a bad row or a pad token the tokenizer lacks is found here, not after the queue wait."""
    from shardtune.data.loader import build_data, padding_advice
    from shardtune.model.tokenizer import tokenizer_for

    run_dir = Path(cfg.train.output_dir) / (cfg.train.run_name or "")
    try:
        built = build_data(
            cfg.data, tokenizer_for(cfg.model, cfg.data, run_dir), cfg.train.seed, cfg.objective.name
        )
    except Exception as e:  # the run would stop with this same error
        return [Finding("error", f"data: {e}")]
    lengths = built.train.lengths()
    found = [
        Finding(
            "ok",
            f"data: {built.origin}, format {built.formatter.fmt}: {len(built.train)} train rows, "
            f"{len(built.eval)} eval rows, tokens per row mean {lengths.mean():.0f}, max {lengths.max()}",
        )
    ]
    advice = padding_advice(lengths, cfg)
    return found + ([Finding("warn", f"data: {advice}", "data.packing=true")] if advice else [])


def disk(t: TrainConfig, checkpoint_bytes: float) -> list[Finding]:
    where = Path(t.output_dir)
    probe = where
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = checkpoint_bytes * (t.keep_last + 1)  # kept ones + the one being written
    level = "ok" if free > 2 * need else "warn" if free > need else "error"
    return [
        Finding(
            level,
            f"disk: {free / 2**30:.1f} GiB free at {probe}, checkpoints need {need / 2**30:.2f} GiB "
            f"({t.keep_last} kept + 1 being written)",
            "" if level == "ok" else "point train.output_dir at a larger filesystem or lower train.keep_last",
        )
    ]


def signal_lead(lead_s: float | None, step_s: float, save_s: float, measured: bool) -> list[Finding]:
    """On SLURM the signal must leave time to finish the step, save, and exit (plus Slurm's 30 s granularity
    is on the safe side: the signal can only come earlier)."""
    if lead_s is None:
        return []
    need = step_s + save_s + 30
    how = "measured" if measured else "estimated"
    return [
        Finding(
            "ok" if lead_s >= need else "error",
            f"signal lead {lead_s:.0f} s vs one step ({step_s:.0f} s, estimated) + a save ({save_s:.0f} s, "
            f"{how}) + 30 s to exit",
            "" if lead_s >= need else f"raise the lead: --signal=B:USR1@{int(need * 1.5)} (or --signal-lead)",
        )
    ]


def logged_save_seconds(run_dir: Path) -> float | None:
    """The longest checkpoint save the run has logged so far (slurm/restart-*.log), if any."""
    times = []
    for log in (run_dir / "slurm").glob("restart-*.log"):
        times += [float(x) for x in re.findall(r"saved to \S+ \([\d.]+ MiB\) in ([\d.]+)s", log.read_text())]
    return max(times) if times else None


def run_checks(
    cfg: Config, hf_config, gpus: int, lead_s: float | None = None, with_data: bool = True, nodes: int = 1
) -> list[Finding]:
    """Every check (`gpus` in all, on `nodes` machines); `with_data` False at the start of a run (`--doctor`),
    which prepares the data next anyway."""
    from shardtune.observability.memory import host_total_bytes
    from shardtune.planning.auto import device_memory, resolve_auto
    from shardtune.planning.estimate import estimate

    # checkpointing and sharding 'auto' decided as the run will decide them on this machine's device
    gpu_mem = device_memory(cfg.parallel, _run_device(cfg.parallel))
    host_mem = host_total_bytes() if gpu_mem is not None else None
    cfg, _ = resolve_auto(cfg, hf_config, max(gpus, 1), gpu_mem, nodes, host_mem)
    est = estimate(cfg, hf_config, max(gpus, 1), nodes)
    run_dir = Path(cfg.train.output_dir) / (cfg.train.run_name or "")
    measured = logged_save_seconds(run_dir) if cfg.train.run_name else None
    # without a measurement: the checkpoint written at 200 MB/s, plus 10 s of coordination
    save_s = measured if measured is not None else est.checkpoint_bytes / 200e6 + 10
    if lead_s is None and os.environ.get("SHARDTUNE_SIGNAL_LEAD"):
        lead_s = float(os.environ["SHARDTUNE_SIGNAL_LEAD"])
    return [
        *versions(),
        *backend(cfg.parallel),
        *device(cfg),
        *model(cfg, hf_config),
        *(data(cfg) if with_data else []),
        *disk(cfg.train, est.checkpoint_bytes),
        *signal_lead(lead_s, est.step_s, save_s, measured is not None),
    ]


def report(findings: list[Finding]) -> tuple[str, bool]:
    """The findings as text, and whether none is an error."""
    errors = sum(f.level == "error" for f in findings)
    warns = sum(f.level == "warn" for f in findings)
    tail = f"{errors} error(s), {warns} warning(s)" if errors or warns else "all checks passed"
    return "\n".join([*(str(f) for f in findings), tail]), errors == 0


def command(args, rest: list[str]) -> int:
    """`shardtune doctor`: every check, and with --smoke a short real run; with --numerics (launched as the run
    is) only the comparison of the sharded model with an unsharded copy (numerics.py)."""
    import torch

    if args.numerics:
        from shardtune.cli import numerics

        return numerics.command(args.recipe, rest, force_sharding=args.force_sharding)

    cfg, hf_config, note = recipe_config("doctor", args.recipe, rest)
    gpus = args.gpus or max(1, torch.cuda.device_count())
    text, ok = report(run_checks(cfg, hf_config, gpus, args.signal_lead))
    print((note + "\n" if note else "") + text, flush=True)
    if args.smoke:
        from shardtune.cli import smoke

        procs = args.gpus or torch.cuda.device_count() or 2  # no GPU: 2 CPU processes, as the demo
        text, smoke_ok = smoke.report(smoke.run_smoke(args.recipe, rest, procs))
        print(text)
        ok = ok and smoke_ok
    return 0 if ok else 1
