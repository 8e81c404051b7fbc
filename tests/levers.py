"""Shared by the speed-lever tests on CPU (tests/test_levers.py) and on GPU (tests/workers/gpu_levers.py): a
model built by shardtune's own loader (4-bit base, LoRA) on one device, rows of several lengths, and the
loss and adapter gradients of one forward/backward under a given set of levers."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from shardtune.config import Config, apply_overrides
from shardtune.data.loader import collate, row_bounds
from shardtune.model.loading import build_model
from shardtune.model.modeling import attention_implementation, model_config
from shardtune.parallel.distributed import DistInfo
from shardtune.parallel.fsdp import FsdpBackend
from shardtune.train.objectives import MODEL_INPUTS, token_loss_sum
from shardtune.train.step import compute_context


def build(overrides: dict, device: torch.device, attn: str = "sdpa", keep: dict | None = None):
    """A random 4-bit + LoRA model as a training run builds it (one process: the plain module); `keep` gets
    the backend (its offloader)."""
    cfg = apply_overrides(
        Config(),
        {"model.init": "random", "lora.dropout": 0.0, "model.fused_kernels": False, **overrides},
        "test",
    )
    torch.manual_seed(0)
    backend = FsdpBackend(cfg.parallel, cfg.param_dtype, DistInfo.alone(device))
    if keep is not None:
        keep["backend"] = backend
    model, _ = build_model(
        cfg, model_config(cfg), None, attention_implementation(attn, device), backend, device
    )
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():  # as after some training: LoRA B starts at zero, a no-op
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return cfg, model


def rows(lengths: list[int], vocab: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rows of random tokens; the first quarter of each is prompt (untrained), the rest trained."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        trained = np.ones(n, dtype=bool)
        trained[: n // 4] = False
        out.append((rng.integers(3, vocab, n), trained))
    return out


def to(batch: dict, device: torch.device) -> dict:
    """A collated batch on `device` as the trainer passes it: a packed one with its rows' boundaries."""
    out = {k: v.to(device) for k, v in batch.items() if k != "lengths"}
    return {**out, **(row_bounds(batch["lengths"], device) if "position_ids" in batch else {})}


