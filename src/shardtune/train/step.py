"""One optimizer step of the run's objective, and the held-out evaluation: batches, forward, loss, backward
through the backend, its step. It does not know how the model is sharded: the backend (parallel/backend.py)
runs backward and the optimizer step; nor which objective runs: the objective (objectives.py) counts what its
loss is averaged over, computes it, and names its metrics.

The loss of a step is the mean over the global batch (of response tokens for SFT, of pairs for DPO and ORPO),
whatever the micro-batch size, gradient accumulation or number of processes: each micro-batch's summed loss
is divided by the global count (known before the forward), and the adapters' gradients are summed over the
ranks.
"""

from __future__ import annotations

import contextlib
import time

import torch

from shardtune import faults
from shardtune.data.formats import IGNORE_INDEX
from shardtune.data.loader import Data, GlobalBatchSampler, collate, eval_batches, row_bounds
from shardtune.observability.flops import FlopModel
from shardtune.observability.memory import MemoryTrace, alloc_retries, gpu_peak_gib, host_peak_gib
from shardtune.parallel.backend import Backend
from shardtune.parallel.distributed import DistInfo, all_reduce_max, all_reduce_sum
from shardtune.train.objectives import Objective


def compute_context(device: torch.device, autocast_dtype: torch.dtype | None):
    """The context every forward runs in: autocast to the compute dtype (so the adapters compute in it), or
    nothing."""
    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=autocast_dtype)


class TrainStep:
    """The step of the run's objective and its held-out metrics, over `model` (what the backend wrapped) and
    `data`."""

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
        objective: Objective,
        autocast_dtype: torch.dtype | None = None,
        packed: bool = False,
    ):
        self.backend, self.model, self.scheduler = backend, model, scheduler
        self.data, self.sampler, self.pad_id = data, sampler, pad_id
        self.dist, self.flops, self.objective = dist_info, flops, objective
        self.packed = packed
        # NOTE: PEFT casts every adapter input up to the adapters' fp32 unless autocast is on; under autocast
        # the adapters compute in the run's dtype from fp32 weights (as the Hugging Face Trainer runs them).
        self.autocast_dtype = autocast_dtype
        self.memory_trace = MemoryTrace(dist_info.rank, dist_info.device)

    def batch(self, indices: list[int], split) -> dict:
        batch = collate(split.sequences(indices), self.pad_id, self.packed)
        # counted on the host, so that counting costs no device sync
        counted = self.objective.counts(batch)
        counts = {"lengths": batch.pop("lengths"), "counts": counted}
        batch = {k: v.to(self.dist.device, non_blocking=True) for k, v in batch.items()}
        if self.packed:
            batch.update(row_bounds(counts["lengths"], self.dist.device))
        return {**batch, **counts}

    def compute(self):
        return compute_context(self.dist.device, self.autocast_dtype)

    def sums(self, batch: dict) -> dict[str, torch.Tensor]:
        with self.compute():
            return self.objective.sums(self.model, batch)

    def __call__(self, step: int) -> dict:
        """One optimizer step (0-based `step`); returns its metrics, identical on every rank."""
        start = time.perf_counter()
        batches = [self.batch(idx, self.data.train) for idx in self.sampler.micro_batches(step)]
        lengths = [int(n) for b in batches for n in b["lengths"].tolist()]
        names = list(batches[0]["counts"])
        local = [sum(b["counts"][k] for b in batches) for k in names]
        *counted, tokens, squares = all_reduce_sum(
            [*local, float(sum(lengths)), float(sum(x * x for x in lengths))], self.dist.device
        )
        totals = dict(zip(names, counted, strict=True))
        sums: dict[str, torch.Tensor] = {}
        trace = self.memory_trace
        trace.mark(step, "before")
        for i, batch in enumerate(batches):
            faults.inject("micro", self.dist.rank, step, i)
            parts = self.sums(batch)
            trace.mark(step, f"forward{i}")
            self.backend.backward(self.objective.share(parts, totals))
            trace.mark(step, f"backward{i}")
            for k, v in parts.items():
                if k not in sums:
                    sums[k] = torch.zeros((), device=self.dist.device, dtype=torch.float64)
                sums[k] += v.detach().double()
        lr = self.scheduler.get_last_lr()[0]
        norm = self.backend.step()
        self.scheduler.step()
        trace.mark(step, "optimizer")
        summed = all_reduce_sum([v.item() for v in sums.values()], self.dist.device)
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)
        elapsed = time.perf_counter() - start
        return {
            **self.objective.metrics(dict(zip(sums, summed, strict=True)), totals),
            "lr": lr,
            "grad_norm": float(norm),
            "step_time_s": elapsed,
            "tokens": int(tokens),
            **{k: int(v) for k, v in totals.items()},
            **self._speed_and_memory(tokens, squares, elapsed),
        }

    def _speed_and_memory(self, tokens: float, squares: float, elapsed: float) -> dict:
        model_flops, hw_flops = self.flops.step(tokens, squares)
        if self.objective.reference_forward:  # DPO's no-grad forward of the same rows, adapters off
            extra = self.flops.forward(tokens, squares)
            model_flops, hw_flops = model_flops + extra, hw_flops + extra
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
        """The objective's metrics over the held-out rows (every rank takes part in every forward)."""
        split = self.data.eval
        n = len(split) if max_rows is None else min(len(split), max_rows)
        self.model.eval()
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        for indices in eval_batches(n, batch_size, self.dist.world_size, self.dist.rank):
            batch = self.batch(indices or [0], split)
            if not indices:  # a dummy forward, so that collectives line up; it counts for nothing
                batch["labels"].fill_(IGNORE_INDEX)
            parts = self.sums(batch)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + (v.item() if indices else 0.0)
            for k, v in batch["counts"].items():  # counted on the host by batch()
                counts[k] = counts.get(k, 0.0) + (v if indices else 0)
        self.model.train()
        summed = all_reduce_sum([*sums.values(), *counts.values()], self.dist.device)
        sums = dict(zip(sums, summed[: len(sums)], strict=True))
        counts = dict(zip(counts, summed[len(sums) :], strict=True))
        out = {**self.objective.metrics(sums, counts, eval=True), "eval_rows": n}
        if self.dist.device.type == "cuda":  # the highest so far, eval included: eval can set the run's peak
            out["gpu_peak_gib"] = all_reduce_max([gpu_peak_gib(self.dist.device)], self.dist.device)[0]
        return out
