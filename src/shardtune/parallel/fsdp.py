"""FSDP: wrapping, mixed precision, activation checkpointing and offload, applied in one place.

The path is FSDP1 (`FullyShardedDataParallel`, `use_orig_params=True`), chosen because it is exact with
bitsandbytes 4-bit weights on CPU and on GPU:

- FSDP2 (`fully_shard`) was bit-exact on CPU but corrupted the dequantized 4-bit weights on GPU (bnb's
  `Params4bit` does not define how to all-gather itself); the loss curve did not show it.
- FSDP1 casting buffers to bf16 (what accelerate builds for `mixed_precision: bf16`) rounds RoPE's
  frequencies; buffers are left alone here, and the sharded model's logits equal the unsharded model's.

Units: one per decoder layer (its frozen 4-bit weights and norms: one dtype, one FlatParameter) and the
root. The LoRA adapters are left out of FSDP (`ignored_states`) and kept whole, in float32, on every rank,
their gradients summed across ranks in one bucketed all-reduce per step (`reduce_adapter_grads`): FSDP for
the frozen base, data parallel for the adapters. They are small (0.3% of the parameters at r=16) and one
unit each would cost FSDP's per-unit hooks and collectives for every one of them (448 units for 8B, 1,120
for 70B: measured 5x slower steps on 2 GPUs); in the layer's own FlatParameter they would need the base's
dtype and a gradient buffer the size of the whole layer.

An 8-bit base (quant.bits=8, LLM.int8) is not sharded: FSDP1 cannot flatten int8 weights (INT8_NOT_SHARDED).
With several processes (parallel.sharding_strategy=NO_SHARD, which the run sets) every rank holds the whole
model, not wrapped, and the adapters' gradients are summed as above: data parallel, the same arithmetic.

One process has nothing to shard and trains the plain module: FSDP1 would switch itself to NO_SHARD,
whose state-dict path loses the frozen 4-bit weights (they stay plain tensors after a forward). The loss
math is the same; FsdpBackend hides the difference from the loop.
"""

from __future__ import annotations

import contextlib
import datetime
import logging

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.fsdp import (
    BackwardPrefetch,
    CPUOffload,
    MixedPrecision,
    ShardingStrategy,
)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from shardtune.config import ParallelConfig
from shardtune.model.modeling import DTYPES
from shardtune.parallel.adapters import adapters, fqn, offload_on, step_whole_adapters, whole_adapters_state
from shardtune.parallel.checkpointing import apply_checkpointing
from shardtune.parallel.distributed import DistInfo

log = logging.getLogger(__name__)


