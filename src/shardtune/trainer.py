"""The loop: forward, loss, backward, clip, step; held-out loss; generation. It does not know how the model
is sharded beyond calling it (the FSDP wrapper is a module like any other) and, under DeepSpeed, letting its
engine run backward and the optimizer step (zero3.py).

The loss of a step is the mean over every response token of the global batch, whatever the micro-batch
size, gradient accumulation or number of processes: each micro-batch's summed token loss is divided by
the global token count (known before the forward), and the adapters' gradients are summed over the ranks.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from shardtune import faults, zero3
from shardtune.data.formats import IGNORE_INDEX, adds_bos
from shardtune.data.loader import ROW_BOUNDS, Data, GlobalBatchSampler, collate, eval_batches, row_bounds
from shardtune.distributed import DistInfo, all_reduce_max, all_reduce_sum
from shardtune.metrics import alloc_retries, gpu_peak_gib, host_peak_gib, step_flops
from shardtune.parallel import clip_grad_norm, gathered_root, is_engine, reduce_adapter_grads, unwrap
from shardtune.profiling import MemoryTrace

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


@dataclass
class FlopModel:
    n_matmul: int
    n_layers: int
    hidden: int
    peak_flops: float
    recompute: float  # share of the layers recomputed in backward


class Trainer:
    def __init__(
        self,
        model,
        optimizer,
        scheduler,
        data: Data,
        sampler: GlobalBatchSampler,
        tokenizer,
        dist_info: DistInfo,
        flops: FlopModel,
        max_grad_norm: float | None,
        scaler=None,
        autocast_dtype: torch.dtype | None = None,
        packed: bool = False,
        fused_loss: bool = False,
    ):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.data, self.sampler, self.tokenizer = data, sampler, tokenizer
        self.dist, self.flops, self.max_grad_norm = dist_info, flops, max_grad_norm
        self.scaler = scaler  # fp16 only: loss scaling, so that small gradients do not flush to zero
        self.pad_id = tokenizer.pad_token_id
        self.packed, self.fused_loss = packed, fused_loss
        # NOTE: PEFT casts every adapter input up to the adapters' fp32 unless autocast is on; under autocast
        # the adapters compute in the run's dtype from fp32 weights (as the Hugging Face Trainer runs them).
        self.autocast_dtype = autocast_dtype
        self.tokens_seen = 0  # non-padding tokens trained on, all ranks
        self.memory_trace = MemoryTrace(dist_info.rank, dist_info.device)
        self.engine = model if is_engine(model) else None

    def _batch(self, indices: list[int], split) -> dict[str, torch.Tensor]:
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

    def train_step(self, step: int) -> dict:
        """One optimizer step (0-based `step`); returns its metrics, identical on every rank."""
        start = time.perf_counter()
        micro = self.sampler.micro_batches(step)
        batches = [self._batch(idx, self.data.train) for idx in micro]
        lengths = [int(n) for b in batches for n in b["lengths"].tolist()]
        local = [
            sum(b["labelled"] for b in batches),
            float(sum(lengths)),
            float(sum(x * x for x in lengths)),
        ]
        label_tokens, tokens, squares = all_reduce_sum(local, self.dist.device)
        scale = 1.0 / label_tokens
        loss_sum = torch.zeros((), device=self.dist.device, dtype=torch.float64)
        trace = self.memory_trace
        trace.mark(step, "before")
        for i, batch in enumerate(batches):
            faults.inject("micro", self.dist.rank, step, i)
            loss = self.loss_sum(batch)
            trace.mark(step, f"forward{i}")
            scaled = loss * scale
            if self.engine is not None:
                zero3.backward(self.engine, scaled, self.dist.world_size)
            else:
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            trace.mark(step, f"backward{i}")
            loss_sum += loss.detach().double()
        lr = self.scheduler.get_last_lr()[0]
        if self.engine is not None:  # DeepSpeed reduces, clips, steps and zeroes (zero3.py)
            norm = zero3.step(self.engine)
        else:
            reduce_adapter_grads(self.model, self.dist.world_size)
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            norm = clip_grad_norm(self.model, self.max_grad_norm)
            trace.mark(step, "reduce+clip")
            if self.scaler:  # skips the update when a gradient overflowed, and adapts the scale
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        trace.mark(step, "optimizer")
        (loss_total,) = all_reduce_sum([loss_sum.item()], self.dist.device)
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)
        elapsed = time.perf_counter() - start
        self.tokens_seen += int(tokens)
        f = self.flops
        model_flops, hw_flops = step_flops(f.n_matmul, f.n_layers, f.hidden, tokens, squares, f.recompute)
        per_device = self.flops.peak_flops * elapsed * self.dist.world_size
        host, gpu, retries = all_reduce_max(
            [host_peak_gib(), gpu_peak_gib(self.dist.device) or 0.0, alloc_retries(self.dist.device)],
            self.dist.device,
        )
        return {
            "loss": loss_total / label_tokens,
            "lr": lr,
            "grad_norm": float(norm),
            "step_time_s": elapsed,
            "tokens": int(tokens),
            "label_tokens": int(label_tokens),
            "tokens_per_s_per_device": tokens / elapsed / self.dist.world_size,
            "mfu": model_flops / per_device,
            "hfu": hw_flops / per_device,
            "host_peak_gib": host,
            "gpu_peak_gib": gpu if self.dist.device.type == "cuda" else None,
            "alloc_retries": int(retries),  # so far, on the rank with the most
            "device_kind": "GPU" if self.dist.device.type == "cuda" else "proc",
        }

    @torch.no_grad()
    def evaluate(self, batch_size: int, max_rows: int | None) -> dict:
        """Mean token loss over the held-out rows (every rank takes part in every forward)."""
        split = self.data.eval
        n = len(split) if max_rows is None else min(len(split), max_rows)
        self.model.eval()
        total = count = 0.0
        for indices in eval_batches(n, batch_size, self.dist.world_size, self.dist.rank):
            batch = self._batch(indices or [0], split)
            if not indices:  # a dummy forward, so that collectives line up; it counts for nothing
                batch["labels"].fill_(IGNORE_INDEX)
                batch["labelled"] = 0
            total += self.loss_sum(batch).item()
            count += batch["labelled"]  # counted on the host by _batch
        self.model.train()
        total, count = all_reduce_sum([total, count], self.dist.device)
        out = {"eval_loss": total / max(count, 1), "eval_tokens": int(count), "eval_rows": n}
        if self.dist.device.type == "cuda":  # the highest so far, eval included: eval can set the run's peak
            out["gpu_peak_gib"] = all_reduce_max([gpu_peak_gib(self.dist.device)], self.dist.device)[0]
        return out

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
        """Greedy completions of `prompts` (rank 0 receives all; prompts are spread over the ranks)."""
        world, rank = self.dist.world_size, self.dist.rank
        mine = list(range(rank, len(prompts), world))
        tok = self.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        bos = adds_bos(tok)
        rounds = -(-len(prompts) // (batch_size * world)) if prompts else 0
        out: dict[int, str] = {}
        self.model.eval()
        try:
            for k in range(rounds):
                chunk = mine[k * batch_size : (k + 1) * batch_size]
                texts = [prompts[i] for i in chunk] or [prompts[0]]  # idle ranks still step with the rest
                if bos:
                    texts = [t if t.startswith(tok.bos_token) else tok.bos_token + t for t in texts]
                enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(
                    self.dist.device
                )
                # synced_gpus keeps every rank stepping (and gathering layers) until all are done
                with gathered_root(self.model), self.compute():
                    gen = unwrap(self.model).generate(
                        **enc,
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        use_cache=True,
                        synced_gpus=world > 1,
                        pad_token_id=tok.pad_token_id,
                        eos_token_id=tok.eos_token_id,
                    )
                new = gen[:, enc["input_ids"].shape[1] :]
                for i, ids in zip(chunk, new, strict=False):  # an idle rank's dummy row has no index
                    out[i] = tok.decode(ids, skip_special_tokens=True)
        finally:
            self.model.train()
            tok.padding_side = side
        if world > 1:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, out)
            out = {k: v for part in gathered for k, v in part.items()}
        return [out[i] for i in range(len(prompts))]
