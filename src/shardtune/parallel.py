"""FSDP: wrapping, mixed precision, activation checkpointing and offload, applied in one place.

The path is FSDP1 (`FullyShardedDataParallel`, `use_orig_params=True`), chosen because it is exact with
bitsandbytes 4-bit weights on CPU and on GPU:

- FSDP2 (`fully_shard`) was bit-exact on CPU but corrupted the dequantized 4-bit weights on GPU (bnb's
  `Params4bit` does not define how to all-gather itself); the loss curve did not show it.
- FSDP1 casting buffers to bf16 (what accelerate builds for `mixed_precision: bf16`) rounds RoPE's
  frequencies; buffers are left alone here, and the sharded model's logits equal the unsharded model's.

Units: one per decoder layer (frozen 4-bit weights + norms, one dtype) and one per LoRA linear (trainable,
float32). Keeping trainable and frozen weights in separate FlatParameters means gradients, their
reduce-scatter and the optimizer touch only the adapters.

One process has nothing to shard and trains the plain module: FSDP1 would switch itself to NO_SHARD,
whose state-dict path loses the frozen 4-bit weights (they stay plain tensors after a forward). The loss
math is the same; the helpers below (clip, gather for generation) hide the difference from the loop.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
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
from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

from shardtune.config import ParallelConfig
from shardtune.modeling import DTYPES

log = logging.getLogger(__name__)


def _is_trainable_leaf(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return next(module.children(), None) is None and isinstance(weight, torch.Tensor) and weight.requires_grad


class Sharder:
    """Wraps decoder layers in FSDP one at a time as they are built, then the root (embeddings, final norm,
    head), then applies activation checkpointing. One process gets the plain module back."""

    def __init__(self, pcfg: ParallelConfig, param_dtype: str, device: torch.device, world_size: int):
        self.pcfg, self.device, self.enabled = pcfg, device, world_size > 1
        self.layer_cls: type | None = None
        offload = pcfg.cpu_offload and device.type == "cuda"
        if pcfg.cpu_offload and not offload:
            log.warning("parallel.cpu_offload is ignored on CPU: the parameters already live in host memory")
        self.kwargs = dict(
            sharding_strategy=ShardingStrategy[pcfg.sharding_strategy],
            mixed_precision=MixedPrecision(
                param_dtype=DTYPES[param_dtype],
                # gradients are reduced and kept in fp32: LoRA master weights and AdamW state are fp32
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
            use_orig_params=True,  # frozen and trainable parameters coexist; optimizer sees the LoRA tensors
            device_id=device,
            sync_module_states=False,  # every rank built the same weights (same bytes, same seed)
        )

    def layer(self, layer: torch.nn.Module) -> torch.nn.Module:
        """One decoder layer, complete on this rank: its FSDP unit (and one per adapter inside it)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layer_cls = type(layer)
        if not self.enabled:
            return layer
        for module in layer.modules():
            if isinstance(module, BaseTunerLayer):
                # NOTE: PEFT casts a LoRA input to `lora_A.weight.dtype`. Under FSDP that dtype is fp32 while
                # the adapter is sharded and bf16 once gathered (e.g. prefetched in backward), so activation
                # checkpointing recomputes with another dtype than the forward saved, and fails. Each
                # adapter's FSDP unit casts its inputs to the compute dtype itself (cast_forward_inputs).
                module.cast_input_dtype_enabled = False
        policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=_is_trainable_leaf)
        return FSDP(layer, auto_wrap_policy=policy, **self.kwargs)

    def root(self, model: torch.nn.Module) -> torch.nn.Module:
        """The rest of the model (its layers already wrapped) as the root unit, then checkpointing."""
        if self.enabled:
            model = FSDP(model, **self.kwargs)
        if self.pcfg.activation_checkpointing and self.layer_cls is not None:
            # Through FSDP's wrapper, not Hugging Face's gradient_checkpointing (which would all-gather each
            # layer again).
            apply_activation_checkpointing(
                model,
                checkpoint_wrapper_fn=functools.partial(
                    checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT
                ),
                check_fn=lambda m: isinstance(m, self.layer_cls),
            )
        return model


def clip_grad_norm(model: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
    """Clip the global gradient norm (over every rank's shard) and return it."""
    limit = max_norm if max_norm else float("inf")
    if isinstance(model, FSDP):
        return model.clip_grad_norm_(limit)
    return torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], limit)


def gathered_root(model: torch.nn.Module):
    """Context in which the root unit's weights (embeddings, head) are whole, for calling `generate` on the
    inner module; the layers gather their own weights in their forward."""
    if isinstance(model, FSDP):
        return FSDP.summon_full_params(model, recurse=False, writeback=False)
    return contextlib.nullcontext()


def sharding_report(model: torch.nn.Module) -> dict[str, int]:
    """Elements of the flat parameters this rank holds vs. their unsharded total (tests and logs)."""
    if not isinstance(model, FSDP):
        n = sum(p.numel() for p in model.parameters())
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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside the root FSDP wrapper (the PEFT model)."""
    return model.module if isinstance(model, FSDP) else model
