"""Each speed lever against the plain path on one GPU, on a 4-layer Llama-3-8B-width model (4-bit, LoRA r=16,
bf16): the same rows padded vs packed, Liger's fused kernels vs transformers' modules, adapters computing in
bf16 vs fp32, the fused LoRA update vs PEFT's forward. Prints one JSON line
per comparison (tests/gpu/test_gpu.py asserts on them)."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from levers import batches, build, loss_and_grads, per_token_losses

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