def per_token_losses(model, batch: dict, autocast_dtype=None) -> torch.Tensor:
    """Cross-entropy of every labelled position, in row order (padded and packed batches list the same
    positions in the same order)."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    with torch.no_grad(), compute_context(batch["input_ids"].device, autocast_dtype):
        logits = model(**inputs, use_cache=False).logits.float()
    labels = batch["labels"]
    mask = labels != -100
    return torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="none")


def loss_and_grads(model, batch: dict, autocast_dtype=None, fused: bool = False):
    """Summed token loss and the adapters' gradients (fp32, by name) of one forward/backward."""
    model.zero_grad(set_to_none=True)
    with compute_context(batch["input_ids"].device, autocast_dtype):
        loss = token_loss_sum(model, batch, fused)
    loss.backward()
    grads = {
        n.replace("._checkpoint_wrapped_module", ""): p.grad.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    return loss.detach().double().item(), grads


def batches(lengths: list[int], vocab: int, pad_id: int, device: torch.device) -> tuple[dict, dict]:
    """The same rows, padded and packed."""
    r = rows(lengths, vocab)
    return to(collate(r, pad_id), device), to(collate(r, pad_id, packed=True), device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def dropout_kernel_accuracy(
    M: int, K: int, R: int, device: torch.device, p: float = 0.05, dtype=torch.bfloat16
):
    """lora_kernel.DroppedMatmul on an [M, K] input and an [R, K] weight: its output and both gradients against
    dropout with the kernel's own mask in fp64, beside autograd's `dtype` dropout + linear with that mask (relative
    L2 errors); whether the same random state draws the same numbers, whether the generator moved on, and the
    keep rate."""
    from shardtune.kernels import lora_kernel
    from shardtune.kernels.fused_lora import _RandomState

    torch.manual_seed(0)
    x = torch.randn(M, K, device=device, dtype=dtype)
    w = (torch.randn(R, K, device=device) / K**0.5).to(dtype)
    g = torch.randn(M, R, device=device, dtype=dtype)
    rng = _RandomState(device)
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
    h = lora_kernel.DroppedMatmul.apply(xk, wk, p)
    h.backward(g)
    advanced = not torch.equal(rng._get(), rng.state)
    again = rng.replay(lambda: lora_kernel.DroppedMatmul.apply(x, w, p))
    _, seed, offset = rng.replay(lambda: lora_kernel.reserve(x, p))  # the draw DroppedMatmul made
    mask = lora_kernel.keep_mask((M, K), device, p, seed, offset)
    refs = {}
    for ref_dtype in (dtype, torch.float64):
        xr, wr = x.to(ref_dtype).clone().requires_grad_(), w.to(ref_dtype).clone().requires_grad_()
        hr = torch.nn.functional.linear(xr * mask * lora_kernel.keep_scale(p), wr)
        hr.backward(g.to(ref_dtype))
        refs[ref_dtype] = (hr, xr.grad, wr.grad)
    names = ("out", "grad_x", "grad_a")
    ours = (h, xk.grad, wk.grad)
    return {
        "keep_rate": mask.float().mean().item(),
        "repeatable": torch.equal(again, h.detach()),
        "rng_advanced": advanced,
        **{f"{n}_rel_err": _rel(a, b) for n, a, b in zip(names, ours, refs[torch.float64], strict=True)},
        **{
            f"{n}_autograd_rel_err": _rel(a, b)
            for n, a, b in zip(names, refs[dtype], refs[torch.float64], strict=True)
        },
    }


def one_function_accuracy(layer, x: torch.Tensor, g: torch.Tensor, p: float) -> dict:
    """A fused LoRA layer (`layer`: FusedLinear, one adapter, frozen base) with base and adapter in one Function
    (fused_lora._LinearWithAdapter) and through the separate path (base layer, adapter, autograd's sum), the same
    random state for both: relative L2 errors of output and gradients (x, A, B) against fp64 with the same
    dropout mask (lora_kernel's when p > 0), and which Function each path ran."""
    from unittest import mock

    from shardtune.kernels import fused_lora
    from shardtune.kernels.fused_lora import _RandomState

    adapter = layer.active_adapters[0]
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    layer.lora_dropout[adapter] = torch.nn.Dropout(p).train() if p else torch.nn.Identity()
    rng = _RandomState(x.device)
    dtype = x.dtype  # the compute dtype: autocast to it where the adapters' weights are in another
    runs = {}
    for name, separate in (("one_function", False), ("separate", True)):
        xs = x.clone().requires_grad_()
        a.grad = b.grad = None
        patch = (
            mock.patch.object(fused_lora, "_with_base", lambda *_: None)
            if separate
            else contextlib.nullcontext()
        )
        with patch, torch.autocast(x.device.type, dtype=dtype, enabled=dtype != a.dtype):
            out = rng.replay(lambda: layer(xs))  # noqa: B023
        out.backward(g)
        runs[name] = (type(out.grad_fn).__name__, out, xs.grad, a.grad.clone(), b.grad.clone())
    # the reference: the dense weight the base computes with, the mask the kernel drew, all in fp64
    weight = (
        layer.base_layer.dequantizer(x, training=True) if hasattr(layer.base_layer, "dequantizer") else None
    )
    w = (weight(dtype) if weight else layer.base_layer.weight).double()
    if p:
        from shardtune.kernels import lora_kernel

        _, seed, offset = rng.replay(lambda: lora_kernel.reserve(x.reshape(-1, x.shape[-1]), p))
        keep = lora_kernel.keep_mask((x.numel() // x.shape[-1], x.shape[-1]), x.device, p, seed, offset)
        keep = keep.view(x.shape) * lora_kernel.keep_scale(p)
    else:
        keep = 1.0
    xr, ar, br = (t.detach().to(dtype).double().requires_grad_() for t in (x, a, b))
    ref = xr @ w.t() + layer.scaling[adapter] * ((xr * keep) @ ar.t()) @ br.t()
    ref.backward(g.double())
    refs = (ref, xr.grad, ar.grad, br.grad)
    names = ("out", "grad_x", "grad_a", "grad_b")
    result = {}
    for name, (fn, *ours) in runs.items():
        result[f"{name}_fn"] = fn
        result.update({f"{name}_{n}_rel_err": _rel(o, r) for n, o, r in zip(names, ours, refs, strict=True)})
    return result
