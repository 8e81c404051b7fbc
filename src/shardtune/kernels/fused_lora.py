"""LoRA layers whose update is added to the base layer's output inside one matmul.

PEFT's `Linear.forward` computes `result + lora_B(lora_A(dropout(x.to(fp32)))) * scaling`: under autocast
the input is cast up to the adapters' fp32 and back down to bf16 by autocast (two copies of every adapter's
input, one of them kept for backward), and the update takes three passes over an output-sized tensor (B's
output, the scaling, the sum) plus one more in backward (the scaling's gradient). For Llama-3-70B's MLP
that is 700 MB per pass per 12k tokens, per adapter. Here the input goes to the adapter as it is (autocast
computes in bf16 either way) and the update is one `addmm(result, h, B^T, alpha=scaling)`: the scaling
goes into the matmul and the sum into its epilogue, so the output is read and written once.

With LoRA dropout, PEFT keeps for backward a dropped copy of the input and its mask for every adapter (q, k
and v each drop the same input), on top of the input itself: 0.4 GiB per 3072-token row per Llama-3-70B
layer, 30% of the layer's activations. On a GPU the adapter's first matmul draws its dropout inside a Triton
kernel instead (lora_kernel.py): nothing kept but the input, shared, and fewer passes over it (-30 GiB and
+1% on the 70B widths at micro-batch 4, one H200, bench/results/2026-12-01-1xh200-dropout-kernel); its masks
are its own draws, not torch's. Without Triton (the CPU), parallel.activation_checkpointing=selective
(replay_dropout()) keeps only the input too and draws the same mask again in backward from the random state
it was drawn with, as activation checkpointing replays dropout: one more elementwise pass per adapter.

With one adapter on a frozen base whose dense weight is at hand (shardtune's NF4 Linear4bit on a GPU, or an
unquantized nn.Linear) and the dropout drawn by that kernel or none, base and adapter run as one Function
(_LinearWithAdapter): the update goes into the base matmul's output in place (out-of-place addmm first copies
its input: one output-sized copy per layer), and backward adds the base's input gradient to the adapter's in
the matmul's epilogue instead of autograd summing the two in a separate pass (+2.3% on the 80-layer 70B at one
row and on the 70B widths at four, one H200, bench/results/2026-12-01-1xh200-one-function).

The adapters, their names, initialization and saved files are PEFT's own, and off the GPU its dropout draws:
only the arithmetic's rounding differs (the update's sum is rounded once instead of three times; in one
Function, the input gradients' sum once instead of twice).
Registered through PEFT's custom-module hook (`LoraConfig._register_custom_module`); what it does not cover
(merged or disabled adapters, mixed-adapter batches, DoRA and other variants, a bias on B, an input whose
dtype PEFT would cast outside autocast) runs PEFT's forward unchanged.
"""

from __future__ import annotations

import contextlib

import torch
from peft.tuners.lora import Linear as PeftLinear
from torch import nn

from shardtune.kernels import triton_available


class FusedLinear(PeftLinear):
    """PEFT's LoRA `Linear` (also around bitsandbytes' Linear4bit, a subclass of nn.Linear), fused forward."""

    replay_dropout = False  # draw the dropout mask again in backward (replay_dropout(); without the kernel)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if (
            self.disable_adapters
            or self.merged
            or kwargs.get("adapter_names") is not None
            or self.lora_variant
        ):
            return super().forward(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A]
        autocast = x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type)  # not meta
        for a in active:
            if self.lora_B[a].bias is not None or not (autocast or self.lora_A[a].weight.dtype == x.dtype):
                return super().forward(x, *args, **kwargs)  # PEFT would cast the input: keep its numerics
        if len(active) == 1 and not args and not kwargs:
            fused = _with_base(self, active[0], x, autocast)
            if fused is not None:
                return fused
        result = self.base_layer(x, *args, **kwargs)
        out = result.reshape(-1, result.shape[-1])
        for a in active:
            h = _adapter_input(x, self.lora_dropout[a], self.lora_A[a], autocast, self.replay_dropout)
            out = torch.addmm(
                out, h.reshape(-1, h.shape[-1]), self.lora_B[a].weight.t(), alpha=self.scaling[a]
            )
        return out.view(result.shape).to(result.dtype)


