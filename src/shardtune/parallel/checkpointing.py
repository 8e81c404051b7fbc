"""Activation checkpointing: which decoder layers recompute their forward in backward (parallel.
activation_checkpointing, parallel.checkpoint_every), applied through torch's wrapper by both backends, and
the selective part (the LoRA dropout masks drawn again in backward instead of kept)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)

if TYPE_CHECKING:
    from shardtune.config import ParallelConfig


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
        from shardtune.kernels import fused_lora

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


def checkpointed_every(pcfg: ParallelConfig) -> int:
    """Every how many decoder layers one is recomputed in backward (0: none). 'auto' must have been
    resolved before (planning.auto.resolve_auto, from the GPU's memory)."""
    return pcfg.checkpoint_every if _resolved(pcfg) is True else 0


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
