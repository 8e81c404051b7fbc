"""`shardtune plan`: will this configuration fit, and how long will it take, before any GPU is touched.

    shardtune plan recipes/llama3_70b.py --gpus 4 --gpu-mem 24GiB [--nodes 1] [--host-ram 128GiB] [--fit]

Memory per GPU is the sum of parts that follow from the shapes and the way shardtune shards (parallel.py):

- the frozen base, sharded: the bytes of every linear layer (quant.bits=4: 0.5 byte per weight; 8: 1 byte, whole
  on every GPU as FSDP cannot shard it; 16: the compute dtype's 2 or 4), norms, embeddings and the output head,
  divided by the number of GPUs; the quantization statistics (4-bit absmax, kept whole by every rank on the
  module; 8-bit: an fp32 scale per row); with CPU offload the shards live in host memory instead;
- what FSDP gathers while computing: the root unit (embeddings and head) stays whole from the forward to
  the end of the backward; one decoder layer at a time plus one prefetched; bitsandbytes dequantizes each
  weight to the compute dtype for its matmul;
- the adapters, whole on every GPU: fp32 weights, gradients and two AdamW moments (16 bytes each; 10 with
  optim.name=*_8bit);
- activations (activations.py): what autograd saves for one decoder layer is *measured*, by running a layer
  of the real widths on the meta device (no memory, no GPU) and adding up the tensors it keeps for the
  backward, with attention saving what a fused kernel saves; with activation checkpointing every recomputed
  layer keeps its input and one layer is recomputed at a time; offloaded layers keep nothing on the GPU but
  the two in flight, and hold pinned host memory instead;
- logits and the loss: the output head's bf16 logits, their fp32 copy and log-softmax, and their gradient.

Time: the step's model FLOPs (4N + 3A per token, metrics.py) over the GPU's dense bf16 peak times an
efficiency measured on H200s by width and micro-batch (bench/results/), plus the waits for offloaded
activations where their copies outlast the layers' compute; a rough figure, labelled as such.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from shardtune.config import Config, apply_overrides
from shardtune.errors import ConfigError
from shardtune.planning.activations import (
    gpu_activation_bytes,
    host_activation_bytes,
    layer_activation_bytes,
    offload_stall_s,
)
from shardtune.planning.quantized import base_part, statistics_bytes, weight_bytes

GIB = 2**30

# Dense bf16 matmul rates (FLOP/s) of GPUs users name with --gpu: what MFU is measured against. H100/H200: the
# rate measured on them (metrics.MEASURED_PEAK_FLOPS); the others: the data-sheet peak times the H200's
# measured/data-sheet ratio (0.8).
GPU_PEAKS = {"h200": 790e12, "h100": 790e12, "a100": 250e12, "a10g": 56e12, "l40s": 290e12, "l4": 97e12}
# Memory of one GPU (what torch reports as total), for choices made without --gpu-mem.
GPU_MEMORY = {
    k: v * GIB for k, v in dict(h200=139.8, h100=79.1, a100=79.1, a10g=22.0, l40s=44.4, l4=22.0).items()
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
    def of(cls, hf_config) -> Shape:
        heads = hf_config.num_attention_heads
        return cls(
            hf_config.hidden_size,
            hf_config.intermediate_size,
            hf_config.num_hidden_layers,
            heads,
            getattr(hf_config, "num_key_value_heads", None) or heads,
            getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
            hf_config.vocab_size,
            bool(getattr(hf_config, "tie_word_embeddings", False)),
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
    def out_rows(self) -> int:
        """Output rows of one decoder layer's linear layers (LLM.int8 keeps a scale per row)."""
        return sum(o for _, o in self.linears().values())

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


