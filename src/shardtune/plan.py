"""`shardtune plan`: will this configuration fit, and how long will it take, before any GPU is touched.

    shardtune plan recipes/llama3_70b.py --gpus 4 --gpu-mem 24GiB [--nodes 1] [--host-ram 128GiB] [--fit]

Memory per GPU is the sum of parts that follow from the shapes and the way shardtune shards (parallel.py):

- the frozen base, sharded: 4-bit bytes of every linear layer (0.5 byte per weight), norms, embeddings and
  the output head, divided by the number of GPUs; the 4-bit quantization statistics (absmax, kept whole by
  every rank on the module); with CPU offload the shards live in host memory instead;
- what FSDP gathers while computing: the root unit (embeddings and head) stays whole from the forward to
  the end of the backward; one decoder layer at a time plus one prefetched; bitsandbytes dequantizes each
  weight to the compute dtype for its matmul;
- the adapters, whole on every GPU: fp32 weights, gradients and two AdamW moments (16 bytes each);
- activations: what autograd saves for one decoder layer is *measured*, by running a layer of the real
  widths on the meta device (no memory, no GPU) and adding up the tensors it keeps for the backward, with
  attention saving what a fused kernel saves; with activation checkpointing every layer keeps its input
  and one layer is recomputed at a time;
- logits and the loss: the output head's bf16 logits, their fp32 copy and log-softmax, and their gradient.

Time: the step's model FLOPs (4N + 3A per token, metrics.py) over the GPU's dense bf16 peak times an
efficiency measured on H200s by width and micro-batch (bench/results/); a rough figure, labelled as such.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import torch

from shardtune.config import Config, ConfigError, apply_overrides

GIB = 2**30

# Dense bf16 matmul rates (FLOP/s) of GPUs users name with --gpu: what MFU is measured against. H100/H200: the
# rate measured on them (metrics.MEASURED_PEAK_FLOPS); the others: the data-sheet peak times the H200's
# measured/data-sheet ratio (0.8).
GPU_PEAKS = {"h200": 790e12, "h100": 790e12, "a100": 250e12, "a10g": 56e12, "l40s": 290e12, "l4": 97e12}
# Memory of one GPU (what torch reports as total), for choices made without --gpu-mem.
GPU_MEMORY = {
    k: v * GIB
    for k, v in {"h200": 139.8, "h100": 79.1, "a100": 79.1, "a10g": 22.0, "l40s": 44.4, "l4": 22.0}.items()
}
# Model-FLOP utilization without recomputation, by layer width: the best MFU, and the micro-batch (tokens) at
# which half of it is lost to fixed per-step costs (kernel launches, FSDP hooks, the 4-bit dequantization of
# every weight). 8192: fitted to one H200 with lora.fused, the one-kernel NF4 dequantization, the LoRA
# dropout kernel and base + adapter in one Function (bench/results/2026-12-01-1xh200-one-function: 73.0% at
# 12,288 tokens, 68.2% at 3,072), less the 2% FSDP cost across 2 GPUs; 4096: the same on one H200 at 12,288
# tokens (64.3%, .../kernel1), less 2%, the half-point kept from the 2x H200 runs (2026-11-23-2xh200-c).
MEASURED_MFU = ((8192, 0.733, 295), (4096, 0.707, 1500), (0, 0.20, 1500))
OFFLOAD_SLOWDOWN = 1.34  # CPU offload, measured on the 80-layer 70B (bench/results/2026-11-23-2xh200)
# The base whole on every GPU (NO_SHARD) instead of sharded: MEASURED_MFU has FULL_SHARD's 2% in it; NO_SHARD's
# wrapping costs 0.3% (one H200, bench/results/2026-12-02-1xh200-gc) and the adapters' gradient all-reduce
# ~0.2% (0.8 GB at the 300 GB/s measured between two H200s, per 1.6 s step). Projected, not yet measured on 2.
WHOLE_BASE_SPEEDUP = 1.015


def expected_mfu(
    hidden: int, tokens: int, recomputed: float, offload: bool, whole_base: bool = False
) -> float:
    """MFU to expect: the width's measured best, less for small micro-batches, less again for the forward
    recomputed in backward (4N + 2N·share FLOPs done for 4N counted), and for CPU offload; a little more with
    the base whole on every GPU (no all-gathers)."""
    best, half = next((b, h) for width, b, h in MEASURED_MFU if hidden >= width)
    mfu = best * tokens / (tokens + half) * (WHOLE_BASE_SPEEDUP if whole_base else 1.0)
    return mfu * 4 / (4 + 2 * recomputed) / (OFFLOAD_SLOWDOWN if offload else 1.0)


@dataclass
class Shape:
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, conf) -> Shape:
        heads = conf.num_attention_heads
        return cls(
            conf.hidden_size,
            conf.intermediate_size,
            conf.num_hidden_layers,
            heads,
            getattr(conf, "num_key_value_heads", None) or heads,
            getattr(conf, "head_dim", None) or conf.hidden_size // heads,
            conf.vocab_size,
            bool(getattr(conf, "tie_word_embeddings", False)),
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every linear layer of one decoder layer, by PEFT's module names."""
        d, f, q, kv = self.hidden, self.inter, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (d, q),
            "k_proj": (d, kv),
            "v_proj": (d, kv),
            "o_proj": (q, d),
            "gate_proj": (d, f),
            "up_proj": (d, f),
            "down_proj": (f, d),
        }

    @property
    def layer_weights(self) -> int:
        return sum(i * o for i, o in self.linears().values())

    @property
    def root_weights(self) -> int:
        """Embeddings and output head (one matrix when tied), final norm."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


def lora_parameters(shape: Shape, r: int, targets) -> int:
    names = shape.linears()
    chosen = names if targets == "all-linear" else {k: v for k, v in names.items() if k in set(targets)}
    return shape.layers * sum(r * (i + o) for i, o in chosen.values())


@dataclass
class Estimate:
    """One configuration's prediction; bytes unless named otherwise."""

    settings: dict
    gpu: dict[str, float] = field(default_factory=dict)  # part -> bytes per GPU at the training peak
    eval_bytes: float = 0.0  # per GPU during an eval forward (no activations kept, a batch of logits)
    host: dict[str, float] = field(default_factory=dict)  # phase -> bytes per node
    checkpoint_bytes: float = 0.0
    step_s: float = 0.0
    tokens_per_s_per_gpu: float = 0.0
    total_s: float = 0.0

    @property
    def gpu_peak(self) -> float:
        return max(sum(self.gpu.values()), self.eval_bytes)


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
    conf = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_hidden_layers=1,
    )
    conf._attn_implementation = "shardtune_fused"
    r, alpha, dropout, chosen, fused, replay = lora_key
    with torch.device("meta"):
        compute = getattr(torch, dtype)
        layer = LlamaDecoderLayer(conf, 0).to(compute).requires_grad_(False)
        names = list(Shape(hidden, inter, 1, heads, kv_heads, head_dim, 1, False).linears())
        targets = names if chosen == "all-linear" else [n for n in names if n in chosen]
        lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
        if fused:  # lora.fused: saves no copy of the adapters' inputs (fused_lora.py)
            from shardtune import fused_lora

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
        cos, sin = (t.to(compute) for t in LlamaRotaryEmbedding(conf)(x, positions))
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


