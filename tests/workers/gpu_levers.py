"""Each speed lever against the plain path on one GPU, on a 4-layer Llama-3-8B-width model (4-bit, LoRA r=16,
bf16): the same rows padded vs packed, Liger's fused kernels vs transformers' modules, adapters computing in
bf16 vs fp32, shardtune's one-kernel NF4 dequantization vs bitsandbytes', the fused LoRA update vs PEFT's
forward, and the fused update's dropout drawn again in backward vs kept. Prints one JSON line per comparison
(tests/gpu/test_gpu.py asserts on them)."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from levers import (
    batches,
    build,
    dropout_kernel_accuracy,
    loss_and_grads,
    one_function_accuracy,
    per_token_losses,
)

GPU = torch.device("cuda", 0)
BASE = {
    "model.name_or_path": "llama3-8b",
    "model.shape": {"num_hidden_layers": 4},
    "parallel.mixed_precision": "bf16",
}
LENGTHS = [700, 93, 1500, 260]
BF16 = torch.bfloat16


def grad_agreement(a: dict, b: dict) -> float:
    """The worst cosine similarity between two sets of adapter gradients."""
    return min(
        torch.nn.functional.cosine_similarity(a[k].flatten().double(), b[k].flatten().double(), dim=0).item()
        for k in a
        if a[k].abs().max() > 0
    )


def report(name: str, loss_a: float, loss_b: float, ga: dict, gb: dict, **extra) -> None:
    print(
        json.dumps(
            {
                "check": name,
                "loss_rel_diff": abs(loss_a - loss_b) / abs(loss_a),
                "min_grad_cosine": grad_agreement(ga, gb),
                **extra,
            }
        ),
        flush=True,
    )


_, model = build(BASE, GPU)
padded, packed = batches(LENGTHS, 128256, 0, GPU)
a, b = per_token_losses(model, padded, BF16), per_token_losses(model, packed, BF16)
la, ga = loss_and_grads(model, padded, BF16)
lb, gb = loss_and_grads(model, packed, BF16)
report(
    "packed-vs-padded", la, lb, ga, gb, per_token_max_abs_diff=(a - b).abs().max().item(), tokens=a.numel()
)

l32, g32 = loss_and_grads(model, padded, None)
report("adapters-bf16-vs-fp32", l32, la, g32, ga)

# sdpa_varlen (varlen.py): the packed rows through torch's varlen Flash kernel, row by row, against the padded
# rows through SDPA above; the same weights (same seed)
from shardtune.kernels import varlen  # noqa: E402

_, model_varlen = build(BASE, GPU, attn=varlen.NAME)


def kernel_calls() -> int:
    info = varlen._kernel.cache_info()  # every call of the kernel looks it up
    return info.hits + info.misses


varlen.available()  # its first call looks the kernel up too: made here, outside the count
calls = kernel_calls()
c = per_token_losses(model_varlen, packed, BF16)
lv, gv = loss_and_grads(model_varlen, packed, BF16)
report(
    "varlen-packed-vs-padded",
    la,
    lv,
    ga,
    gv,
    per_token_max_abs_diff=(a - c).abs().max().item(),
    kernel_calls=kernel_calls() - calls,  # 4 layers x 2 forwards when it ran
)
del model_varlen
torch.cuda.empty_cache()

# shardtune's Linear4bit (one-kernel dequantization, nf4.py) against bitsandbytes' own forward. One layer's
# matmuls are deterministic: output and input gradient bit-identical. Through the whole model the backward is
# not (attention's kernels sum in varying order), so there: the same loss, and gradients as close as two runs
# of bitsandbytes' own path are to each other.
import bitsandbytes as bnb  # noqa: E402

from shardtune.kernels import nf4  # noqa: E402

swapped = [m for m in model.modules() if type(m) is nf4.Linear4bit]
x = torch.randn(2, 1600, 4096, device=GPU, dtype=BF16, requires_grad=True)
down = next(m for m in swapped if m.in_features == 14336)
x_down = torch.randn(2, 1600, 14336, device=GPU, dtype=BF16, requires_grad=True)
layer_outs = []
for cls in (nf4.Linear4bit, bnb.nn.Linear4bit):
    for m in swapped:
        m.__class__ = cls
    outs = []
    for module, inp in ((swapped[0], x), (down, x_down)):
        inp.grad = None
        y = module(inp)
        y.backward(torch.ones_like(y) * 1e-2)
        outs += [y, inp.grad.clone()]
    layer_outs.append(outs)
l_bnb, g_bnb = loss_and_grads(model, padded, BF16)
l_bnb2, g_bnb2 = loss_and_grads(model, padded, BF16)
print(
    json.dumps(
        {
            "check": "nf4-kernel-vs-bitsandbytes",
            "modules": len(swapped),
            "layer_bit_identical": all(torch.equal(a, b) for a, b in zip(*layer_outs, strict=True)),
            "loss_equal": l_bnb == la,
            "min_grad_cosine": grad_agreement(g_bnb, ga),
            "bnb_rerun_min_grad_cosine": grad_agreement(g_bnb, g_bnb2),
        }
    ),
    flush=True,
)
del model
torch.cuda.empty_cache()

# the model above has lora.fused (the default); PEFT's own forward on the same rows. No dropout: CUDA's
# dropout draws other masks for PEFT's fp32 copy of the input than for the bf16 input
_, peft = build({**BASE, "lora.fused": False}, GPU)
l_peft, g_peft = loss_and_grads(peft, padded, BF16)
report("lora-fused-vs-peft", l_peft, la, g_peft, ga)
del peft
torch.cuda.empty_cache()

_, fused = build({**BASE, "model.fused_kernels": True}, GPU)
lf, gf = loss_and_grads(fused, padded, BF16, fused=True)
lfp, gfp = loss_and_grads(fused, packed, BF16, fused=True)
report("fused-vs-plain", la, lf, ga, gf)
report("fused-packed-vs-plain-padded", la, lfp, ga, gfp)

# Without Triton, selective recomputation draws each adapter's dropout mask again in backward instead of keeping
# it: against dropout + the adapter's matmul as autograd runs them, at the 70B MLP's input width (dropout 0.05)
from shardtune.kernels import fused_lora  # noqa: E402

lora_a = torch.nn.Linear(28672, 16, bias=False, device=GPU)
dropout = torch.nn.Dropout(0.05).train()
x0 = torch.randn(2, 3072, 28672, device=GPU, dtype=BF16)
outs = []
for replayed in (False, True):
    lora_a.zero_grad()
    x = x0.clone().requires_grad_()
    torch.manual_seed(11)
    with torch.autocast("cuda", dtype=BF16):
        if replayed:  # what _adapter_input runs without Triton
            with torch.autocast("cuda", enabled=False):
                h = fused_lora._DroppedMatmul.apply(x, lora_a.weight.to(BF16), 0.05, BF16)
        else:
            h = lora_a(dropout(x))
    (h.float() * torch.linspace(-1, 1, 16, device=GPU)).sum().backward()
    outs.append((h, x.grad, lora_a.weight.grad, torch.rand(1, device=GPU)))
print(
    json.dumps(
        {
            "check": "lora-dropout-replayed-vs-kept",
            **{
                k: torch.equal(a, b)
                for k, a, b in zip(("output", "grad_x", "grad_a", "rng_after"), *outs, strict=True)
            },
        }
    ),
    flush=True,
)

# The dropout kernel (lora_kernel.py, what the fused layers run on a GPU): output and both gradients against
# dropout with the kernel's own mask in fp64, beside autograd's bf16 dropout + linear with that mask; the same
# random state draws the same numbers; the generator moves on; the keep rate is 1 - p.
print(
    json.dumps({"check": "lora-dropout-kernel", **dropout_kernel_accuracy(6144, 28672, 16, GPU)}), flush=True
)

# The dropout kernel under activation checkpointing: each layer recomputed in backward draws the same keep bits
# (torch.utils.checkpoint restores the CUDA generator, whose seed and offset the kernel draws from). The same
# loss, gradients as close as a rerun without checkpointing is (attention's backward), and unlike another draw's.
del fused
torch.cuda.empty_cache()
models = {}
for name, extra in (("plain", {}), ("checkpointed", {"parallel.activation_checkpointing": True})):
    models[name] = build({**BASE, "lora.dropout": 0.05, **extra}, GPU)[1].train()
runs = {}
for name, model_name, seed in (
    ("a", "plain", 7),
    ("rerun", "plain", 7),
    ("ckpt", "checkpointed", 7),
    ("other", "plain", 8),
):
    torch.manual_seed(seed)
    runs[name] = loss_and_grads(models[model_name], padded, BF16)
report(
    "dropout-kernel-checkpointed-vs-not",
    runs["a"][0],
    runs["ckpt"][0],
    runs["a"][1],
    runs["ckpt"][1],
    loss_equal=runs["a"][0] == runs["ckpt"][0],
    rerun_min_grad_cosine=grad_agreement(runs["a"][1], runs["rerun"][1]),
    other_draw_min_grad_cosine=grad_agreement(runs["a"][1], runs["other"][1]),
)

# Base and adapter in one Function (fused_lora._LinearWithAdapter) against the separate path through the model
# (dropout 0.05): the same loss, gradients as close as a rerun's
from unittest import mock  # noqa: E402

torch.manual_seed(7)
with mock.patch.object(fused_lora, "_with_base", lambda *_: None):
    separate = loss_and_grads(models["plain"], padded, BF16)
report(
    "one-function-vs-separate-model",
    runs["a"][0],
    separate[0],
    runs["a"][1],
    separate[1],
    rerun_min_grad_cosine=grad_agreement(runs["a"][1], runs["rerun"][1]),
)

# and in one NF4 layer (the MLP's down projection: the update added in the base matmul's epilogue, the input
# gradients summed in the backward matmul's), with and without the dropout kernel, both against fp64
down = next(
    m for m in models["plain"].modules() if type(m).__name__ == "FusedLinear" and m.in_features == 14336
)
torch.manual_seed(12)
x = torch.randn(2, 1600, 14336, device=GPU, dtype=BF16)
g = torch.randn(2, 1600, 4096, device=GPU, dtype=BF16)
for p in (0.0, 0.05):
    print(json.dumps({"check": f"one-function-p{p}", **one_function_accuracy(down, x, g, p)}), flush=True)
