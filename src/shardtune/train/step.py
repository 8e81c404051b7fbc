"""One optimizer step of the SFT objective, and the held-out loss: batches, forward, loss, backward through the
backend, its step. It does not know how the model is sharded: the backend (parallel/backend.py) runs backward
and the optimizer step.

The loss of a step is the mean over every response token of the global batch, whatever the micro-batch
size, gradient accumulation or number of processes: each micro-batch's summed token loss is divided by
the global token count (known before the forward), and the adapters' gradients are summed over the ranks.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from shardtune import faults
from shardtune.data.formats import IGNORE_INDEX
from shardtune.data.loader import ROW_BOUNDS, Data, GlobalBatchSampler, collate, eval_batches, row_bounds
from shardtune.observability.flops import FlopModel
from shardtune.observability.memory import MemoryTrace, alloc_retries, gpu_peak_gib, host_peak_gib
from shardtune.parallel.backend import Backend
from shardtune.parallel.distributed import DistInfo, all_reduce_max, all_reduce_sum

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", *ROW_BOUNDS)


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


def compute_context(device: torch.device, autocast_dtype: torch.dtype | None):
    """The context every forward runs in: autocast to the compute dtype (so the adapters compute in it), or
    nothing."""
    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=autocast_dtype)


class TrainStep:
    """The step of the SFT objective (summed token cross-entropy over the response tokens) and its held-out
    loss, over `model` (what the backend wrapped) and `data`."""

    def __init__(
        self,
        backend: Backend,
        model: torch.nn.Module,
        scheduler,
        data: Data,
        sampler: GlobalBatchSampler,
        pad_id: int,
        dist_info: DistInfo,
        flops: FlopModel,
        autocast_dtype: torch.dtype | None = None,
        packed: bool = False,
        fused_loss: bool = False,
    ):
        self.backend, self.model, self.scheduler = backend, model, scheduler
        self.data, self.sampler, self.pad_id = data, sampler, pad_id
        self.dist, self.flops = dist_info, flops
        self.packed, self.fused_loss = packed, fused_loss
        # NOTE: PEFT casts every adapter input up to the adapters' fp32 unless autocast is on; under autocast
        # the adapters compute in the run's dtype from fp32 weights (as the Hugging Face Trainer runs them).
        self.autocast_dtype = autocast_dtype
        self.memory_trace = MemoryTrace(dist_info.rank, dist_info.device)

    def batch(self, indices: list[int], split) -> dict[str, torch.Tensor]:
        batch = collate([split.row(i) for i in indices], self.pad_id, self.packed)
        # counted on the host, so that counting tokens costs no device sync
        counts = {"lengths": batch.pop("lengths"), "labelled": int((batch["labels"] != IGNORE_INDEX).sum())}
        batch = {k: v.to(self.dist.device, non_blocking=True) for k, v in batch.items()}
        if self.packed:
            batch.update(row_bounds(counts["lengths"], self.dist.device))
        return {**batch, **counts}

    def compute(self):
        return compute_context(self.dist.device, self.autocast_dtype)

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.compute():
            return token_loss_sum(self.model, batch, self.fused_loss)

    def __call__(self, step: int) -> dict:
        """One optimizer step (0-based `step`); returns its metrics, identical on every rank."""
        start = time.perf_counter()
        batches = [self.batch(idx, self.data.train) for idx in self.sampler.micro_batches(step)]
        lengths = [int(n) for b in batches for n in b["lengths"].tolist()]
        local = [sum(b["labelled"] for b in batches), float(sum(lengths)), float(sum(x * x for x in lengths))]
        label_tokens, tokens, squares = all_reduce_sum(local, self.dist.device)
        scale = 1.0 / label_tokens
        loss_sum = torch.zeros((), device=self.dist.device, dtype=torch.float64)
        trace = self.memory_trace
        trace.mark(step, "before")
        for i, batch in enumerate(batches):
            faults.inject("micro", self.dist.rank, step, i)
            loss = self.loss_sum(batch)
            trace.mark(step, f"forward{i}")
            self.backend.backward(loss * scale)
            trace.mark(step, f"backward{i}")
            loss_sum += loss.detach().double()
        lr = self.scheduler.get_last_lr()[0]
        norm = self.backend.step()
        self.scheduler.step()
        trace.mark(step, "optimizer")
        (loss_total,) = all_reduce_sum([loss_sum.item()], self.dist.device)
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)
        elapsed = time.perf_counter() - start
        return {
            "loss": loss_total / label_tokens,
            "lr": lr,
            "grad_norm": float(norm),
            "step_time_s": elapsed,
            "tokens": int(tokens),
            "label_tokens": int(label_tokens),
            **self._speed_and_memory(tokens, squares, elapsed),
        }

    def _speed_and_memory(self, tokens: float, squares: float, elapsed: float) -> dict:
        model_flops, hw_flops = self.flops.step(tokens, squares)
        per_device = self.flops.peak_flops * elapsed * self.dist.world_size
        device = self.dist.device
        host, gpu, retries = all_reduce_max(
            [host_peak_gib(), gpu_peak_gib(device) or 0.0, alloc_retries(device)], device
        )
        return {
            "tokens_per_s_per_device": tokens / elapsed / self.dist.world_size,
            "mfu": model_flops / per_device,
            "hfu": hw_flops / per_device,
            "host_peak_gib": host,
            "gpu_peak_gib": gpu if device.type == "cuda" else None,
            "alloc_retries": int(retries),  # so far, on the rank with the most
            "device_kind": "GPU" if device.type == "cuda" else "proc",
        }

    @torch.no_grad()
    def evaluate(self, batch_size: int, max_rows: int | None) -> dict:
        """Mean token loss over the held-out rows (every rank takes part in every forward)."""
        split = self.data.eval
        n = len(split) if max_rows is None else min(len(split), max_rows)
        self.model.eval()
        total = count = 0.0
        for indices in eval_batches(n, batch_size, self.dist.world_size, self.dist.rank):
            batch = self.batch(indices or [0], split)
            if not indices:  # a dummy forward, so that collectives line up; it counts for nothing
                batch["labels"].fill_(IGNORE_INDEX)
                batch["labelled"] = 0
            total += self.loss_sum(batch).item()
            count += batch["labelled"]  # counted on the host by batch()
        self.model.train()
        total, count = all_reduce_sum([total, count], self.dist.device)
        out = {"eval_loss": total / max(count, 1), "eval_tokens": int(count), "eval_rows": n}
        if self.dist.device.type == "cuda":  # the highest so far, eval included: eval can set the run's peak
            out["gpu_peak_gib"] = all_reduce_max([gpu_peak_gib(self.dist.device)], self.dist.device)[0]
        return out