@dataclass
class _Layout:
    """How one configuration places the run on `n` GPUs, as the estimate's parts need it."""

    n: int  # GPUs in all
    tokens: int  # the most one forward holds: micro-batch sequences x data.max_len, or the token budget
    row: int  # the longest sequence (a token budget's micro-batch is one packed sequence)
    compute: int  # bytes of the compute dtype
    shards: int  # the GPUs the frozen base is sharded over
    offload: bool  # the base's shards in host memory (CPU offload)
    fused: bool  # Liger's fused kernels
    fused_loss: (
        bool  # Liger's loss (no logits held): SFT's; a preference loss needs every sequence's log-probs
    )
    plan: str  # what each decoder layer does with its activations (checkpointing.layer_plan: k, o, r)

    @property
    def recomputed(self) -> float:
        """The share of the layers recomputed."""
        return self.plan.count("r") / len(self.plan) if self.plan else 0.0

    @classmethod
    def of(cls, cfg: Config, hf_config, s: Shape, gpus: int, nodes: int) -> _Layout:
        from shardtune.parallel.checkpointing import layer_plan

        n = max(gpus, 1)
        # a preference pair runs both responses in one micro-batch: twice the tokens (and activations) of a row
        tokens = (
            cfg.train.micro_batch_tokens
            or cfg.train.micro_batch_size * cfg.objective.sequences * cfg.data.max_len
        )
        # the GPUs the frozen base is sharded over: NO_SHARD keeps it whole on each (no all-gathers), HYBRID_SHARD
        # shards it within a node
        shards = {"NO_SHARD": 1, "HYBRID_SHARD": max(1, n // max(nodes, 1))}.get(
            cfg.parallel.sharding_strategy, n
        )
        if cfg.quant.bits == 8 and cfg.parallel.backend == "fsdp":
            shards = 1  # FSDP cannot shard int8 weights: the run keeps the whole 8-bit base on every GPU
        return cls(
            n=n,
            tokens=tokens,
            # a token budget's micro-batch is one packed sequence of that many tokens (rows of data.max_len would
            # round it down to whole rows)
            row=tokens if cfg.train.micro_batch_tokens else cfg.data.max_len,
            compute=4 if cfg.param_dtype == "float32" else 2,  # fp32 runs cost twice (rare on GPUs)
            shards=shards,
            offload=cfg.parallel.cpu_offload and n > 1,  # one process trains the plain module (fsdp.py)
            fused=(
                fused := cfg.model.fused_kernels is True
                or (cfg.model.fused_kernels == "auto" and fused_on_gpus(cfg, hf_config))
            ),
            fused_loss=fused and cfg.objective.name == "sft",
            plan=layer_plan(cfg.parallel, s.layers),
        )


def fused_on_gpus(cfg: Config, hf_config) -> bool:
    """Whether a GPU run would use Liger's kernels with model.fused_kernels=auto, its environment assumed to have
    liger-kernel (a login node planning the run may not: `shardtune plan` says so). The run itself has decided by
    the time it plans (model.fused_kernels is then true or false)."""
    from shardtune.model.modeling import fused_kernels_problem

    return fused_kernels_problem(hf_config, "cuda", cfg.parallel.backend, here=False) is None


def estimate(cfg: Config, hf_config, gpus: int, nodes: int = 1, gpu_name: str = "h200") -> Estimate:
    """Predicted memory and time of one configuration on `gpus` GPUs in total."""
    s = Shape.of(hf_config)
    at = _Layout.of(cfg, hf_config, s, gpus, nodes)
    lora = lora_parameters(s, cfg.lora.r, cfg.lora.target_modules)
    layer = _layer_bytes(cfg, s, at)
    gpu = _gpu_memory(cfg, s, at, lora, layer)
    static = sum(v for k, v in gpu.items() if k not in ("activations", "logits + loss"))
    eval_bytes = static + _eval_logits_bytes(cfg, s, at)
    step_s = _step_seconds(cfg, hf_config, s, at, gpu_name, layer[0])
    size = "train.micro_batch_tokens" if cfg.train.micro_batch_tokens else "train.micro_batch_size"
    ac = cfg.parallel.activation_checkpointing
    settings = {
        size: cfg.train.micro_batch_tokens or cfg.train.micro_batch_size,
        # (on a GPU 'selective' is none: the dropout kernel keeps no masks; a pattern says every layer itself)
        "parallel.activation_checkpointing": False if ac == "selective" else ac,
        "parallel.checkpoint_every": cfg.parallel.checkpoint_every if ac in (True, "offload") else 1,
        "parallel.cpu_offload": at.offload,
    }
    if at.n > 1 and cfg.parallel.backend == "fsdp":
        settings["parallel.sharding_strategy"] = cfg.parallel.sharding_strategy
    rows_per_step = cfg.train.global_batch_size
    return Estimate(
        settings=settings,
        gpu=gpu,
        host=_host_memory(s, at, nodes, lora, _base_shard(cfg, s, at), layer[0]),
        eval_bytes=eval_bytes,
        checkpoint_bytes=(4 + _moment_bytes(cfg)) * lora,  # fp32 adapters + two AdamW moments
        step_s=step_s,
        tokens_per_s_per_gpu=rows_per_step * cfg.objective.sequences * cfg.data.max_len / step_s / at.n,
        total_s=step_s * (cfg.train.max_steps or 0),
    )


def _moment_bytes(cfg: Config) -> int:
    """Bytes of AdamW's two moments per adapter parameter: fp32, or 8-bit codes (optim.name=*_8bit; the
    per-block scales are 1/64 byte)."""
    return 2 if cfg.optim.name.endswith("_8bit") else 8


def _base_shard(cfg: Config, s: Shape, at: _Layout) -> float:
    """Bytes of the frozen base one GPU holds: linear weights (weight_bytes), norms, embeddings, head."""
    lin, norms = s.layers * s.layer_weights, s.layers * 2 * s.hidden
    return (
        lin * weight_bytes(cfg.quant, at.compute) + norms * at.compute + s.root_weights * at.compute
    ) / at.shards


def _layer_bytes(cfg: Config, s: Shape, at: _Layout) -> tuple[float, float]:
    """Bytes one decoder layer keeps for backward as the run keeps them, and whole (its dropout masks kept:
    a recomputed layer while it recomputes)."""
    from shardtune.model.modeling import lora_fused

    # Liger's SwiGLU keeps no activation output (recomputed in backward) and its RMSNorm no fp32 copy of the
    # input (two norms per layer)
    liger = at.tokens * (s.inter * at.compute + 2 * s.hidden * 4) if at.fused else 0
    lora_key = (
        cfg.lora.r,
        cfg.lora.alpha,
        cfg.lora.dropout,
        _target_key(cfg.lora.target_modules),
        lora_fused(cfg),
    )
    adapter_dtype = cfg.param_dtype if cfg.lora.compute_dtype == "auto" else "float32"
    widths = (s.hidden, s.inter, s.heads, s.kv_heads, s.head_dim)

    def per_layer(replay: bool) -> float:
        key = (*lora_key, replay)
        return layer_activation_bytes(*widths, key, at.tokens, at.row, cfg.param_dtype, adapter_dtype) - liger

    return per_layer(keeps_inputs_only(cfg)), per_layer(False)


def _gpu_memory(
    cfg: Config, s: Shape, at: _Layout, lora: int, layer: tuple[float, float]
) -> dict[str, float]:
    """Bytes per GPU at the training peak, part by part (`layer`: _layer_bytes)."""
    compute, tokens = at.compute, at.tokens
    bits, lin = cfg.quant.bits, s.layers * s.layer_weights
    fsdp, o = cfg.parallel.backend == "fsdp", cfg.objective
    ref_adapter = o.name == "dpo" and o.reference_model(cfg.model.adapter is not None) == "adapter"
    layer_full = s.layer_weights * weight_bytes(cfg.quant, compute) + 2 * s.hidden * compute
    return {
        base_part(cfg.quant): 0.0 if at.offload else _base_shard(cfg, s, at),
        **(
            {f"{bits}-bit statistics (whole)": statistics_bytes(cfg.quant, lin, s.layers * s.out_rows)}
            if bits != 16
            else {}
        ),
        # the root unit stays gathered from forward to backward (FSDP1 does not reshard the root); its own
        # shard is counted above unless offloaded (measured: -20% without this on the offloaded 80-layer 70B)
        "embeddings + head, gathered": s.root_weights
        * compute
        * (1 if at.offload else (at.shards - 1) / at.shards),
        "2 decoder layers, gathered": 2 * layer_full if at.shards > 1 else 0.0,
        # bitsandbytes dequantizes a 4-bit weight for every matmul, an 8-bit one for the input gradient
        "dequantized weights (2 matmuls)": (bits != 16)
        * 2
        * max(i * o for i, o in s.linears().values())
        * compute,
        # FSDP leaves the adapters whole on every rank; ZeRO-3 partitions them with their gradients and AdamW
        **({"adapters + grads + AdamW (whole)": (8 + _moment_bytes(cfg)) * lora} if fsdp else {}),
        **({} if fsdp else {"adapters + grads + AdamW (partitioned)": 16 * lora / at.n}),
        # DPO against the starting adapter: its fp32 copy, and the current values while the reference runs
        **({"DPO reference: starting adapters": 8 * lora / (1 if fsdp else at.n)} if ref_adapter else {}),
        "activations": gpu_activation_bytes(at.plan, tokens * s.hidden * compute, *layer),
        "logits + loss": _logits_bytes(cfg, s, at),
    }


def _logits_bytes(cfg: Config, s: Shape, at: _Layout) -> float:
    """The loss's peak beside the activations. SFT: bf16 logits, their fp32 copy and log-softmax, then the fp32
    gradient, ~12 bytes per logit; Liger's fused loss holds one chunk of fp32 logits (about tokens x hidden
    values) and the head's input gradient. Preference losses (kernels/token_logps.py): the logits and their
    gradient in the compute dtype, and a few fp32 chunks."""
    from shardtune.kernels.token_logps import CHUNK_BYTES

    if at.fused_loss:
        return 12 * at.tokens * s.hidden
    if cfg.objective.name == "sft":
        return 12 * at.tokens * s.vocab
    return 2 * at.compute * at.tokens * s.vocab + 3 * CHUNK_BYTES


def _eval_logits_bytes(cfg: Config, s: Shape, at: _Layout) -> float:
    """An eval forward's peak beside the weights (no activations kept): SFT, an eval batch of bf16 logits, their
    fp32 copy and log-softmax (10 bytes per logit; measured: rank 0 of an 8B run peaked 6.3 GiB higher
    evaluating 4 rows); preference losses, the logits in the compute dtype and token_logps's few fp32 chunks
    (no gradient: the policy's and the reference's forwards one after the other)."""
    from shardtune.kernels.token_logps import CHUNK_BYTES

    rows = min(cfg.eval.batch_size, cfg.eval.max_rows or cfg.eval.batch_size)
    logits = rows * cfg.objective.sequences * cfg.data.max_len * s.vocab
    if cfg.objective.name == "sft":
        return 10 * logits
    return at.compute * logits + 3 * CHUNK_BYTES


def _host_memory(
    s: Shape, at: _Layout, nodes: int, lora: int, base_shard: float, per_layer: float
) -> dict[str, float]:
    """Bytes of host memory per node, by phase (`per_layer`: what a layer keeps for backward)."""
    host = {
        # one decoder layer's weights at a time while loading (loading.py), plus the process itself
        "load": 2 * GIB + s.layer_weights * 2,
        # the offloaded shard, pinned in place (fsdp.lean_offload), plus the pinned allocator's rounding up
        # to powers of two: 1.4-1.7x the shard measured (bench/results/2026-11-23-1xh200-fusedlora; FSDP1's own
        # buffers took 3.4x)
        # and the offloaded layers' activations (parallel.activation_checkpointing=offload, or o in a pattern)
        "train": 2 * GIB
        + (1.7 * base_shard if at.offload else 0.0)
        + host_activation_bytes(at.plan, per_layer),
        # the checkpoint is staged through host memory by the rank that writes it
        "save": 2 * GIB + 12 * lora,
    }
    per_node = max(1, at.n // max(nodes, 1))
    return {k: v * per_node for k, v in host.items()}


def _step_seconds(cfg: Config, hf_config, s: Shape, at: _Layout, gpu_name: str, per_layer: float) -> float:
    """A step's time: its model FLOPs over the GPU's peak at the MFU measured for this width and micro-batch,
    and the waits for offloaded activations' copies (`per_layer`: what a layer keeps for backward)."""
    from shardtune.model.modeling import matmul_parameters
    from shardtune.observability.flops import step_flops

    seq = cfg.data.max_len
    n = matmul_parameters(hf_config)
    flops_per_row = step_flops(n, s.layers, s.hidden, seq, seq * seq, False)[0]
    if cfg.objective.reference_forward:  # DPO: the reference's forward of the same rows, without backward
        flops_per_row += 2 * n * seq + 2 * s.layers * s.hidden * seq * seq
    flops_per_row *= cfg.objective.sequences  # a pair is two sequences
    mfu = expected_mfu(s.hidden, at.tokens, at.recomputed, at.offload, whole_base=at.shards == 1 and at.n > 1)
    peak = GPU_PEAKS[gpu_name.lower()]  # the CLI offers only these names
    compute_s = flops_per_row * cfg.train.global_batch_size / (at.n * peak * mfu)
    if "o" not in at.plan:
        return compute_s
    step_tokens = cfg.train.global_batch_size * cfg.objective.sequences * seq / at.n
    micro_batches = max(1.0, step_tokens / at.tokens)
    # forward: one part in 3 + the recomputed share (backward twice the forward's work, recomputation once more)
    layer_forward_s = compute_s / ((3 + at.recomputed) * micro_batches * s.layers)
    stall = offload_stall_s(at.plan, per_layer, layer_forward_s, gpu_name)
    return compute_s + micro_batches * stall


def keeps_inputs_only(cfg: Config) -> bool:
    """Whether the LoRA layers with dropout keep for backward only their inputs, not a dropped copy and a mask
    per adapter: the fused layers do on a GPU (the dropout kernel, lora_kernel.py), which is what the plan is
    for (on a CPU, only with parallel.activation_checkpointing=selective)."""
    from shardtune.model.modeling import lora_fused

    return lora_fused(cfg) and cfg.lora.dropout > 0


def architecture(cfg: Config):
    """The model's transformers config, and a note when it is not the model's own: a Llama-3 8B / 70B hub id
    is planned with the built-in shape of the same architecture (no download, no hub access needed)."""
    from shardtune.model.modeling import BUILTIN_SHAPES, model_config

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
