"""Activation checkpointing: which decoder layers recompute their forward in backward (parallel.
activation_checkpointing, parallel.checkpoint_every), applied through torch's wrapper by both backends, the
selective part (the LoRA dropout masks drawn again in backward instead of kept), and 'offload': the same
layers' saved tensors sent to host memory instead (offload.py)."""

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


def apply_checkpointing(
    model: torch.nn.Module, pcfg: ParallelConfig, layer_cls: type | None, device: torch.device
) -> ActivationOffloader | None:
    """Recompute every k-th decoder layer in backward (parallel.checkpoint_every), through torch's wrapper, not
    Hugging Face's gradient_checkpointing (which under FSDP would all-gather each layer again); the selective
    part (the LoRA dropout masks drawn again) in the layers that keep their activations. With 'offload' the
    same layers send their saved tensors to host memory instead: the offloader is returned (its counters)."""
    every = checkpointed_every(pcfg)
    if layer_cls is None:
        return None
    layers = [m for m in model.modules() if isinstance(m, layer_cls)]
    if offloaded := offloaded_every(pcfg):
        offloader = ActivationOffloader(device)
        offloader.attach(layers, offloaded)
        return offloader
    chosen = {id(m) for i, m in enumerate(layers) if every and i % every == 0}
    if recomputes_selectively(pcfg):
        from shardtune.kernels import fused_lora

        for layer in layers:
            if id(layer) not in chosen:  # a recomputed layer keeps nothing between forward and backward
                fused_lora.replay_dropout(layer)
    if not every:
        return None
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=functools.partial(
            checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT
        ),
        check_fn=lambda m: id(m) in chosen,
    )
    return None


def checkpointed_every(pcfg: ParallelConfig) -> int:
    """Every how many decoder layers one is recomputed in backward (0: none). 'auto' must have been
    resolved before (planning.auto.resolve_auto, from the GPU's memory)."""
    return pcfg.checkpoint_every if _resolved(pcfg) is True else 0


def offloaded_every(pcfg: ParallelConfig) -> int:
    """Every how many decoder layers one sends its saved tensors to host memory (0: none)."""
    return pcfg.checkpoint_every if _resolved(pcfg) == "offload" else 0


def recomputes_selectively(pcfg: ParallelConfig) -> bool:
    """Whether the layers that keep their activations redraw the LoRA dropout masks in backward ('selective',
    and `true`'s layers left whole)."""
    return _resolved(pcfg) in ("selective", True)


def _resolved(pcfg: ParallelConfig) -> bool | str:
    if pcfg.activation_checkpointing == "auto":
        raise ValueError(
            "parallel.activation_checkpointing='auto' is unresolved (planning.auto.resolve_auto)"
        )
    return pcfg.activation_checkpointing


def checkpointed_fraction(pcfg: ParallelConfig, n_layers: int) -> float:
    """Share of the decoder layers recomputed in backward (for HFU and the plan)."""
    every = checkpointed_every(pcfg)
    return len(range(0, n_layers, every)) / n_layers if every else 0.0
