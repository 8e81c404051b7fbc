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

import contextlib
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from shardtune.config import ObjectiveConfig
from shardtune.data.formats import IGNORE_INDEX
from shardtune.data.loader import ROW_BOUNDS
from shardtune.kernels.token_logps import token_logps

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", *ROW_BOUNDS)


class Objective(Protocol):
    name: str
    group: int  # sequences per data row (1; 2 for a preference pair: chosen, then rejected)
    shown: tuple[str, ...]  # metrics beyond the loss that the log line, TensorBoard and loss.png show
    loss_label: str  # what the loss is averaged over, for the plot
    reference_forward: (
        bool  # a forward without gradients of every micro-batch besides the policy's (MFU counts it)
    )

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
    if ocfg.name == "dpo":
        return DPO(ocfg.beta, ocfg.label_smoothing, reference)
    if ocfg.name == "orpo":
        return ORPO(ocfg.beta, ocfg.nll_on_prompt)
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
    reference_forward = False

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


# -------------------------------------------------------------------------------------- preference pairs
def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def per_sequence(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-position values summed per sequence: a padded batch's rows, or a packed row's sequences (their
    `lengths`, end to end)."""
    if values.shape[0] == len(lengths):
        return values.sum(dim=1)
    owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(values.device)
    return torch.zeros(len(lengths), device=values.device, dtype=values.dtype).index_add_(0, owner, values[0])


def next_tokens(batch: dict) -> torch.Tensor:
    """Every position's next token where it belongs to the same sequence (the prompt's too), else IGNORE_INDEX:
    the targets of a loss over whole sequences."""
    ids = batch["input_ids"]
    out = torch.full_like(ids, IGNORE_INDEX)
    same = (
        batch["attention_mask"][:, 1:] == 1
        if "attention_mask" in batch
        else batch["position_ids"][:, 1:] != 0  # packed: a sequence starts where the positions restart
    )
    out[:, :-1] = torch.where(same, ids[:, 1:], IGNORE_INDEX)
    return out


def _pair_rewards(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over the pairs of the implicit rewards, detached: what rewards/* averages."""
    chosen, rejected = chosen.detach(), rejected.detach()
    return {
        "rewards/chosen": chosen.sum(),
        "rewards/rejected": rejected.sum(),
        "rewards/accuracies": (chosen > rejected).float().sum(),  # strictly better, as TRL counts
        "rewards/margins": (chosen - rejected).sum(),
    }


def _pair_counts(batch: dict) -> int:
    return len(batch["lengths"]) // 2


def _means(sums: dict, pairs: float, eval: bool) -> dict:
    """Every sum over the pairs as a mean (eval: named eval_*, with the count of pairs)."""
    if not eval:
        return {k: v / pairs for k, v in sums.items()}
    return {**{f"eval_{k}": v / max(pairs, 1) for k, v in sums.items()}, "eval_pairs": int(pairs)}


class DPO:
    """Direct Preference Optimization, the sigmoid loss, averaged over the step's pairs: for a pair with
    D = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)) (sums over the response
    tokens), -(1-e) log sigmoid(beta D) - e log sigmoid(-beta D), e being objective.label_smoothing (cDPO;
    e=0 is TRL's loss_type="sigmoid", which ignores its label_smoothing). The reference is the same model with
    its adapters off (PEFT's disable_adapter()), or with the adapters it started from (StartingAdapter), run
    without gradients on the same micro-batch first: no second model in memory. Metrics as TRL names them:
    rewards/chosen and /rejected (beta times the log-ratios), /accuracies, /margins, logps/chosen and /rejected
    (the policy's)."""

    name, group, loss_label = "dpo", 2, "loss (per pair)"
    reference_forward = True
    shown = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")

    def __init__(self, beta: float, label_smoothing: float = 0.0, reference: Callable | None = None):
        self.beta, self.smoothing = beta, label_smoothing
        self.reference = reference or contextlib.nullcontext

    def counts(self, batch):
        return {"pairs": _pair_counts(batch)}

    def logps(self, model, batch) -> torch.Tensor:
        logits = model(**model_inputs(batch), use_cache=False).logits
        return per_sequence(token_logps(logits, batch["labels"]), batch["lengths"])

    def sums(self, model, batch):
        with torch.no_grad(), self.reference():
            ref = self.logps(model, batch)
        policy = self.logps(model, batch)
        chosen, rejected = (policy - ref).chunk(2)
        margin = self.beta * (chosen - rejected)
        e = self.smoothing
        loss = (
            -F.logsigmoid(margin) if e == 0 else -(1 - e) * F.logsigmoid(margin) - e * F.logsigmoid(-margin)
        )
        pc, pr = policy.detach().chunk(2)
        return {
            "loss": loss.sum(),
            **_pair_rewards(self.beta * chosen, self.beta * rejected),
            "logps/chosen": pc.sum(),
            "logps/rejected": pr.sum(),
        }

    def share(self, sums, totals):
        return sums["loss"] * (1.0 / totals["pairs"])

    def metrics(self, sums, totals, eval=False):
        return _means(sums, totals["pairs"], eval)


