"""What a step minimizes (objective.name): one Objective each, which the step (step.py) and the held-out
evaluation call without knowing which one runs.

An objective says how many sequences a data row holds (`group`), counts on the host what its loss is averaged
over (`counts`: response tokens for SFT, pairs for DPO and ORPO; summed over the step's micro-batches and the
ranks before any forward), computes a micro-batch's summed quantities in one forward (`sums`: the loss's
numerator with its graph, and what the metrics need), gives the micro-batch's share of the step's loss from
them (`share`: what is backpropagated), and turns the sums of a step or of the eval into metrics (`metrics`).

So whatever the micro-batch size, gradient accumulation or number of processes, the step's loss is the mean
over the step's global batch: of the response tokens (SFT) or of the pairs (DPO, ORPO).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from shardtune.config import ObjectiveConfig
from shardtune.data.formats import IGNORE_INDEX
from shardtune.data.loader import ROW_BOUNDS

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", *ROW_BOUNDS)


class Objective(Protocol):
    name: str
    group: int  # sequences per data row (1; 2 for a preference pair: chosen, then rejected)
    shown: tuple[str, ...]  # metrics beyond the loss that the log line, TensorBoard and loss.png show
    loss_label: str  # what the loss is averaged over, for the plot

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """What the loss is averaged over, counted on the host in a collated batch (before it moves)."""

    def sums(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One micro-batch's forward: its summed quantities (scalars), the loss's numerators with their graph."""

    def share(self, sums: dict[str, torch.Tensor], totals: dict[str, float]) -> torch.Tensor:
        """This micro-batch's part of the step's loss (`totals`: the step's counts, all ranks)."""

    def metrics(self, sums: dict[str, float], totals: dict[str, float], eval: bool = False) -> dict:
        """The step's (or the eval's) metrics from its summed quantities and counts, all ranks."""


def objective_for(ocfg: ObjectiveConfig, fused_loss: bool = False, reference=None) -> Objective:
    """The objective objective.name names. `fused_loss`: the model's forward computes the token loss itself
    (Liger's, modeling.apply_fused_kernels); `reference`: a context manager factory under which the model is
    the reference (the adapters off), for DPO."""
    return SFT(fused_loss)


# ------------------------------------------------------------------------------------------------ SFT
def token_loss_sum(model, batch: dict[str, torch.Tensor], fused: bool = False) -> torch.Tensor:
    """Summed cross-entropy over the batch's labelled positions (labels are pre-shifted).

    `fused`: the model's forward is Liger's (modeling.apply_fused_kernels), which computes the loss from the
    hidden states and the head's weight chunk by chunk and never holds the logits; `shift_labels` tells it the
    labels are shifted already and `num_items_in_batch=1` makes its reduction the plain sum."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if fused:
        return model(**inputs, shift_labels=batch["labels"], num_items_in_batch=1, use_cache=False).loss
    logits = model(**inputs, use_cache=False).logits
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        batch["labels"].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


class SFT:
    """Cross-entropy of the response tokens, averaged over every response token of the step."""

    name, group, shown, loss_label = "sft", 1, (), "loss (per response token)"

    def __init__(self, fused_loss: bool = False):
        self.fused_loss = fused_loss

    def counts(self, batch):
        return {"label_tokens": int((batch["labels"] != IGNORE_INDEX).sum())}

    def sums(self, model, batch):
        return {"loss": token_loss_sum(model, batch, self.fused_loss)}

    def share(self, sums, totals):
        return sums["loss"] * (1.0 / totals["label_tokens"])

    def metrics(self, sums, totals, eval=False):
        tokens = totals["label_tokens"]
        if eval:
            return {"eval_loss": sums["loss"] / max(tokens, 1), "eval_tokens": int(tokens)}
        return {"loss": sums["loss"] / tokens}
