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

One process has nothing to shard and trains the plain module: FSDP1 would switch itself to NO_SHARD,
whose state-dict path loses the frozen 4-bit weights (they stay plain tensors after a forward). The loss
math is the same; the helpers below (clip, gather for generation) hide the difference from the loop.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.fsdp import (
    BackwardPrefetch,
    CPUOffload,
    MixedPrecision,
    ShardingStrategy,
)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from shardtune.config import ParallelConfig
from shardtune.modeling import DTYPES

log = logging.getLogger(__name__)


def _adapters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


class Sharder:
    """Wraps decoder layers in FSDP one at a time as they are built, then the root (embeddings, final norm,
    head), then applies activation checkpointing. One process gets the plain module back."""

    def __init__(
        self,
        pcfg: ParallelConfig,
        param_dtype: str,
        device: torch.device,
        world_size: int,
        local_world_size: int | None = None,
    ):
        self.pcfg, self.device, self.enabled = pcfg, device, world_size > 1
        if pcfg.sharding_strategy == "auto":
            raise ValueError("parallel.sharding_strategy='auto' is unresolved (plan.resolve_auto)")
        self.layer_cls: type | None = None
        offload = offload_on(pcfg, device)
        groups = None
        if pcfg.sharding_strategy == "HYBRID_SHARD" and self.enabled:
            per_machine = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
            groups = hybrid_groups(world_size, per_machine, pcfg.timeout_minutes)
        self.kwargs = dict(
            sharding_strategy=ShardingStrategy[pcfg.sharding_strategy],
            mixed_precision=MixedPrecision(
                param_dtype=DTYPES[param_dtype],
                reduce_dtype=torch.float32,
                # NOTE: None leaves buffers as they are; rotary inv_freq must stay fp32 (see module docstring)
                buffer_dtype=None,
                cast_forward_inputs=True,
            ),
            cpu_offload=CPUOffload(offload_params=offload),
            backward_prefetch=None
            if pcfg.backward_prefetch == "NO_PREFETCH"
            else BackwardPrefetch[pcfg.backward_prefetch],
            forward_prefetch=pcfg.forward_prefetch,
            limit_all_gathers=pcfg.limit_all_gathers,
            use_orig_params=True,  # bitsandbytes finds its 4-bit weights (and their quant_state) by name
            device_id=device,
            sync_module_states=False,  # every rank built the same weights (same bytes, same seed)
            process_group=groups,  # None: the default group
        )

    def layer(self, layer: torch.nn.Module) -> torch.nn.Module:
        """One decoder layer, complete on this rank: its FSDP unit, adapters left whole."""
        self.layer_cls = type(layer)
        if not self.enabled:
            return layer
        return FSDP(layer, ignored_states=_adapters(layer), **self.kwargs)

    def root(self, model: torch.nn.Module) -> torch.nn.Module:
        """The rest of the model (its layers already wrapped) as the root unit, then checkpointing."""
        if self.enabled:
            model = FSDP(model, ignored_states=_adapters(model), **self.kwargs)
            if self.kwargs["cpu_offload"].offload_params:
                lean_offload(model)
        apply_checkpointing(model, self.pcfg, self.layer_cls)
        return model


def hybrid_groups(world_size: int, per_machine: int, timeout_minutes: float):
    """HYBRID_SHARD's process groups, (this machine's processes, this process's counterparts on the others): the
    base sharded over one machine's processes and replicated across machines, so all-gathers stay inside a
    machine (only the adapters' gradients cross). FSDP1 finds no groups of its own when it wraps layer by layer
    ("requires explicit specification of process group or device_mesh"); made here, with the run's collective
    timeout (a device mesh would give them torch's default)."""
    if world_size % per_machine:
        raise ValueError(
            f"parallel.sharding_strategy=HYBRID_SHARD needs the same number of processes on every machine "
            f"({world_size} processes, {per_machine} on this one)"
        )
    timeout = datetime.timedelta(minutes=timeout_minutes)
    machines = [list(range(m, m + per_machine)) for m in range(0, world_size, per_machine)]
    intra, _ = dist.new_subgroups_by_enumeration(machines, timeout=timeout)
    inter, _ = dist.new_subgroups_by_enumeration(
        [list(r) for r in zip(*machines, strict=True)], timeout=timeout
    )
    return intra, inter