class StartingAdapter:
    """DPO's reference when it is the adapter the run started from (objective.reference=adapter; TRL keeps a
    frozen copy of it as a second PEFT adapter): the adapters' values as they start, kept aside, are swapped in
    for the reference's forward and the current ones swapped back after. `local`: the backend's local_trainable,
    the tensors holding this process's share of the adapters that the forward gathers them from (so the copy is
    this share alone), called when the copy is taken, before a checkpoint is restored over them, and at every
    swap. The model runs in eval mode meanwhile: no dropout, no random draw, the reference one fixed model."""

    def __init__(self, module: torch.nn.Module, local: Callable[[], list[torch.Tensor]]):
        self.module, self.local = module, local
        self.start = [t.detach().clone() for t in local()]
        self.current = [torch.empty_like(t) for t in self.start]

    @contextlib.contextmanager
    def __call__(self):
        training, tensors = self.module.training, self.local()
        with torch.no_grad():
            for t, start, current in zip(tensors, self.start, self.current, strict=True):
                current.copy_(t)
                t.copy_(start)
        self.module.eval()
        try:
            yield
        finally:
            with torch.no_grad():
                for t, current in zip(tensors, self.current, strict=True):
                    t.copy_(current)
            self.module.train(training)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class ORPO:
    """Odds-ratio preference optimization (no reference): the chosen response's NLL (a mean over its tokens,
    the prompt's too with objective.nll_on_prompt, as TRL computes it) minus beta times the mean over pairs of
    log sigmoid(log odds(chosen) - log odds(rejected)), where a response's odds come from its mean token
    log-probability p: p / (1 - p) in log space. Metrics as TRL's ORPOTrainer names them: rewards/* (beta times
    those mean log-probabilities), logps/*, nll_loss, log_odds_ratio, log_odds_chosen."""

    name, group, loss_label = "orpo", 2, "loss (NLL per token + odds-ratio term per pair)"
    reference_forward = False
    shown = ("rewards/accuracies", "rewards/margins", "nll_loss", "log_odds_ratio")

    def __init__(self, beta: float, nll_on_prompt: bool = False):
        self.beta, self.nll_on_prompt = beta, nll_on_prompt

    def counts(self, batch):
        pairs = _pair_counts(batch)
        lengths, labels = batch["lengths"], batch["labels"]
        if self.nll_on_prompt:
            return {"pairs": pairs, "nll_tokens": int((lengths[:pairs] - 1).sum())}
        if labels.shape[0] == len(lengths):
            chosen = labels[:pairs]
        else:  # packed: the chosen sequences first
            chosen = labels[:, : int(lengths[:pairs].sum())]
        return {"pairs": pairs, "nll_tokens": int((chosen != IGNORE_INDEX).sum())}

    def sums(self, model, batch):
        lengths = batch["lengths"]
        pairs = len(lengths) // 2
        logits = model(**model_inputs(batch), use_cache=False).logits
        labels = batch["labels"]
        whole = token_logps(logits, next_tokens(batch) if self.nll_on_prompt else labels)
        response = whole * (labels != IGNORE_INDEX) if self.nll_on_prompt else whole
        counted = per_sequence((labels != IGNORE_INDEX).to(whole.dtype), lengths)
        mean = per_sequence(response, lengths) / counted
        chosen, rejected = mean.chunk(2)
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)
        nll = -per_sequence(whole, lengths)[:pairs].sum()
        return {
            "nll_loss": nll,
            "log_odds_ratio": ratio.sum(),
            **_pair_rewards(self.beta * chosen, self.beta * rejected),
            "logps/chosen": chosen.detach().sum(),
            "logps/rejected": rejected.detach().sum(),
            "log_odds_chosen": log_odds.detach().sum(),
        }

    def share(self, sums, totals):
        return sums["nll_loss"] * (1.0 / totals["nll_tokens"]) - sums["log_odds_ratio"] * (
            self.beta / totals["pairs"]
        )

    def metrics(self, sums, totals, eval=False):
        out = _means(sums, totals["pairs"], eval)
        prefix = "eval_" if eval else ""
        nll = sums["nll_loss"] / max(totals["nll_tokens"], 1)  # a mean over tokens, not pairs
        out[f"{prefix}nll_loss"] = nll
        return {f"{prefix}loss": nll - self.beta * out[f"{prefix}log_odds_ratio"], **out}
