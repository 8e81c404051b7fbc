"""The settings a run leaves to `auto`, decided from the plan: activation checkpointing and where the frozen base
lives (parallel.activation_checkpointing, parallel.sharding_strategy), the fastest choice whose planned peak
fits the GPU's memory, and with train.micro_batch_size=auto the micro-batch whose choice plans the fastest
step; and `shardtune plan --fit`: every combination that fits, fastest first."""

from __future__ import annotations

import itertools
import math

import torch

from shardtune.config import Config, ParallelConfig, TrainConfig, apply_overrides
from shardtune.errors import ConfigError
from shardtune.planning.estimate import GIB, Estimate, estimate

# Activation choices: keep everything, offload every k-th layer's activations to host memory, recompute every
# k-th layer, or a mix by layer (a pattern repeated over the layers: k keep, o offload, r recompute; the
# offloaded layers spread out, so that each one's copies hide behind the layers up to the next). ('selective' is
# 'none' on a GPU: the dropout kernel already keeps no dropout masks.) Which is fastest depends on the widths
# and the host link (offloading costs nothing where its copies hide behind the compute, recomputing a share s
# of the layers costs 4/(4 + 2s)): the plan decides. Mixes offload what the link can hide and recompute (or
# keep) the rest, where offloading alone would wait for the link and recomputing alone would redo more.
# mixes repeat over at most this many layers (longer ones planned no faster for 70B on an H100)
MIX_PERIOD = 5


