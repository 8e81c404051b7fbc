"""The model of a run: the settings left to `auto` decided on this machine (before the data's sampler, which
the micro-batch shapes), then the 4-bit base + LoRA built layer by layer and sharded by the backend as it
arrives (model/loading.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from shardtune.config import Config, apply_overrides
from shardtune.errors import ConfigError
from shardtune.model import loading, modeling
from shardtune.observability.memory import gpu_peak_gib, host_peak_gib, host_rss_gib, host_total_bytes
from shardtune.parallel.backend import DEEPSPEED_MISSING, Backend, backend_for, deepspeed_installed
from shardtune.parallel.distributed import DistInfo, all_reduce_max, barrier, gather_object, machine_count
from shardtune.parallel.fsdp import INT8_NOT_SHARDED
from shardtune.parallel.offload import ActivationOffloader
from shardtune.planning.auto import describe_auto, describe_checkpointing, device_memory, resolve_auto

log = logging.getLogger("shardtune")


def resolve_settings(cfg: Config, hf_config, dist: DistInfo) -> Config:
    """The settings left to the run, decided here: model.fused_kernels=auto (where Liger can run),
    parallel.activation_checkpointing / parallel.sharding_strategy=auto (the least recomputation, then the least
    sharding, that `shardtune plan` says fits this GPU; none and FULL_SHARD on the CPU, where memory is the
    host's) and train.micro_batch_size=auto (the micro-batch whose choice plans the fastest step that fits; the
    largest on the CPU)."""
    fused = modeling.fused_kernels(
        cfg, hf_config, dist.device.type
    )  # `true` where it cannot run: refused here
    cfg = apply_overrides(cfg, {"model.fused_kernels": fused}, "model.fused_kernels")
    cfg = _int8_whole(cfg, dist)
    # NOTE: every rank decides alone, so each decides from the same facts: the least GPU memory of any process,
    # the machines counted from every machine's process count (ranks that chose different sharding would wait
    # in each other's collectives until the timeout)
    facts = gather_object((dist.local_world_size, device_memory(cfg.parallel, dist.device)))
    per_machine = sorted({n for n, _ in facts})
    memories = [m for _, m in facts if m is not None]
    gpu_mem = min(memories) if memories else None
    if len(per_machine) > 1 and cfg.parallel.sharding_strategy == "HYBRID_SHARD":
        raise ConfigError(
            f"parallel.sharding_strategy=HYBRID_SHARD needs the same number of processes on every machine; this "
            f"run's machines have {per_machine} (LOCAL_WORLD_SIZE). Start as many on each, or use FULL_SHARD."
        )
    nodes = machine_count(dist.world_size, per_machine)
    host_mem = host_total_bytes() if gpu_mem is not None else None  # offloading's pinned memory
    resolved, est = resolve_auto(cfg, hf_config, dist.world_size, gpu_mem, nodes, host_mem)
    if dist.is_main and resolved is not cfg:
        log.info(
            "auto: %s%s",
            describe_auto(cfg, resolved),
            f", planned peak {est.gpu_peak / 2**30:.1f} of {gpu_mem / 2**30:.0f} GiB" if est else " (CPU)",
        )
    return resolved


def _int8_whole(cfg: Config, dist: DistInfo) -> Config:
    """quant.bits=8 on several FSDP processes: every process holds the whole 8-bit base (NO_SHARD; FSDP cannot
    shard int8 weights), said once in the log."""
    if cfg.quant.bits != 8 or cfg.parallel.backend != "fsdp" or dist.world_size == 1:
        return cfg
    if dist.is_main and cfg.parallel.sharding_strategy not in ("NO_SHARD", "auto"):
        log.warning(
            "%s: parallel.sharding_strategy=%s -> NO_SHARD, each of the %d processes holds the whole 8-bit base "
            "(data parallel; `shardtune plan` counts it). To shard the base, use quant.bits=4.",
            INT8_NOT_SHARDED,
            cfg.parallel.sharding_strategy,
            dist.world_size,
        )
    return apply_overrides(cfg, {"parallel.sharding_strategy": "NO_SHARD"}, "quant.bits=8")


def run_backend(cfg: Config, dist: DistInfo) -> Backend:
    """The backend parallel.backend names, refused with the fix where it cannot run here."""
    if cfg.parallel.backend == "deepspeed" and not deepspeed_installed():
        raise ConfigError(DEEPSPEED_MISSING)
    return backend_for(
        cfg.parallel, cfg.param_dtype, dist, cfg.train.micro_batch_size, cfg.train.max_grad_norm
    )


@dataclass
class Built:
    module: torch.nn.Module
    hf_config: object
    base: str | None  # checkpoint the 4-bit base came from; None when drawn at random on the devices
    report: loading.BuildReport
    rank0_holds: float  # the share of the base on rank 0
    host_load_gib: float
    attention: str
    offloader: ActivationOffloader | None  # parallel.activation_checkpointing=offload


def build(cfg: Config, hf_config, dist: DistInfo, run_dir: Path, tokenizer, backend: Backend) -> Built:
    """The base streamed in layer by layer and sharded as it arrives. A small random base is first written as
    a checkpoint, so that the adapter can be reloaded onto it; a large one is drawn on the devices."""
    base = cfg.model.name_or_path
    if cfg.model.init == "random":
        base = None
        if modeling.base_on_disk(cfg.model, hf_config):
            base_dir = run_dir / "base"
            if dist.is_main and not base_dir.is_dir():
                modeling.write_random_base(cfg, tokenizer, base_dir)
            barrier()
            base = str(base_dir.resolve())
    attn = modeling.attention_implementation(cfg.model.attn_implementation, dist.device)
    host_before = host_rss_gib()
    module, report = loading.build_model(cfg, hf_config, base, attn, backend, dist.device)
    host_load, gpu_load = all_reduce_max(
        [host_peak_gib() - host_before, gpu_peak_gib(dist.device) or 0.0], dist.device
    )
    share = backend.sharding_report()
    if dist.is_main:
        _log_model(cfg, dist, backend, report, attn, base, host_load, gpu_load)
    return Built(
        module, hf_config, base, report, share["local"] / share["total"], host_load, attn, backend.offloader
    )


def _log_model(
    cfg: Config, dist: DistInfo, backend: Backend, report, attn, base, host_load, gpu_load
) -> None:
    from shardtune.kernels import nf4  # bitsandbytes: imported by the loader already

    log.info(
        "model: %s (%s), %s params, %s trainable (LoRA r=%d on %s), %s, attention %s%s, %s on %d %s(s)",
        cfg.model.name_or_path,
        cfg.model.init,
        f"{report.total:,}",
        f"{report.trainable:,}",
        cfg.lora.r,
        cfg.lora.target_modules,
        f"{cfg.quant.quant_type.upper()} 4-bit storage {cfg.storage_dtype}, {nf4.describe(cfg.quant, dist.device)}"
        if cfg.quant.bits == 4
        else modeling.describe_quant(cfg),
        attn,
        ", Liger fused kernels" if cfg.model.fused_kernels is True else "",
        f"{backend.name} compute {cfg.param_dtype}",
        dist.world_size,
        dist.device.type.upper() if dist.device.type == "cuda" else "CPU process",
    )
    if backend.offloader is not None:
        log.info(
            "activation offloading: %d of %d decoder layers (%s) send what they keep for backward to %s; the "
            "topmost chosen layer keeps its own (of them, the first backward needs)%s",
            backend.offloader.sent_layers,
            backend.offloader.total_layers,
            describe_checkpointing(cfg.parallel),
            "pinned host memory on a side stream"
            if dist.device.type == "cuda"
            else "a copy (on a CPU: the mechanism only, no memory saved)",
            ""
            if backend.offloader.sent_layers
            else ": nothing is offloaded, choose more layers (a smaller parallel.checkpoint_every, more o)",
        )
    log.info(
        "load: %.1fs from %s (%.1f GiB on disk); host RAM peak +%.2f GiB over start per process, "
        "GPU peak %.2f GiB per process",
        report.load_s,
        base or "random weights",
        report.source_bytes / 2**30,
        host_load,
        gpu_load,
    )