def estimate(cfg: Config, conf, gpus: int, nodes: int = 1, gpu_name: str = "h200") -> Estimate:
    """Predicted memory and time of one configuration on `gpus` GPUs in total."""
    from shardtune.metrics import step_flops
    from shardtune.modeling import fused_kernels, lora_fused, matmul_parameters
    from shardtune.parallel import checkpointed_every, checkpointed_fraction

    s = Shape.of(conf)
    n = max(gpus, 1)
    mb, seq = cfg.train.micro_batch_size, cfg.data.max_len
    tokens = cfg.train.micro_batch_tokens or mb * seq  # a token budget is what one forward holds at most
    compute = 2  # bf16 / fp16 bytes; fp32 runs cost twice (rare on GPUs)
    if cfg.param_dtype == "float32":
        compute = 4
    double_quant = cfg.quant.double_quant
    lin = s.layers * s.layer_weights
    norms = s.layers * 2 * s.hidden
    # the GPUs the frozen base is sharded over: NO_SHARD keeps it whole on each (no all-gathers), HYBRID_SHARD
    # shards it within a node
    shards = {"NO_SHARD": 1, "HYBRID_SHARD": max(1, n // max(nodes, 1))}.get(
        cfg.parallel.sharding_strategy, n
    )
    base_shard = (lin * 0.5 + norms * compute + s.root_weights * compute) / shards
    # absmax per 64 weights: one byte with double quantization (plus fp32 per 256 blocks), else fp32
    quant_state = lin / 64 * (1 + 4 / 256 if double_quant else 4)
    layer_full = s.layer_weights * 0.5 + 2 * s.hidden * compute
    lora = lora_parameters(s, cfg.lora.r, cfg.lora.target_modules)
    every = checkpointed_every(cfg.parallel)  # 0: nothing recomputed
    recomputed = checkpointed_fraction(cfg.parallel, s.layers)
    offload = cfg.parallel.cpu_offload and n > 1  # one process trains the plain module (parallel.py)
    # 'auto' on a GPU: on when liger-kernel is installed here (plan where the job's environment is)
    fused = cfg.model.fused_kernels is True or fused_kernels(cfg, conf, "cuda")
    # Liger's SwiGLU keeps no activation output (recomputed in backward) and its RMSNorm no fp32 copy of the
    # input (two norms per layer)
    liger = tokens * (s.inter * compute + 2 * s.hidden * 4) if fused else 0
    lora_key = (
        cfg.lora.r,
        cfg.lora.alpha,
        cfg.lora.dropout,
        _target_key(cfg.lora.target_modules),
        lora_fused(cfg),
    )
    adapter_dtype = cfg.param_dtype if cfg.lora.compute_dtype == "auto" else "float32"
    widths = (s.hidden, s.inter, s.heads, s.kv_heads, s.head_dim)

    # a token budget's micro-batch is one packed sequence of that many tokens (rows of data.max_len would round
    # it down to whole rows)
    row = tokens if cfg.train.micro_batch_tokens else seq

    def per_layer(replay: bool) -> float:
        key = (*lora_key, replay)
        return layer_activation_bytes(*widths, key, tokens, row, cfg.param_dtype, adapter_dtype) - liger

    replay = keeps_inputs_only(cfg)
    boundary = tokens * s.hidden * compute
    gpu = {
        "4-bit base shard": 0.0 if offload else base_shard,
        "4-bit statistics (whole)": quant_state,
        # the root unit stays gathered from forward to backward (FSDP1 does not reshard the root); its own
        # shard is counted above unless offloaded (measured: -20% without this on the offloaded 80-layer 70B)
        "embeddings + head, gathered": s.root_weights * compute * (1 if offload else (shards - 1) / shards),
        "2 decoder layers, gathered": 2 * layer_full if shards > 1 else 0.0,
        "dequantized weights (2 matmuls)": 2 * max(i * o for i, o in s.linears().values()) * compute,
        # FSDP leaves the adapters whole on every rank; ZeRO-3 partitions them with their gradients and AdamW
        **(
            {"adapters + grads + AdamW (whole)": 16 * lora}
            if cfg.parallel.backend == "fsdp"
            else {"adapters + grads + AdamW (partitioned)": 16 * lora / n}
        ),
        "activations": _activations(
            s.layers,
            recomputed,
            boundary,
            per_layer(replay),
            per_layer(False),
        ),
        # bf16 logits, their fp32 copy and log-softmax, then the fp32 gradient: ~12 bytes per logit at the peak;
        # Liger's fused loss holds one chunk of fp32 logits (about tokens x hidden values) and the head's input
        # gradient
        "logits + loss": 12 * tokens * s.hidden if fused else 12 * tokens * s.vocab,
    }
    # evaluation: the same weights, no activations kept, an eval batch of bf16 logits, their fp32 copy and
    # log-softmax (10 bytes per logit; measured: rank 0 of an 8B run peaked 6.3 GiB higher evaluating 4 rows)
    eval_rows = min(cfg.eval.batch_size, cfg.eval.max_rows or cfg.eval.batch_size)
    static = sum(v for k, v in gpu.items() if k not in ("activations", "logits + loss"))
    eval_bytes = static + 10 * eval_rows * seq * s.vocab
    host = {
        # one decoder layer's weights at a time while loading (loading.py), plus the process itself
        "load": 2 * GIB + s.layer_weights * 2,
        # the offloaded shard, pinned in place (parallel.lean_offload), plus the pinned allocator's rounding up
        # to powers of two: 1.4-1.7x the shard measured (bench/results/2026-11-23-1xh200-fusedlora; FSDP1's own
        # buffers took 3.4x)
        "train": 2 * GIB + (1.7 * base_shard if offload else 0.0),
        # the checkpoint is staged through host memory by the rank that writes it
        "save": 2 * GIB + 12 * lora,
    }
    per_node = max(1, n // max(nodes, 1))
    host = {k: v * per_node for k, v in host.items()}
    n_matmul = matmul_parameters(conf)
    flops_per_row = step_flops(n_matmul, s.layers, s.hidden, seq, seq * seq, False)[0]
    rows_per_step = cfg.train.global_batch_size
    mfu = expected_mfu(s.hidden, tokens, recomputed, offload, whole_base=shards == 1 and n > 1)
    peak = GPU_PEAKS[gpu_name.lower()]  # the CLI offers only these names
    step_s = flops_per_row * rows_per_step / (n * peak * mfu)
    steps = cfg.train.max_steps or 0
    size = "train.micro_batch_tokens" if cfg.train.micro_batch_tokens else "train.micro_batch_size"
    settings = {
        size: cfg.train.micro_batch_tokens or mb,
        "parallel.activation_checkpointing": bool(every),
        "parallel.checkpoint_every": every or 1,
        "parallel.cpu_offload": offload,
    }
    if n > 1 and cfg.parallel.backend == "fsdp":
        settings["parallel.sharding_strategy"] = cfg.parallel.sharding_strategy
    return Estimate(
        settings=settings,
        gpu=gpu,
        host=host,
        eval_bytes=eval_bytes,
        checkpoint_bytes=12 * lora,  # fp32 adapters + two AdamW moments
        step_s=step_s,
        tokens_per_s_per_gpu=rows_per_step * seq / step_s / n,
        total_s=step_s * steps,
    )


def _activations(
    layers: int, recomputed: float, boundary: float, per_layer: float, per_layer_whole: float
) -> float:
    """Checkpointed layers (the `recomputed` share) keep only their input (`boundary`); the others keep
    `per_layer` each; one checkpointed layer at a time is recomputed whole in backward (`per_layer_whole`: its
    dropout masks are kept, not drawn again)."""
    if not recomputed:
        return layers * per_layer
    n = round(recomputed * layers)
    return n * boundary + (layers - n) * per_layer + per_layer_whole


def keeps_inputs_only(cfg: Config) -> bool:
    """Whether the LoRA layers with dropout keep for backward only their inputs, not a dropped copy and a mask
    per adapter: the fused layers do on a GPU (the dropout kernel, lora_kernel.py), which is what the plan is
    for (on a CPU, only with parallel.activation_checkpointing=selective)."""
    from shardtune.modeling import lora_fused

    return lora_fused(cfg) and cfg.lora.dropout > 0


# Checkpointing choices, least recomputation first: none, then every k-th layer, then all. ('selective' is
# 'none' on a GPU: the dropout kernel already keeps no dropout masks.)
CHECKPOINT_CHOICES = ((False, 1), (True, 4), (True, 3), (True, 2), (True, 1))
AUTO_MARGIN = 0.85  # of the GPU's memory: fragmentation, and the plan's worst underestimate measured (-11%)


def auto_choices(cfg: Config, gpus: int, nodes: int = 1) -> list[dict]:
    """The settings `cfg` leaves to 'auto' (parallel.activation_checkpointing, parallel.sharding_strategy), each
    combination as overrides, the fastest first: less recomputation first (a recomputed share s of the layers
    costs 4/(4 + 2s) of the step: every 4th layer 11%, all 33%), and at equal recomputation the least sharding:
    the base whole on every GPU (NO_SHARD: 0.3% for its wrapping on one H200), then sharded (FULL_SHARD: ~2%
    across 2 H200s). On several machines the base is sharded within each (HYBRID_SHARD), with any recomputation,
    before it is sharded across them (FULL_SHARD: every layer's all-gather would cross the network). It is
    sharded wherever keeping it whole cannot help: one process, CPU offload (a whole copy per process in host
    memory), DeepSpeed (which partitions it itself)."""
    p = cfg.parallel
    checkpointing = [{}]
    if p.activation_checkpointing == "auto":
        checkpointing = [
            {"parallel.activation_checkpointing": ac, "parallel.checkpoint_every": every}
            for ac, every in CHECKPOINT_CHOICES
        ]
    if p.sharding_strategy != "auto":
        tiers = [[None]]
    elif p.cpu_offload:
        tiers = [["FULL_SHARD"]]
    else:
        tiers = sharding_tiers(gpus, nodes, p.backend)
    return [
        {**c, **({"parallel.sharding_strategy": s} if s else {})}
        for tier in tiers
        for c in checkpointing
        for s in tier
    ]


def sharding_tiers(gpus: int, nodes: int, backend: str) -> list[list[str]]:
    """Where the frozen base can live, least sharding first: whole on every GPU, then sharded within a machine
    (several machines), then over all GPUs; grouped in tiers that auto_choices tries one after the other at every
    recomputation (FULL_SHARD across machines only when nothing fits a machine). One process has nothing to
    shard, and DeepSpeed partitions the base whatever FSDP's strategy says."""
    if gpus == 1 or backend != "fsdp":
        return [["FULL_SHARD"]]
    if nodes > 1:
        return [["NO_SHARD", "HYBRID_SHARD"], ["FULL_SHARD"]]
    return [["NO_SHARD", "FULL_SHARD"]]


def choose_auto(
    cfg: Config, conf, gpus: int, gpu_mem: float | None, nodes: int = 1
) -> tuple[dict, Estimate | None]:
    """What `cfg` leaves to 'auto', decided: the first of auto_choices whose planned peak fits `gpu_mem`, or the
    last (everything recomputed, the base sharded) when none does (the plan may be pessimistic). Without a GPU
    limit (a CPU run): no recomputation and the base sharded, as on GPUs (the processes share the host's
    memory, which sharding spares)."""
    choices = auto_choices(cfg, gpus, nodes)
    if gpu_mem is None:
        cpu = {"parallel.activation_checkpointing": False, "parallel.sharding_strategy": "FULL_SHARD"}
        choice = next(c for c in choices if all(c.get(k, v) == v for k, v in cpu.items()))
        return choice, None
    est = None
    for choice in choices:
        est = estimate(apply_overrides(cfg, choice, "auto"), conf, gpus, nodes)
        if est.gpu_peak <= AUTO_MARGIN * gpu_mem:
            return choice, est
    return choice, est


def device_memory(cfg: Config, device: torch.device) -> float | None:
    """Bytes of GPU memory a run on `device` may use (its total, or parallel.gpu_memory_limit_gib if lower);
    None on a CPU."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    limit = cfg.parallel.gpu_memory_limit_gib
    return min(total, limit * GIB) if limit else total


def resolve_auto(
    cfg: Config, conf, gpus: int, gpu_mem: float | None, nodes: int = 1
) -> tuple[Config, Estimate | None]:
    """`cfg` with parallel.activation_checkpointing and parallel.sharding_strategy 'auto' replaced by
    choose_auto's choice (as it is when neither is auto), and the estimate of that choice (None when nothing
    was chosen or there is no GPU limit). `gpus` in all, on `nodes` machines."""
    if not auto_choices(cfg, gpus, nodes)[0]:
        return cfg, None
    choice, est = choose_auto(cfg, conf, gpus, gpu_mem, nodes)
    return apply_overrides(cfg, choice, "auto"), est


def describe_auto(before: Config, after: Config) -> str:
    """What 'auto' decided (`before` unresolved, `after` resolved), in words."""
    parts = []
    if before.parallel.activation_checkpointing == "auto":
        parts.append(f"activation checkpointing {describe_checkpointing(after)}")
    if before.parallel.sharding_strategy == "auto":
        strategy = after.parallel.sharding_strategy
        where = {"NO_SHARD": " (the whole 4-bit base on every GPU)", "HYBRID_SHARD": " (within each machine)"}
        parts.append(f"sharding {strategy}{where.get(strategy, '')}")
    return ", ".join(parts)


def describe_checkpointing(cfg: Config) -> str:
    """The checkpointing a (resolved) configuration runs, in words."""
    from shardtune.parallel import checkpointed_every

    every = checkpointed_every(cfg.parallel)
    if not every:
        return "none (every layer keeps its activations)"
    suffix = {2: "nd", 3: "rd"}.get(every, "th")
    return "every layer" if every == 1 else f"every {every}{suffix} layer"


def architecture(cfg: Config):
    """The model's transformers config, and a note when it is not the model's own: a Llama-3 8B / 70B hub id
    is planned with the built-in shape of the same architecture (no download, no hub access needed)."""
    from shardtune.modeling import BUILTIN_SHAPES, model_config

    name = cfg.model.name_or_path
    for size in ("70b", "8b"):
        if "/" in name and re.search(rf"llama-?3[\d.]*-{size}", name.lower()):
            shape = f"llama3-{size}"
            cfg = apply_overrides(cfg, {"model.name_or_path": shape, "model.init": "random"}, "plan")
            return model_config(cfg), f"{name}: planned with the built-in {shape} shape (same architecture)"
    try:
        return model_config(cfg), None
    except ConfigError:  # what the settings ask of this architecture: its own message
        raise
    except Exception as e:  # offline, gated, or a typo: the shape is all a plan needs
        raise ConfigError(
            f"model.name_or_path={name}: cannot read its config ({type(e).__name__}); give a local "
            f"checkpoint directory or a built-in shape ({', '.join(BUILTIN_SHAPES)}) with model.init=random"
        ) from None


def _target_key(targets):
    return "all-linear" if targets == "all-linear" else tuple(sorted(targets))


def batch_problem(cfg: Config, gpus: int, micro_batch: bool = True) -> str | None:
    """Why the run would refuse this global batch on `gpus` processes (None when it would not): every process
    gets the same rows per step, cut into micro-batches of the same size (data/loader.py, GlobalBatchSampler).
    `micro_batch` False leaves train.micro_batch_size out (--fit chooses it)."""
    g = cfg.train.global_batch_size
    if g % gpus:
        lower, higher = (g // gpus) * gpus, (g // gpus + 1) * gpus
        multiples = f"{lower} or {higher}" if lower else f"{higher}"
        return (
            f"train.global_batch_size={g} is not a multiple of the {gpus} GPUs: the run gives every process the "
            f"same number of rows per step and would refuse it. Set train.global_batch_size={multiples}, or plan "
            f"for a number of GPUs that divides {g}"
        )
    m = cfg.train.micro_batch_size
    if micro_batch and cfg.train.micro_batch_tokens is None and g % (m * gpus):
        return (
            f"train.global_batch_size={g} is not a multiple of train.micro_batch_size={m} x {gpus} GPUs: the run "
            f"would refuse it. Set train.micro_batch_size to a divisor of {g // gpus} (the rows per GPU per step), "
            f"or let --fit choose one"
        )
    return None


def fit(cfg: Config, conf, gpus: int, gpu_mem: float, nodes: int, gpu_name: str) -> list[Estimate]:
    """Every micro-batch x checkpointing x placement of the base (whole on every GPU, sharded, sharded and
    offloaded) combination that fits `gpu_mem` bytes (with 5% kept for the allocator), fastest first.
    Micro-batches are rows that divide the rows each GPU handles per step, or for packed rows token budgets of
    1 to 32 rows of data.max_len (train.micro_batch_tokens: as full, and as predictable in memory, as the data
    allows; not under DeepSpeed, which refuses them). Only settings the run accepts are tried (batch_problem)."""
    problem = batch_problem(cfg, gpus, micro_batch=False)
    if problem:  # no micro-batch can help: the global batch itself does not divide
        raise ConfigError(problem)
    per_gpu_rows = cfg.train.global_batch_size // gpus
    sizes = [{"train.micro_batch_size": m} for m in (1, 2, 4, 8, 16, 32) if per_gpu_rows % m == 0]
    if cfg.data.packing and cfg.parallel.backend == "fsdp":
        rows = [m for m in (1, 2, 4, 8, 16, 32) if m <= per_gpu_rows]
        sizes = [{"train.micro_batch_tokens": m * cfg.data.max_len} for m in rows]
    # where the frozen base lives (sharding_tiers), or sharded and offloaded (a whole copy per process offloaded
    # would only cost host memory); at equal planned speed (the network is not modelled) the first of these wins
    sharding = [s for tier in sharding_tiers(gpus, nodes, cfg.parallel.backend) for s in tier]
    placements = [(False, s) for s in sharding] + ([(True, "FULL_SHARD")] if gpus > 1 else [])
    out = []
    for size in sizes:
        for ac, every in CHECKPOINT_CHOICES:
            for offload, strategy in placements:
                choice = {
                    "parallel.activation_checkpointing": ac,
                    "parallel.checkpoint_every": every,
                    "parallel.cpu_offload": offload,
                    "parallel.sharding_strategy": strategy,
                }
                est = estimate(
                    apply_overrides(cfg, {**size, **choice}, "plan --fit"), conf, gpus, nodes, gpu_name
                )
                if est.gpu_peak <= 0.95 * gpu_mem:
                    out.append(est)

    def tokens(
        e: Estimate,
    ) -> int:  # at equal speed the bigger micro-batch (it keeps the GPU busier, not modelled)
        return (
            e.settings.get("train.micro_batch_tokens")
            or e.settings["train.micro_batch_size"] * cfg.data.max_len
        )

    return sorted(out, key=lambda e: (e.step_s, -tokens(e)))


def parse_size(text: str) -> float:
    """'24GiB', '24G', '80GB', '1.5TiB' -> bytes (G and GiB both mean 2^30, as nvidia-smi and Slurm do)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT])?(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"{text!r} is not a size; write e.g. 24GiB or 80G")
    unit = {"K": 1, "M": 2, "G": 3, "T": 4}.get((m.group(2) or "G").upper())
    return float(m.group(1)) * 1024**unit


