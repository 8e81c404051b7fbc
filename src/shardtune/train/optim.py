"""The optimizer and the learning-rate schedule optim.* names.

optim.name=adamw is torch's AdamW; the others are bitsandbytes' AdamW with the flags the Hugging Face Trainer
gives it for the same names (transformers' trainer_optimizer.py): 8-bit blockwise moments, and paging of the
state into CUDA unified memory. Either way the optimizer's state is a dict per parameter that the checkpoint
manager saves and loads in place by the parameter's name (bitsandbytes' own: 8-bit codes `state1`/`state2`,
their per-block scales `absmax1`/`absmax2`, the code books `qmap1`/`qmap2`, an int `step`), so a resume is
exact with any of them. Schedules are transformers' (get_scheduler), by its names.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from shardtune.config import OptimConfig

# optim.name -> bitsandbytes AdamW's (optim_bits, is_paged), as transformers maps these names
BITSANDBYTES = {
    "adamw_8bit": (8, False),
    "paged_adamw_8bit": (8, True),
    "paged_adamw_32bit": (32, True),
}
# our names for transformers' schedules
SCHEDULE_ALIASES = {"constant": "constant_with_warmup"}


def build_optimizer(o: OptimConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer optim.name names over `params`, with optim.lr, betas, eps and weight_decay (one group)."""
    settings = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(list(params), **settings)
    import bitsandbytes as bnb

    bits, paged = BITSANDBYTES[o.name]
    return bnb.optim.AdamW(list(params), **settings, optim_bits=bits, is_paged=paged)


def build_scheduler(o: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """transformers' schedule optim.scheduler names (a LambdaLR), warmup included."""
    from transformers import get_scheduler

    name = SCHEDULE_ALIASES.get(o.scheduler, o.scheduler)
    extra = {"min_lr_rate": o.min_lr_rate} if name == "cosine_with_min_lr" else None
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=o.warmup_steps,
        num_training_steps=total_steps,
        scheduler_specific_kwargs=extra,
    )