def apply_checkpointing(model: torch.nn.Module, pcfg: ParallelConfig, layer_cls: type | None) -> None:
    """Recompute every k-th decoder layer in backward (parallel.checkpoint_every), through torch's wrapper, not
    Hugging Face's gradient_checkpointing (which under FSDP would all-gather each layer again); the selective
    part (the LoRA dropout masks drawn again) in the layers that keep their activations."""
    every = checkpointed_every(pcfg)
    if layer_cls is None:
        return
    layers = [m for m in model.modules() if isinstance(m, layer_cls)]
    chosen = {id(m) for i, m in enumerate(layers) if every and i % every == 0}
    if recomputes_selectively(pcfg):
        from shardtune import fused_lora

        for layer in layers:
            if id(layer) not in chosen:  # a recomputed layer keeps nothing between forward and backward
                fused_lora.replay_dropout(layer)
    if not every:
        return
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=functools.partial(
            checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT
        ),
        check_fn=lambda m: id(m) in chosen,
    )


def offload_on(pcfg: ParallelConfig, device: torch.device) -> bool:
    """parallel.cpu_offload where it means something: on GPUs (on the CPU it is ignored, with a warning)."""
    if pcfg.cpu_offload and device.type != "cuda":
        log.warning("parallel.cpu_offload is ignored on CPU: the parameters already live in host memory")
    return pcfg.cpu_offload and device.type == "cuda"


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


def checkpointed_every(pcfg: ParallelConfig) -> int:
    """Every how many decoder layers one is recomputed in backward (0: none). 'auto' must have been
    resolved before (plan.resolve_auto, from the GPU's memory)."""
    return pcfg.checkpoint_every if _resolved(pcfg) is True else 0


def recomputes_selectively(pcfg: ParallelConfig) -> bool:
    """Whether the layers that keep their activations redraw the LoRA dropout masks in backward ('selective',
    and `true`'s layers left whole)."""
    return _resolved(pcfg) in ("selective", True)


def _resolved(pcfg: ParallelConfig) -> bool | str:
    if pcfg.activation_checkpointing == "auto":
        raise ValueError("parallel.activation_checkpointing='auto' is unresolved (plan.resolve_auto)")
    return pcfg.activation_checkpointing


def checkpointed_fraction(pcfg: ParallelConfig, n_layers: int) -> float:
    """Share of the decoder layers recomputed in backward (for HFU and the plan)."""
    every = checkpointed_every(pcfg)
    return len(range(0, n_layers, every)) / n_layers if every else 0.0


def reduce_adapter_grads(model: torch.nn.Module, world_size: int, bucket_mib: int = 256) -> None:
    """Sum the adapters' gradients over the ranks (each rank holds whole adapters; see the module docstring),
    a bucket of flattened gradients per all-reduce."""
    if world_size == 1:
        return
    grads = [p.grad for p in _adapters(model) if p.grad is not None]
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


def clip_grad_norm(model: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
    """Clip the gradient norm of the adapters (whole and equal on every rank after the reduction)."""
    limit = max_norm if max_norm else float("inf")
    return torch.nn.utils.clip_grad_norm_(_adapters(model), limit)


def gathered_root(model: torch.nn.Module):
    """Context in which the root unit's weights (embeddings, head) are whole, for calling `generate` on the
    inner module; the layers gather their own weights in their forward."""
    if isinstance(model, FSDP):
        return FSDP.summon_full_params(model, recurse=False, writeback=False)
    return contextlib.nullcontext()


def sharding_report(model: torch.nn.Module) -> dict[str, int]:
    """Elements of the flat parameters this rank holds vs. their unsharded total (tests and logs)."""
    if not isinstance(model, FSDP):
        params = list(unwrap(model).parameters())
        if params and hasattr(params[0], "ds_numel"):  # partitioned by DeepSpeed ZeRO-3 (zero3.py)
            return {
                "local": sum(p.ds_tensor.numel() for p in params),
                "total": sum(p.ds_numel for p in params),
            }
        n = sum(p.numel() for p in params)
        return {"local": n, "total": n}
    local = total = 0
    for unit in FSDP.fsdp_modules(model):
        handle = getattr(unit, "_handle", None)
        if handle is None:
            continue
        flat = handle.flat_param
        local += flat.numel()  # between forwards a flat parameter holds this rank's shard only
        total += int(flat._unpadded_unsharded_size.numel())
    return {"local": local, "total": total}


def is_engine(model) -> bool:
    """A DeepSpeed engine (parallel.backend=deepspeed, zero3.py), told apart without importing deepspeed."""
    return type(model).__name__ == "DeepSpeedEngine"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside the root FSDP wrapper or the DeepSpeed engine (the PEFT model)."""
    return model.module if isinstance(model, FSDP) or is_engine(model) else model
