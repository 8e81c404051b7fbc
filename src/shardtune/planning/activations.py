"""What a decoder layer keeps for backward, and where: measured per layer (a layer of the real widths run on the
meta device, its saved tensors added up), then placed layer by layer as the run's activation settings say
(parallel.checkpointing.layer_plan): on the GPU, recomputed (only the layer's input kept), or offloaded to host
memory (nothing kept but the layers in flight; pinned host memory instead; time lost where the copies outlast
the compute they overlap)."""

from __future__ import annotations

import functools
import itertools

import torch

# Host <-> GPU copy rate (bytes/s, each direction; pinned memory, one GPU at a time): PCIe Gen5 x16 for H100 and
# H200, Gen4 x16 for the others, at 70% of the data sheet's 64 / 32 GB/s. Not yet measured here.
HOST_LINK = {"h200": 45e9, "h100": 45e9, "a100": 22e9, "a10g": 22e9, "l40s": 22e9, "l4": 22e9}
# pinned host memory per byte offloaded: torch's pinned allocator rounds every block up to a power of two
PINNED_ROUNDING = 1.5
# offloaded layers on the GPU at once: one computing, one copying (out in forward, back in backward)
IN_FLIGHT = 2
# per offloaded layer and micro-batch: the hooks' Python work and the copies' launches for its ~12 saved tensors
# (~30 us each), which no overlap hides; keeps a layer's activations where nothing is won by sending them away
OFFLOAD_FIXED_S = 0.4e-3


def gpu_activation_bytes(plan: str, boundary: float, per_layer: float, per_layer_whole: float) -> float:
    """GPU bytes of the activations under `plan` (parallel.checkpointing.layer_plan: a letter per layer). Kept
    layers (k) keep `per_layer` each; recomputed ones (r) only their input (`boundary`), and one at a time is
    recomputed whole in backward (`per_layer_whole`: its dropout masks kept, not drawn again); offloaded ones
    (o) keep nothing but the IN_FLIGHT ones (the topmost, which keeps its own, among them)."""
    kept, offloaded, recomputed = (plan.count(c) for c in "kor")
    whole = per_layer_whole if recomputed else 0.0
    return (kept + min(offloaded, IN_FLIGHT)) * per_layer + recomputed * boundary + whole


def host_activation_bytes(plan: str, per_layer: float) -> float:
    """Pinned host memory one process holds for its offloaded layers at the end of forward (the topmost o keeps
    its own on the GPU: offload.py)."""
    return PINNED_ROUNDING * max(0, plan.count("o") - 1) * per_layer


def offload_stall_s(plan: str, per_layer: float, layer_forward_s: float, gpu_name: str) -> float:
    """Seconds one micro-batch's forward and backward wait for copies (offload.py's order). Every o layer but
    the topmost (which keeps its own) sends its tensors out while the layers up to the next o compute forward
    (which waits for them), and gets them back while the layers from that next o down to it compute backward
    (twice the forward's work, three times for a recomputed layer): what the copy outlasts is waited for. The
    hooks' fixed cost is paid on every o layer, the topmost's too (its tensors still go through them)."""
    copy_s = per_layer / HOST_LINK[gpu_name.lower()]
    offloaded = [i for i, what in enumerate(plan) if what == "o"]
    stall = len(offloaded) * OFFLOAD_FIXED_S
    for a, b in itertools.pairwise(offloaded):
        units = sum(3 if plan[j] == "r" else 2 for j in range(a + 1, b + 1))
        stall += max(0.0, copy_s - (b - a) * layer_forward_s) + max(0.0, copy_s - units * layer_forward_s)
    return stall


@functools.cache
def layer_activation_bytes(
    hidden: int,
    inter: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    lora_key: tuple,
    tokens: int,
    seq: int,
    dtype: str = "bfloat16",
    adapter_dtype: str = "float32",
) -> int:
    """Bytes autograd saves for one decoder layer's backward, for `tokens` tokens in rows of `seq`: a layer of
    these widths (frozen weights in the compute `dtype`, LoRA adapters computing in `adapter_dtype`: fp32
    makes PEFT keep an fp32 copy of every adapter's input) runs on the meta device."""
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import AttentionInterface, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    AttentionInterface.register("shardtune_fused", _fused_attention)
    hf_config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_hidden_layers=1,
    )
    hf_config._attn_implementation = "shardtune_fused"
    r, alpha, dropout, chosen, fused, replay = lora_key
    with torch.device("meta"):
        compute = getattr(torch, dtype)
        layer = LlamaDecoderLayer(hf_config, 0).to(compute).requires_grad_(False)
        names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        targets = names if chosen == "all-linear" else [n for n in names if n in chosen]
        lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
        if fused:  # lora.fused: saves no copy of the adapters' inputs (fused_lora.py)
            from shardtune.kernels import fused_lora

            fused_lora.register(lora)
        layer = inject_adapter_in_model(lora, layer)
        if replay:  # only the adapters' inputs kept (the dropout kernel; selective recomputation)
            fused_lora.replay_dropout(layer)
        for name, p in layer.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(getattr(torch, adapter_dtype))
                p.requires_grad_(True)
        rows = max(1, tokens // seq)
        x = torch.empty(rows, seq, hidden, dtype=compute, requires_grad=True)
        positions = torch.arange(seq).unsqueeze(0).expand(rows, -1)
        cos, sin = (t.to(compute) for t in LlamaRotaryEmbedding(hf_config)(x, positions))
    shared = [*layer.parameters(), cos, sin]  # not the layer's own memory: weights, the model's RoPE table
    # PEFT's own forward under autocast gives every adapter its own bf16 copy of the input (autocast's cast of
    # PEFT's fp32 copy), where this count sees views of one input: count each view as the copy it is there
    return saved_bytes(lambda: layer(x, position_embeddings=(cos, sin)), shared, views_apart=not fused)


def saved_bytes(forward, shared: list[torch.Tensor], views_apart: bool = False) -> int:
    """Bytes of the tensors autograd keeps while `forward()` runs, each allocation counted once (a tensor and
    its views; with `views_apart` each view saved as its own), leaving out `shared` tensors and views of them
    (a weight's transpose costs no memory)."""
    skip = {id(t) for t in shared}
    kept: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor):
        root = t
        while root._base is not None:
            root = root._base
        if id(root) not in skip:
            held = t if views_apart else root
            kept[id(held)] = held  # holding it keeps its id unique until we are done
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(t.numel() * t.element_size() for t in kept.values())


class _FusedAttention(torch.autograd.Function):
    """Stands in for flash / memory-efficient attention when counting: saves q, k, v, the output and the
    per-row log-sum-exp, as those kernels do (no seq x seq matrix)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_attention(module, query, key, value, attention_mask, **kwargs):
    out = _FusedAttention.apply(query, key, value)
    return out.transpose(1, 2).contiguous(), None