def replay_dropout(module: nn.Module) -> None:
    """The fused LoRA layers in `module` draw their dropout masks again in backward from then on."""
    for m in module.modules():
        if isinstance(m, FusedLinear):
            m.replay_dropout = True


def _drop_probability(dropout: nn.Module) -> float:
    """The LoRA dropout's probability as it runs now (PEFT's module: nn.Dropout, or nn.Identity for none)."""
    return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _dropout_kernel_runs(x: torch.Tensor) -> bool:
    """Whether lora_kernel.py draws the dropout for an input x (a GPU with Triton)."""
    return x.device.type == "cuda" and triton_available()


def _adapter_input(
    x: torch.Tensor, dropout: nn.Module, lora_a: nn.Linear, autocast: bool, replay: bool
) -> torch.Tensor:
    """lora_A(dropout(x)) as PEFT computes it (the same mask draws, the matmul in the same dtype); with
    `replay`, keeping for backward only x (shared by the adapters that read it), not a dropped copy and mask
    per adapter."""
    p = _drop_probability(dropout)
    kernel = _dropout_kernel_runs(x)
    replay = replay and x.device.type in ("cuda", "cpu", "meta")
    if p == 0.0 or not torch.is_grad_enabled() or not (kernel or replay):
        return lora_a(dropout(x))
    weight = lora_a.weight
    if autocast:  # what autocast does to nn.Linear's operands, here outside the Function so that autograd
        dtype = torch.get_autocast_dtype(x.device.type)  # carries the gradient back to the fp32 weight
        weight = weight.to(dtype)
    else:
        dtype = weight.dtype
    with _no_autocast(x.device):
        if kernel:  # the mask drawn inside the matmul (lora_kernel.py): nothing but x kept, in any mode
            from shardtune.kernels import lora_kernel

            return lora_kernel.DroppedMatmul.apply(x.to(dtype), weight, p)
        return _DroppedMatmul.apply(x, weight, p, dtype)


def _with_base(layer: FusedLinear, adapter: str, x: torch.Tensor, autocast: bool) -> torch.Tensor | None:
    """The layer's output through _LinearWithAdapter, where it applies (training; a frozen base without bias
    whose dense weight is at hand: shardtune's NF4 Linear4bit on a GPU, or an unquantized nn.Linear; the
    dropout drawn by lora_kernel or none), else None."""
    base, a, b = layer.base_layer, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    p = _drop_probability(layer.lora_dropout[adapter])
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else a.dtype
    if not torch.is_grad_enabled() or base.bias is not None or (p and not _dropout_kernel_runs(x)):
        return None
    from shardtune.kernels import nf4

    if isinstance(base, nf4.Linear4bit):
        dense = base.dequantizer(x, training=True) if base.compute_dtype == dtype else None
        out_dtype = x.dtype  # what nf4.Linear4bit returns
    elif type(base) is nn.Linear and not base.weight.requires_grad:
        weight = base.weight  # (a reference: under FSDP the same storage is refilled before backward)
        dense = lambda dt: weight.to(dt)  # noqa: E731
        out_dtype = dtype  # what nn.Linear returns (autocast, or x's dtype, equal to the adapter's)
    else:
        return None
    if dense is None:
        return None
    with _no_autocast(x.device):
        out = _LinearWithAdapter.apply(
            x.to(dtype), dense, a.to(dtype), b.to(dtype), layer.scaling[adapter], p
        )
    return out.to(out_dtype)


