"""Activation checkpointing: what each decoder layer does with the tensors it keeps for backward (parallel.
activation_checkpointing, parallel.checkpoint_every), as a plan of one letter per layer (layer_plan): keep
them, recompute the layer in backward (torch's wrapper, applied by both backends; the selective part, the
LoRA dropout masks drawn again in backward instead of kept, in the layers that keep theirs), or offload them
to host memory (offload.py)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)

from shardtune.parallel.offload import ActivationOffloader

if TYPE_CHECKING:
    from shardtune.config import ParallelConfig

KEEP, OFFLOAD, RECOMPUTE = "k", "o", "r"


def apply_checkpointing(
    model: torch.nn.Module, pcfg: ParallelConfig, layer_cls: type | None, device: torch.device
) -> ActivationOffloader | None:
    """Apply layer_plan to the decoder layers: recompute the 'r' layers in backward through torch's wrapper,
    not Hugging Face's gradient_checkpointing (which under FSDP would all-gather each layer again); offload the
    'o' layers' saved tensors (the offloader is returned: its counters); in the kept layers, with 'selective'
    or where other layers are recomputed, the selective part (the LoRA dropout masks drawn again)."""
    if layer_cls is None:
        return None
    layers = [m for m in model.modules() if isinstance(m, layer_cls)]
    plan = layer_plan(pcfg, len(layers))
    offloader = None
    if OFFLOAD in plan:
        offloader = ActivationOffloader(device)
        offloader.attach(layers, [what == OFFLOAD for what in plan])
    recomputed = {id(m) for m, what in zip(layers, plan, strict=True) if what == RECOMPUTE}
    if pcfg.activation_checkpointing == "selective" or RECOMPUTE in plan:
        from shardtune.kernels import fused_lora

        for layer, what in zip(layers, plan, strict=True):
            if what == KEEP:  # a recomputed layer keeps nothing between forward and backward
                fused_lora.replay_dropout(layer)
    if recomputed:
        apply_activation_checkpointing(
            model,
            checkpoint_wrapper_fn=functools.partial(
                checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT
            ),
            check_fn=lambda m: id(m) in recomputed,
        )
    return offloader


def layer_plan(pcfg: ParallelConfig, n_layers: int) -> str:
    """One letter per decoder layer, first to last: k keeps its activations, o offloads them to host memory,
    r recomputes the layer in backward. `true` / 'offload' with checkpoint_every=k: r / o for every k-th layer
    from the first; a pattern repeated over the layers; false and 'selective': k for all. 'auto' must have
    been resolved before (planning.auto.resolve_auto, from the GPU's memory)."""
    mode = pcfg.activation_checkpointing
    if mode == "auto":
        raise ValueError(
            "parallel.activation_checkpointing='auto' is unresolved (planning.auto.resolve_auto)"
        )
    if mode in (False, "selective"):
        return KEEP * n_layers
    if mode in (True, "offload"):
        every, chosen = pcfg.checkpoint_every, RECOMPUTE if mode is True else OFFLOAD
        return "".join(chosen if i % every == 0 else KEEP for i in range(n_layers))
    return "".join(mode[i % len(mode)] for i in range(n_layers))


def checkpointed_fraction(pcfg: ParallelConfig, n_layers: int) -> float:
    """Share of the decoder layers recomputed in backward (for HFU and the plan)."""
    return layer_plan(pcfg, n_layers).count(RECOMPUTE) / n_layers if n_layers else 0.0
