"""What the model is: architectures by name, the attention kernel, quantization and LoRA settings, and
the random base written for small random-init runs. Building it on the devices is loading.py's job.

A small random-init base is written once as an ordinary safetensors checkpoint in the run directory and
then streamed in like any other checkpoint, so the trained adapter can be reloaded onto exactly that base.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

from shardtune.config import Config, ModelConfig
from shardtune.config.checks import BUILTIN_SHAPE_NAMES, shape_keys_problem, target_modules_problem
from shardtune.errors import ConfigError
from shardtune.model import hub

log = logging.getLogger(__name__)

# Architectures by name, for random init without a hub download. 'tiny' is the embedded default: big
# enough to learn the generated task with LoRA alone, small enough to train in minutes on 2 CPU cores.
# what every Llama-3 size shares: vocabulary, GQA with 8 KV heads, RoPE base, special tokens
_LLAMA3 = dict(
    vocab_size=128256,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128001,
)
BUILTIN_SHAPES: dict[str, dict] = {
    "tiny": dict(
        vocab_size=384,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        # NOTE: the default std 0.02 leaves a random output head so weak that no logit can stand out
        # (the best token stays near uniform); LoRA, which never touches the head, then cannot fit any
        # task. 0.1 gives the frozen random head usable scale.
        initializer_range=0.1,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    ),
    "llama3-8b": dict(
        _LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32
    ),
    "llama3-70b": dict(
        _LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64
    ),
}
assert set(BUILTIN_SHAPES) == set(BUILTIN_SHAPE_NAMES)

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "uint8": torch.uint8,
}


def model_config(cfg: Config):
    """The architecture (a transformers config) the run trains, without loading any weights. Settings that
    name what this architecture lacks (model.shape fields, lora.target_modules) are a ConfigError here, for
    every command that reads the architecture (the run, plan, doctor)."""
    m = cfg.model
    builtin = m.name_or_path in BUILTIN_SHAPES
    model_type = "llama" if builtin else None
    if not builtin:
        with hub.refusal_is_input_error("model.name_or_path", m.name_or_path):
            hf_config = AutoConfig.from_pretrained(
                m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code
            )
        model_type = getattr(hf_config, "model_type", None)
    problem = shape_keys_problem(m.shape, model_type) or target_modules_problem(
        cfg.lora.target_modules, model_type
    )
    if problem:
        raise ConfigError(f"{m.name_or_path}: {problem}")
    if builtin:
        return LlamaConfig(**{**BUILTIN_SHAPES[m.name_or_path], **m.shape})
    for key, value in m.shape.items():
        setattr(hf_config, key, value)
    return hf_config


def attention_implementation(requested: str, device: torch.device) -> str:
    """'auto' -> flash_attention_2 where flash_attn is importable and we are on a GPU; else, on a GPU whose
    torch ships a varlen kernel, sdpa_varlen (SDPA, with packed batches through that kernel: varlen.py);
    else sdpa."""
    from shardtune.kernels import varlen

    chosen = requested
    if requested == "auto":
        chosen = "sdpa"
        if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
            chosen = "flash_attention_2"
        elif device.type == "cuda" and varlen.available():
            chosen = varlen.NAME
    if chosen == varlen.NAME:
        varlen.register()
    return chosen


def fused_kernels_problem(
    hf_config, device_type: str, backend: str = "fsdp", here: bool = True
) -> str | None:
    """Why Liger's kernels cannot run here (a CUDA device, liger-kernel and a Llama model are needed), or None.
    `here` False: on the GPU machines, whose environment is assumed to have liger-kernel (`shardtune plan` on a
    login node plans the kernels the run will use there)."""
    model_type = getattr(hf_config, "model_type", None)
    if backend == "deepspeed":
        return "Liger's fused loss reads the output head's weight directly, which DeepSpeed ZeRO-3 keeps partitioned"
    if device_type != "cuda":
        return "Liger's kernels are Triton kernels for CUDA GPUs; this run is on the CPU"
    if here and not liger_installed():
        return LIGER_MISSING
    if model_type != "llama":
        return f"they are wired for Llama models; this one is {model_type!r}"
    return None


LIGER_MISSING = "liger-kernel is not installed (pip install 'shardtune[gpu]', or pip install liger-kernel)"


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def fused_kernels(cfg: Config, hf_config, device_type: str) -> bool:
    """Whether the run uses Liger's kernels: model.fused_kernels=true must be possible here (else a ConfigError
    before anything loads); 'auto' means wherever they can run."""
    wanted = cfg.model.fused_kernels
    if not wanted:
        return False
    problem = fused_kernels_problem(hf_config, device_type, cfg.parallel.backend)
    if problem is None:
        return True
    if wanted == "auto":
        return False
    raise ConfigError(f"model.fused_kernels=true: {problem}. Set model.fused_kernels=auto or false.")


def apply_fused_kernels(causal_lm) -> None:
    """Liger's RMSNorm, SwiGLU and RoPE kernels, and its forward that computes the loss from the hidden states
    chunk by chunk (the logits are never held whole), on a LlamaForCausalLM instance (also on meta).
    The SwiGLU forward calls the MLP's own (4-bit, LoRA-wrapped) projections, so only the activation fuses."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    # it reports every optional backend it cannot import (CuTe DSL, Ascend) as a warning
    logging.getLogger("liger_kernel").setLevel(logging.ERROR)
    apply_liger_kernel_to_llama(
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=True,
        model=causal_lm,
    )