class _LinearWithAdapter(torch.autograd.Function):
    """linear(x, W) + scaling * dropout(x) @ A^T @ B^T for a frozen W, as one Function: the update added into
    the base matmul's output in place (addmm_: no copy of it, as out-of-place addmm makes), and in backward the
    base's input gradient added the same way into the adapter's (no separate pass to sum the two, which
    autograd makes for every adapted layer). W comes from `dense(dtype)` in forward and again in backward (NF4
    dequantized, never kept); x, A, B and x @ A^T (r columns) are kept, as the separate path keeps them. The
    dropout mask is lora_kernel's, drawn inside its matmuls."""

    @staticmethod
    def forward(ctx, x, dense, a, b, scaling, p):
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.mm(x2, dense(x.dtype).t())
        ctx.draw = None
        if p:
            from shardtune.kernels import lora_kernel

            x2 = x2.contiguous()
            ctx.draw = lora_kernel.reserve(x2, p)
            h = lora_kernel.forward(x2, a.contiguous(), *ctx.draw)
        else:
            h = torch.mm(x2, a.t())
        out.addmm_(h, b.t(), alpha=scaling)
        ctx.dense, ctx.scaling = dense, scaling
        ctx.save_for_backward(x, a, b, h)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, a, b, h = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        g = grad.reshape(-1, grad.shape[-1]).to(x.dtype)
        grad_b = torch.mm(g.t(), h).mul_(ctx.scaling)
        gh = torch.mm(g, b).mul_(ctx.scaling)  # the gradient of x @ A^T
        need_x = ctx.needs_input_grad[0]  # not for the first layer's input (the frozen embeddings')
        if ctx.draw:
            from shardtune.kernels import lora_kernel

            grad_x, grad_a = lora_kernel.backward(
                x2.contiguous(), a.contiguous(), gh.contiguous(), *ctx.draw, grad_x=need_x
            )
        else:
            grad_a = torch.mm(gh.t(), x2)
            grad_x = torch.mm(gh, a) if need_x else None
        if need_x:
            grad_x = grad_x.addmm_(g, ctx.dense(g.dtype)).view(x.shape)
        return grad_x, None, grad_a, grad_b, None, None


def _no_autocast(device: torch.device):
    # (the meta device, where shardtune plan counts what backward keeps, has no autocast)
    return torch.autocast(device.type, enabled=False) if device.type != "meta" else contextlib.nullcontext()


class _RandomState:
    """The random state of x's device, to draw the same dropout mask again later without disturbing what
    comes after (what torch.utils.checkpoint's preserve_rng_state does, for one device)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.state = self._get()

    def _get(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device) if self.cuda else torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.cuda:
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    def replay(self, draw):
        now = self._get()
        self._set(self.state)
        try:
            return draw()
        finally:
            self._set(now)


def _dropout(x: torch.Tensor, p: float):
    """F.dropout(x, p) in training, drawn exactly as it draws (the fused kernel on CUDA, a Bernoulli draw on
    the CPU: at::dropout), and the function that applies the same mask to a gradient."""
    if x.device.type == "cuda":
        out, mask = torch.ops.aten.native_dropout(x, p, True)
        return out, lambda g: torch.ops.aten.native_dropout_backward(g, mask, 1.0 / (1.0 - p))
    noise = torch.empty_like(x).bernoulli_(1.0 - p).div_(1.0 - p)
    return x * noise, lambda g: g * noise


class _DroppedMatmul(torch.autograd.Function):
    """linear(dropout(x, p).to(dtype), weight) that saves x and the random state, not the dropped copy and mask."""

    @staticmethod
    def forward(ctx, x, weight, p, dtype):
        ctx.rng = _RandomState(x.device)
        dropped, _ = _dropout(x, p)
        ctx.p, ctx.dtype = p, dtype
        ctx.save_for_backward(x, weight)
        return nn.functional.linear(dropped.to(dtype), weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        with _no_autocast(x.device):  # a CPU backward may run inside the autocast
            dropped, mask = ctx.rng.replay(lambda: _dropout(x, ctx.p))
            g = grad.reshape(-1, grad.shape[-1])
            # the products autograd's matmul backward computes (the same kernels, the same rounding)
            grad_weight = g.t().mm(dropped.reshape(-1, x.shape[-1]).to(ctx.dtype))
            grad_x = None
            if ctx.needs_input_grad[0]:  # not for the first layer's input (the frozen embeddings')
                grad_x = mask(g.mm(weight).view(x.shape).to(x.dtype))
        return grad_x, grad_weight, None, None


def register(lora_config) -> None:
    """Make PEFT build FusedLinear for every linear layer it adapts."""
    lora_config._register_custom_module({torch.nn.Linear: FusedLinear})