def format_plan(est: Estimate, gpus: int, gpu_mem: float | None, host_ram: float | None) -> str:
    lines = ["GPU memory per GPU at the training peak:"]
    for part, b in est.gpu.items():
        lines.append(f"  {part:<36} {b / GIB:8.2f} GiB")
    verdict = ""
    if gpu_mem:
        verdict = "fits" if est.gpu_peak <= 0.95 * gpu_mem else "DOES NOT FIT"
        verdict = f"   {verdict} in {gpu_mem / GIB:.0f} GiB (5% kept for the allocator)"
    lines.append(f"  {'training peak':<36} {sum(est.gpu.values()) / GIB:8.2f} GiB")
    lines.append(f"  {'eval forward (eval.batch_size rows)':<36} {est.eval_bytes / GIB:8.2f} GiB")
    lines.append(f"  {'peak':<36} {est.gpu_peak / GIB:8.2f} GiB{verdict}")
    lines.append("host memory per node:")
    for phase, b in est.host.items():
        warn = "   MORE THAN --host-ram" if host_ram and b > host_ram else ""
        lines.append(f"  {phase:<36} {b / GIB:8.2f} GiB{warn}")
    lines.append(f"checkpoint on disk: {est.checkpoint_bytes / GIB:.2f} GiB each")
    total = (
        f", {est.total_s / 3600:.1f} h for the planned steps"
        if est.total_s
        else "; the total follows from train.epochs and the data's size: give train.max_steps to plan it "
        "(`shardtune doctor` counts the rows)"
    )
    lines.append(
        f"speed (rough, from FLOPs and MFU measured on H200s): {est.step_s:.2f} s/step, "
        f"{est.tokens_per_s_per_gpu:,.0f} tokens/s/GPU on {gpus} GPU(s){total}"
    )
    return "\n".join(lines)


def override_line(est: Estimate) -> str:
    return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in est.settings.items())
