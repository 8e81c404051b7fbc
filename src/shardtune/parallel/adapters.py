"""The adapters under either backend: the trained parameters, their names without the wrappers' (a checkpoint's
keys), and their step and state where they are whole and equal on every rank (FSDP, and one process); the
base's CPU offload setting, which both backends read."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from shardtune.config import ParallelConfig

log = logging.getLogger(__name__)


def offload_on(pcfg: ParallelConfig, device: torch.device) -> bool:
    """parallel.cpu_offload where it means something: on GPUs (on the CPU it is ignored, with a warning)."""
    if pcfg.cpu_offload and device.type != "cuda":
        log.warning("parallel.cpu_offload is ignored on CPU: the parameters already live in host memory")
    return pcfg.cpu_offload and device.type == "cuda"


def fqn(name: str) -> str:
    """A parameter's name without the FSDP and checkpoint wrappers (what get_state_dict would call it)."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def adapters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trained parameters (the LoRA adapters; the base is frozen)."""
    return [p for p in module.parameters() if p.requires_grad]


def step_whole_adapters(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float | None, scaler=None
) -> torch.Tensor:
    """Clip, step and zero adapters that are whole and equal on every rank (their gradients summed already);
    the gradient norm before clipping. `scaler`: fp16's loss scaler, which skips the update when a gradient
    overflowed and adapts the scale."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(adapters(model), max_grad_norm or float("inf"))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def whole_adapters_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, fresh: bool = False
) -> tuple[dict, dict]:
    """The adapters and their optimizer state, as the very tensors training uses, by name: DCP saves from
    them and loads into them in place (adapters whole and equal on every rank: DCP writes them once)."""
    from torch.distributed.checkpoint.state_dict import (
        _init_optim_state,  # fresh optimizer state to load into
    )

    if fresh and not optimizer.state:  # a fresh optimizer (a resume): give DCP state tensors to load into
        _init_optim_state(optimizer)
    # (not when saving: an optimizer that has not stepped yet, as fp16's loss scaler skips the steps whose
    # gradients overflow, is saved without state; initializing it would count a step AdamW never took)
    names = {p: fqn(n) for n, p in model.named_parameters() if p.requires_grad}
    msd = {names[p]: p.detach() for p in names}
    osd = {
        "state": {names[p]: state for p, state in optimizer.state.items()},
        "param_groups": [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [names[p] for p in g["params"]]}
            for g in optimizer.param_groups
        ],
    }
    return msd, osd