# LLM.int8's outlier threshold: input columns with a value above it are multiplied in fp16 (transformers'
# BitsAndBytesConfig default, llm_int8_threshold)
INT8_THRESHOLD = 6.0


def quantization_config(cfg: Config) -> BitsAndBytesConfig | None:
    """The transformers quantization config that loads the base as the run holds it (None for quant.bits=16)."""
    if cfg.quant.bits == 16:
        return None
    if cfg.quant.bits == 8:
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD, llm_int8_has_fp16_weight=False
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant.quant_type,
        bnb_4bit_use_double_quant=cfg.quant.double_quant,
        bnb_4bit_compute_dtype=DTYPES[cfg.param_dtype],
        # NOTE: the packed 4-bit bytes live in a tensor of this dtype; it must equal the FSDP param dtype
        # (Config enforces it) or FSDP cannot flatten a decoder layer's parameters into one FlatParameter.
        bnb_4bit_quant_storage=DTYPES[cfg.storage_dtype],
    )


def describe_quant(cfg: Config) -> str:
    """The frozen base's format, for logs: 'NF4 4-bit', 'LLM.int8 8-bit', 'not quantized (bfloat16)'."""
    if cfg.quant.bits == 4:
        return f"{cfg.quant.quant_type.upper()} 4-bit"
    if cfg.quant.bits == 8:
        return "LLM.int8 8-bit"
    return f"not quantized ({cfg.param_dtype})"


def write_random_base(cfg: Config, tokenizer, out_dir: Path) -> Path:
    """Build the architecture with seeded random weights and save it (safetensors + tokenizer)."""
    hf_config = model_config(cfg)
    torch.manual_seed(cfg.train.seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def lora_config(cfg: Config):
    """The PEFT LoraConfig of the run (adapters are created by PEFT itself)."""
    from peft import LoraConfig

    lc = cfg.lora
    config = LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=lc.target_modules,
        use_rslora=lc.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    if lora_fused(cfg):
        from shardtune.kernels import fused_lora

        fused_lora.register(config)
    return config


def lora_fused(cfg: Config) -> bool:
    """lora.fused resolved: 'auto' is on unless DeepSpeed partitions the adapters (see the setting)."""
    return cfg.lora.fused is True or (cfg.lora.fused == "auto" and cfg.parallel.backend != "deepspeed")


def base_on_disk(m: ModelConfig, hf_config) -> bool:
    """init=random: write the random base into the run directory? (Small models: yes, so that the adapter
    can be reloaded onto it later; large ones are drawn on the devices and never exist whole.)"""
    if m.save_random_base is not None:
        return m.save_random_base
    return matmul_parameters(hf_config) < RANDOM_BASE_ON_DISK_BELOW


RANDOM_BASE_ON_DISK_BELOW = 2_000_000_000


def matmul_parameters(hf_config) -> int:
    """N in the FLOP count: weights of every matmul (attention, MLP, output head), not embeddings."""
    d, f, n_layers = hf_config.hidden_size, hf_config.intermediate_size, hf_config.num_hidden_layers
    heads, kv = (
        hf_config.num_attention_heads,
        getattr(hf_config, "num_key_value_heads", hf_config.num_attention_heads),
    )
    head_dim = getattr(hf_config, "head_dim", None) or d // heads
    attn = d * heads * head_dim * 2 + d * kv * head_dim * 2
    mlp = 3 * d * f
    return n_layers * (attn + mlp) + d * hf_config.vocab_size