def mixed_patterns(period: int = MIX_PERIOD) -> list[str]:
    """Every mix of offloaded (o), recomputed (r) and kept (k) layers with at least one o and one r, repeating
    over at most `period` layers, each proportion once (orr, not also orrorr); the o spread as evenly as the
    period allows (oor: two of three cannot be apart), the others after them, recomputed first. Fewest layers
    offloaded first."""
    out = []
    for p in range(2, period + 1):
        for o, r in itertools.product(range(1, p), range(1, p)):
            k = p - o - r
            if k < 0 or math.gcd(o, r, k) != 1:
                continue
            rest = iter("r" * r + "k" * k)
            starts = {i * p // o for i in range(o)}
            out.append("".join("o" if i in starts else next(rest) for i in range(p)))
    return sorted(out, key=lambda m: (m.count("o") / len(m), m.count("r") / len(m)))


CHECKPOINT_CHOICES = (
    (False, 1),
    *(("offload", every) for every in (4, 3, 2, 1)),
    *((mix, 1) for mix in mixed_patterns()),
    *((True, every) for every in (4, 3, 2, 1)),
)
AUTO_MARGIN = 0.85  # of the GPU's memory: fragmentation, and the plan's worst underestimate measured (-11%)
HOST_MARGIN = 0.8  # of the host's memory: the rest of the machine, the page cache
MICRO_BATCHES = (1, 2, 4, 8, 16, 32)  # rows per micro-batch that auto and --fit try


def auto_choices(p: ParallelConfig, gpus: int, nodes: int = 1) -> list[dict]:
    """Every combination of the settings `p` leaves to 'auto', as overrides: auto_tiers, flattened."""
    return [choice for tier in auto_tiers(p, gpus, nodes) for choice in tier]


def auto_tiers(p: ParallelConfig, gpus: int, nodes: int = 1) -> list[list[dict]]:
    """The settings `p` leaves to 'auto' (parallel.activation_checkpointing, parallel.sharding_strategy), each
    combination as overrides, in tiers tried one after the other (choose_settings takes the fastest that fits
    in the first tier where one does). Within a tier: what to do with the activations (CHECKPOINT_CHOICES) by
    where the base lives, least sharding first: whole on every GPU (NO_SHARD: 0.3% for its wrapping on one
    H200), then sharded (FULL_SHARD: ~2% across 2 H200s). On several machines the base is sharded within each
    (HYBRID_SHARD) before it is sharded across them (FULL_SHARD: every layer's all-gather would cross the
    network, which the plan does not model: a tier of its own). It is sharded wherever keeping it whole cannot
    help: one process, CPU offload (a whole copy per process in host memory), DeepSpeed (which partitions it
    itself)."""
    checkpointing = [{}]
    if p.activation_checkpointing == "auto":
        checkpointing = [
            {"parallel.activation_checkpointing": ac, "parallel.checkpoint_every": every}
            for ac, every in CHECKPOINT_CHOICES
        ]
    if p.sharding_strategy != "auto":
        tiers = [[None]]
    elif p.cpu_offload:
        tiers = [["FULL_SHARD"]]
    else:
        tiers = sharding_tiers(gpus, nodes, p.backend)
    return [
        [{**c, **({"parallel.sharding_strategy": s} if s else {})} for c in checkpointing for s in tier]
        for tier in tiers
    ]


def sharding_tiers(gpus: int, nodes: int, backend: str) -> list[list[str]]:
    """Where the frozen base can live, least sharding first: whole on every GPU, then sharded within a machine
    (several machines), then over all GPUs; grouped in tiers that auto_choices tries one after the other at every
    recomputation (FULL_SHARD across machines only when nothing fits a machine). One process has nothing to
    shard, and DeepSpeed partitions the base whatever FSDP's strategy says."""
    if gpus == 1 or backend != "fsdp":
        return [["FULL_SHARD"]]
    if nodes > 1:
        return [["NO_SHARD", "HYBRID_SHARD"], ["FULL_SHARD"]]
    return [["NO_SHARD", "FULL_SHARD"]]


def choose_auto(
    cfg: Config,
    hf_config,
    gpus: int,
    gpu_mem: float | None,
    nodes: int = 1,
    host_mem: float | None = None,
) -> tuple[dict, Estimate | None]:
    """What `cfg` leaves to 'auto', decided. With train.micro_batch_size=auto: each micro-batch's choice
    (choose_settings), the fastest planned step among those that fit (the larger micro-batch at equal speed), or
    the smallest micro-batch's when none does; on a CPU (no GPU limit) the largest micro-batch."""
    if cfg.train.micro_batch_size != "auto":
        return choose_settings(cfg, hf_config, gpus, gpu_mem, nodes, host_mem)
    sizes = micro_batch_choices(cfg.train, gpus)
    if gpu_mem is None:
        choice, _ = choose_settings(cfg, hf_config, gpus, None, nodes)
        return {"train.micro_batch_size": sizes[0], **choice}, None
    planned = []
    for size in sizes:
        sized = apply_overrides(cfg, {"train.micro_batch_size": size}, "auto")
        choice, est = choose_settings(sized, hf_config, gpus, gpu_mem, nodes, host_mem)
        planned.append(({"train.micro_batch_size": size, **choice}, est))
    # the first of equals: the larger micro-batch; none fits: the smallest micro-batch, everything recomputed
    # (the plan may be pessimistic)
    return _fastest(planned, gpu_mem, host_mem) or planned[-1]


def choose_settings(
    cfg: Config,
    hf_config,
    gpus: int,
    gpu_mem: float | None,
    nodes: int = 1,
    host_mem: float | None = None,
) -> tuple[dict, Estimate | None]:
    """Checkpointing and sharding left to 'auto', decided: in the first of auto_tiers where any choice's
    planned peak fits `gpu_mem` (and its host memory `host_mem` per node, where given), the fastest planned
    step (the first of equals); the last choice (everything recomputed, the base sharded) when none fits (the
    plan may be pessimistic); and the estimate of that choice. Without a GPU limit (a CPU run): nothing
    recomputed or offloaded and the base sharded, as on GPUs (the processes share the host's memory, which
    sharding spares)."""
    tiers = auto_tiers(cfg.parallel, gpus, nodes)
    if gpu_mem is None:
        cpu = {"parallel.activation_checkpointing": False, "parallel.sharding_strategy": "FULL_SHARD"}
        choices = [c for tier in tiers for c in tier]
        choice = next(c for c in choices if all(c.get(k, v) == v for k, v in cpu.items()))
        return choice, None
    planned = []
    for tier in tiers:
        planned = [(c, estimate(apply_overrides(cfg, c, "auto"), hf_config, gpus, nodes)) for c in tier]
        if best := _fastest(planned, gpu_mem, host_mem):
            return best
    return planned[-1]


def _fastest(planned: list[tuple[dict, Estimate]], gpu_mem: float, host_mem: float | None):
    """The (choice, estimate) with the fastest planned step among those whose peaks fit AUTO_MARGIN of the GPU
    and HOST_MARGIN of the host (where known), the first of equals; None when none fits."""
    fitting = [
        (choice, est)
        for choice, est in planned
        if est.gpu_peak <= AUTO_MARGIN * gpu_mem
        and (host_mem is None or est.host["train"] <= HOST_MARGIN * host_mem)
    ]
    return min(fitting, key=lambda p: p[1].step_s) if fitting else None


def micro_batch_choices(t: TrainConfig, gpus: int) -> list[int]:
    """The micro-batches train.micro_batch_size=auto chooses from, largest first: 32, 16, ... 1 rows that divide
    the rows each process handles per step (refused, with the fix, where the global batch does not divide)."""
    problem = batch_problem(t, gpus, micro_batch=False)
    if problem:
        raise ConfigError(problem)
    rows = t.global_batch_size // gpus
    return [m for m in MICRO_BATCHES[::-1] if rows % m == 0]


def device_memory(p: ParallelConfig, device: torch.device) -> float | None:
    """Bytes of GPU memory a run on `device` may use (its total, or parallel.gpu_memory_limit_gib if lower);
    None on a CPU."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    limit = p.gpu_memory_limit_gib
    return min(total, limit * GIB) if limit else total


def resolve_auto(
    cfg: Config,
    hf_config,
    gpus: int,
    gpu_mem: float | None,
    nodes: int = 1,
    host_mem: float | None = None,
) -> tuple[Config, Estimate | None]:
    """`cfg` with parallel.activation_checkpointing, parallel.sharding_strategy and train.micro_batch_size 'auto'
    replaced by choose_auto's choice (as it is when none is auto), and the estimate of that choice (None when
    nothing was chosen or there is no GPU limit). `gpus` in all, on `nodes` machines with `host_mem` bytes
    each (None: host memory not checked)."""
    if not auto_choices(cfg.parallel, gpus, nodes)[0] and cfg.train.micro_batch_size != "auto":
        return cfg, None
    choice, est = choose_auto(cfg, hf_config, gpus, gpu_mem, nodes, host_mem)
    return apply_overrides(cfg, choice, "auto"), est


def describe_auto(before: Config, after: Config) -> str:
    """What 'auto' decided (`before` unresolved, `after` resolved), in words."""
    parts = []
    if before.train.micro_batch_size == "auto":
        parts.append(f"micro-batch {after.train.micro_batch_size} rows")
    if before.parallel.activation_checkpointing == "auto":
        parts.append(f"activation checkpointing {describe_checkpointing(after.parallel)}")
    if before.parallel.sharding_strategy == "auto":
        strategy = after.parallel.sharding_strategy
        where = {"NO_SHARD": " (the whole 4-bit base on every GPU)", "HYBRID_SHARD": " (within each machine)"}
        parts.append(f"sharding {strategy}{where.get(strategy, '')}")
    return ", ".join(parts)


def describe_checkpointing(p: ParallelConfig) -> str:
    """The checkpointing a (resolved) configuration runs, in words."""
    mode, every = p.activation_checkpointing, p.checkpoint_every
    suffix = {2: "nd", 3: "rd"}.get(every, "th")
    which = "every layer" if every == 1 else f"every {every}{suffix} layer"
    if mode == "offload":
        return f"offloaded to host memory, {which}"
    if mode is True:
        return which
    if mode in (False, "selective"):
        return "none (every layer keeps its activations)"
    if mode == "auto":
        raise ValueError("parallel.activation_checkpointing='auto' is unresolved (resolve_auto)")
    whats = (("o", "offloaded to host memory"), ("r", "recomputed"), ("k", "kept"))
    if len(mode) == 1:
        return f"by layer, pattern {mode}: every layer {dict(whats)[mode]}"
    counts = ", ".join(f"{mode.count(c)} {what}" for c, what in whats if c in mode)
    return f"by layer, pattern {mode}: of every {len(mode)} layers {counts}"


def batch_problem(t: TrainConfig, gpus: int, micro_batch: bool = True) -> str | None:
    """Why the run would refuse this global batch on `gpus` processes (None when it would not): every process
    gets the same rows per step, cut into micro-batches of the same size (data/loader.py, GlobalBatchSampler).
    `micro_batch` False leaves train.micro_batch_size out (--fit chooses it)."""
    g = t.global_batch_size
    if g % gpus:
        lower, higher = (g // gpus) * gpus, (g // gpus + 1) * gpus
        multiples = f"{lower} or {higher}" if lower else f"{higher}"
        return (
            f"train.global_batch_size={g} is not a multiple of the {gpus} GPUs: the run gives every process the "
            f"same number of rows per step and would refuse it. Set train.global_batch_size={multiples}, or plan "
            f"for a number of GPUs that divides {g}"
        )
    m = t.micro_batch_size
    if micro_batch and m != "auto" and t.micro_batch_tokens is None and g % (m * gpus):
        return (
            f"train.global_batch_size={g} is not a multiple of train.micro_batch_size={m} x {gpus} GPUs: the run "
            f"would refuse it. Set train.micro_batch_size to a divisor of {g // gpus} (the rows per GPU per step), "
            f"or let --fit choose one"
        )
    return None


def fit(cfg: Config, hf_config, gpus: int, gpu_mem: float, nodes: int, gpu_name: str) -> list[Estimate]:
    """Every micro-batch x checkpointing x placement of the base (whole on every GPU, sharded, sharded and
    offloaded) combination that fits `gpu_mem` bytes (with 5% kept for the allocator), fastest first.
    Micro-batches are rows that divide the rows each GPU handles per step, or for packed rows token budgets of
    1 to 32 rows of data.max_len (train.micro_batch_tokens: as full, and as predictable in memory, as the data
    allows; not under DeepSpeed, which refuses them). Only settings the run accepts are tried (batch_problem)."""
    # (refused where no micro-batch can help: the global batch itself does not divide)
    sizes = [{"train.micro_batch_size": m} for m in micro_batch_choices(cfg.train, gpus)]
    per_gpu_rows = cfg.train.global_batch_size // gpus
    if cfg.data.packing and cfg.parallel.backend == "fsdp":
        rows = [m for m in MICRO_BATCHES if m <= per_gpu_rows]
        sizes = [{"train.micro_batch_tokens": m * cfg.data.max_len} for m in rows]
    # where the frozen base lives (sharding_tiers), or sharded and offloaded (a whole copy per process offloaded
    # would only cost host memory); at equal planned speed (the network is not modelled) the first of these wins
    sharding = [s for tier in sharding_tiers(gpus, nodes, cfg.parallel.backend) for s in tier]
    placements = [(False, s) for s in sharding] + ([(True, "FULL_SHARD")] if gpus > 1 else [])
    out = []
    for size in sizes:
        for ac, every in CHECKPOINT_CHOICES:
            for offload, strategy in placements:
                choice = {
                    "parallel.activation_checkpointing": ac,
                    "parallel.checkpoint_every": every,
                    "parallel.cpu_offload": offload,
                    "parallel.sharding_strategy": strategy,
                }
                est = estimate(
                    apply_overrides(cfg, {**size, **choice}, "plan --fit"), hf_config, gpus, nodes, gpu_name
                )
                if est.gpu_peak <= 0.95 * gpu_mem:
                    out.append(est)

    def tokens(
        e: Estimate,
    ) -> int:  # at equal speed the bigger micro-batch (it keeps the GPU busier, not modelled)
        return (
            e.settings.get("train.micro_batch_tokens")
            or e.settings["train.micro_batch_size"] * cfg.data.max_len
        )

    return sorted(out, key=lambda e: (e.step_s, -tokens(e)))