class FsdpBackend:
    """Wraps decoder layers in FSDP one at a time as they are built, then the root (embeddings, final norm,
    head), then applies activation checkpointing; one process trains the plain module. Backward and step are
    torch's, with the adapters' gradients summed over the ranks first (reduce_adapter_grads) and, under fp16,
    a loss scaler that agrees on overflow across ranks."""

    def __init__(
        self, pcfg: ParallelConfig, param_dtype: str, info: DistInfo, max_grad_norm: float | None = None
    ):
        if pcfg.sharding_strategy == "auto":
            raise ValueError("parallel.sharding_strategy='auto' is unresolved (planning.auto.resolve_auto)")
        self.pcfg, self.device, self.world_size = pcfg, info.device, info.world_size
        self.enabled = info.world_size > 1
        self.max_grad_norm = max_grad_norm
        self.name = f"FSDP {pcfg.sharding_strategy}"
        self.layer_cls: type | None = None
        self.replicated = (
            False  # int8 layers: the base whole on every rank, no FSDP unit (has_integer_weights)
        )
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.grad_scaler = None
        self.offloader = None  # set with the checkpointing (shard_root)
        if pcfg.mixed_precision == "fp16":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.grad_scaler = ShardedGradScaler(device=info.device.type)  # agrees on overflow across ranks
        groups = None
        if pcfg.sharding_strategy == "HYBRID_SHARD" and self.enabled:
            groups = hybrid_groups(info.world_size, info.local_world_size, pcfg.timeout_minutes)
        self.kwargs = dict(
            sharding_strategy=ShardingStrategy[pcfg.sharding_strategy],
            mixed_precision=MixedPrecision(
                param_dtype=DTYPES[param_dtype],
                reduce_dtype=torch.float32,
                # NOTE: None leaves buffers as they are; rotary inv_freq must stay fp32 (see module docstring)
                buffer_dtype=None,
                cast_forward_inputs=True,
            ),
            cpu_offload=CPUOffload(offload_params=offload_on(pcfg, info.device)),
            backward_prefetch=None
            if pcfg.backward_prefetch == "NO_PREFETCH"
            else BackwardPrefetch[pcfg.backward_prefetch],
            forward_prefetch=pcfg.forward_prefetch,
            limit_all_gathers=pcfg.limit_all_gathers,
            use_orig_params=True,  # bitsandbytes finds its 4-bit weights (and their quant_state) by name
            device_id=info.device,
            sync_module_states=False,  # every rank built the same weights (same bytes, same seed)
            process_group=groups,  # None: the default group
        )

    # ---------------------------------------------------------------------------------------- building
    def shard_layer(self, layer: torch.nn.Module) -> torch.nn.Module:
        """One decoder layer, complete on this rank: its FSDP unit, adapters left whole (an 8-bit layer: whole,
        not wrapped; see int8_not_sharded)."""
        self.layer_cls = type(layer)
        if self.enabled and not self.replicated and has_integer_weights(layer):
            if self.pcfg.sharding_strategy != "NO_SHARD":
                raise ValueError(
                    INT8_NOT_SHARDED + "; with parallel.sharding_strategy=NO_SHARD they are kept whole"
                )
            self.replicated = True
            self.name = "data parallel (FSDP NO_SHARD: the 8-bit base whole on every process)"
        if not self.enabled or self.replicated:
            return layer
        return FSDP(layer, ignored_states=adapters(layer), **self.kwargs)

    def shard_root(self, model: torch.nn.Module) -> torch.nn.Module:
        """The rest of the model (its layers already wrapped) as the root unit, then checkpointing."""
        if self.enabled and not self.replicated:
            model = FSDP(model, ignored_states=adapters(model), **self.kwargs)
            if self.kwargs["cpu_offload"].offload_params:
                lean_offload(model)
        self.offloader = apply_checkpointing(model, self.pcfg, self.layer_cls, self.device)
        self.model = model
        return model

    def wrap(self, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        self.optimizer = optimizer
        return self.model

    # ---------------------------------------------------------------------------------------- training
    def backward(self, loss: torch.Tensor) -> None:
        (self.grad_scaler.scale(loss) if self.grad_scaler is not None else loss).backward()

    def step(self) -> torch.Tensor:
        reduce_adapter_grads(self.model, self.world_size)
        return step_whole_adapters(self.model, self.optimizer, self.max_grad_norm, self.grad_scaler)

    # -------------------------------------------------------------------------------------- checkpoints
    def trainable_state(self, fresh: bool = False) -> tuple[dict, dict]:
        """The adapters and their optimizer state by name (backend.whole_adapters_state). No FSDP state-dict
        machinery is involved: FSDP1's sharded state dict unshards every unit and copies each rank's slice of
        every frozen 4-bit weight before `ignore_frozen_params` drops them (measured: +5 GiB per GPU for a
        moment at every save of the 80-layer 70B, enough to fail a save on 24 GB GPUs)."""
        return whole_adapters_state(self.model, self.optimizer, fresh)

    def load_trainable_state(self, msd: dict, osd: dict) -> None:
        """DCP loaded into the training tensors themselves: nothing to write back."""

    def adapter_grads(self) -> dict[str, torch.Tensor]:
        reduce_adapter_grads(self.model, self.world_size)
        scale = self.grad_scaler.get_scale() if self.grad_scaler is not None else 1.0
        return {fqn(n): p.grad / scale for n, p in self.model.named_parameters() if p.requires_grad}

    # ----------------------------------------------------------------------------------------- the rest
    def local_trainable(self) -> list[torch.Tensor]:
        """The adapters as the optimizer steps them: between forwards, with use_orig_params, views of this rank's
        shard of each unit's flat parameter (empty where the shard holds none of one), which its next forward
        all-gathers; under NO_SHARD and on one process, the whole adapters."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def unwrap(self) -> torch.nn.Module:
        return self.model.module if isinstance(self.model, FSDP) else self.model

    def gathered_root(self):
        """The root unit's weights (embeddings, head) whole, for calling `generate` on the inner module; the
        layers gather their own weights in their forward."""
        if isinstance(self.model, FSDP):
            return FSDP.summon_full_params(self.model, recurse=False, writeback=False)
        return contextlib.nullcontext()

    def sharding_report(self) -> dict[str, int]:
        """Elements of the flat parameters this rank holds vs. their unsharded total (tests and logs)."""
        if not isinstance(self.model, FSDP):
            n = sum(p.numel() for p in self.model.parameters())
            return {"local": n, "total": n}
        local = total = 0
        for unit in FSDP.fsdp_modules(self.model):
            handle = getattr(unit, "_handle", None)
            if handle is None:
                continue
            flat = handle.flat_param
            local += flat.numel()  # between forwards a flat parameter holds this rank's shard only
            total += int(flat._unpadded_unsharded_size.numel())
        return {"local": local, "total": total}


# NOTE: tried on 2 CPU processes (FULL_SHARD and NO_SHARD alike): FSDP1 refuses LLM.int8's Int8Params with
# "ValueError: Cannot flatten integer dtype tensors"; and bitsandbytes' Linear8bitLt reads its int8 rows and their
# scales (SCB) from its own state, not from the parameter FSDP would gather.
INT8_NOT_SHARDED = (
    "FSDP cannot shard an 8-bit base (quant.bits=8): FSDP1 flattens a unit's parameters into one floating-point "
    "tensor, and LLM.int8's weights are int8 rows whose scales bitsandbytes keeps on the module"
)


def has_integer_weights(module: torch.nn.Module) -> bool:
    """Whether `module` holds integer parameters (LLM.int8's Int8Params), which FSDP1 cannot flatten."""
    return any(not p.dtype.is_floating_point for p in module.parameters())


def hybrid_groups(world_size: int, per_machine: int, timeout_minutes: float):
    """HYBRID_SHARD's process groups, (this machine's processes, this process's counterparts on the others): the
    base sharded over one machine's processes and replicated across machines, so all-gathers stay inside a
    machine (only the adapters' gradients cross). FSDP1 finds no groups of its own when it wraps layer by layer
    ("requires explicit specification of process group or device_mesh"); made here, with the run's collective
    timeout (a device mesh would give them torch's default)."""
    timeout = datetime.timedelta(minutes=timeout_minutes)
    machines = [list(range(m, m + per_machine)) for m in range(0, world_size, per_machine)]
    intra, _ = dist.new_subgroups_by_enumeration(machines, timeout=timeout)
    inter, _ = dist.new_subgroups_by_enumeration(
        [list(r) for r in zip(*machines, strict=True)], timeout=timeout
    )
    return intra, inter


def lean_offload(model: FSDP) -> None:
    """Host memory of FSDP1's CPU offload, from 3.4x the offloaded shards to 1.25-1.7x (measured on one H200,
    bench/results/2026-11-23-1xh200-fusedlora; the rest is the pinned allocator rounding up to powers of two).

    At its lazy initialization (the first forward) FSDP1 pins a copy of every unit's shard while the
    unpinned one stays referenced by the parameters' views until the first reshard, and pins a gradient
    buffer of the shard's size for every unit, also for the frozen 4-bit layers that never get a gradient
    (measured: 63.6 GiB per process for the 80-layer 70B on 2 GPUs, whose shards are 19.6 GiB). Here, per
    unit, just before that initialization: the shard is pinned in place (FSDP's own `pin_memory()` of it
    then returns it as is) and the parameters' views moved onto it; after it, a frozen unit's gradient buffer
    is replaced by a zero-stride tensor of the same size (FSDP checks its size; nothing writes into it, as
    no gradient reaches a frozen unit), and the host allocator's cache of the freed buffer is emptied.
    Private FSDP1 internals: a torch without them keeps FSDP's own behaviour (logged)."""
    handles = [u._handle for u in FSDP.fsdp_modules(model) if getattr(u, "_handle", None) is not None]
    needed = ("init_flat_param_attributes", "_use_sharded_views", "_offload_params")
    if not handles or not all(hasattr(h, n) for h in handles for n in needed):
        log.warning(
            "parallel.cpu_offload: this torch's FSDP differs; host memory is FSDP's own (~3.4x the shards)"
        )
        return
    for handle in handles:
        if not handle._offload_params:
            continue
        init = handle.init_flat_param_attributes

        def lean_init(handle=handle, init=init):
            flat = handle.flat_param
            flat.data = flat.data.pin_memory()
            handle._use_sharded_views()  # the parameters now view the pinned shard; the unpinned one is freed
            init()
            if not flat.requires_grad:
                flat._cpu_grad = torch.zeros((), dtype=flat._cpu_grad.dtype).expand(flat._cpu_grad.shape)
                empty_host_cache = getattr(torch._C, "_host_emptyCache", None)  # CUDA builds
                if empty_host_cache is not None:
                    empty_host_cache()

        handle.init_flat_param_attributes = lean_init


def reduce_adapter_grads(model: torch.nn.Module, world_size: int, bucket_mib: int = 256) -> None:
    """Sum the adapters' gradients over the ranks (each rank holds whole adapters; see the module docstring),
    a bucket of flattened gradients per all-reduce."""
    if world_size == 1:
        return
    grads = [p.grad for p in adapters(model) if p.grad is not None]
    limit, bucket, size = bucket_mib * 2**20, [], 0
    for i, g in enumerate(grads):
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= limit or i == len(grads) - 1:
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            for grad, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
                grad.copy_(synced)
            bucket, size = [], 0
