"""The model: the base (loaded or random), quantized to 4 bits by bitsandbytes, with PEFT LoRA adapters.

transformers builds and loads the model, bitsandbytes quantizes it (through transformers'
BitsAndBytesConfig), PEFT adds the adapters. A random-init base is written once as an ordinary
safetensors checkpoint in the run directory and then loaded like any other checkpoint, so the same
loading code runs for both and the trained adapter can be reloaded onto exactly that base later.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

from shardtune.config import BUILTIN_SHAPE_NAMES, Config

log = logging.getLogger(__name__)

# Architectures by name, for random init without a hub download. 'tiny' is the embedded default: big
# enough to learn the generated task with LoRA alone, small enough to train in minutes on 2 CPU cores.
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
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama3-70b": dict(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
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
    """The architecture (a transformers config) the run trains, without loading any weights."""
    m = cfg.model
    if m.name_or_path in BUILTIN_SHAPES:
        return LlamaConfig(**{**BUILTIN_SHAPES[m.name_or_path], **m.shape})
    conf = AutoConfig.from_pretrained(
        m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code
    )
    for key, value in m.shape.items():
        setattr(conf, key, value)
    return conf


def attention_implementation(requested: str, device: torch.device) -> str:
    """'auto' -> flash_attention_2 where flash_attn is importable and we are on a GPU, else sdpa."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def quantization_config(cfg: Config) -> BitsAndBytesConfig | None:
    if not cfg.quant.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant.quant_type,
        bnb_4bit_use_double_quant=cfg.quant.double_quant,
        bnb_4bit_compute_dtype=DTYPES[cfg.param_dtype],
        # NOTE: the packed 4-bit bytes live in a tensor of this dtype; it must equal the FSDP param dtype
        # (Config enforces it) or FSDP cannot flatten a decoder layer's parameters into one FlatParameter.
        bnb_4bit_quant_storage=DTYPES[cfg.storage_dtype],
    )


def write_random_base(cfg: Config, tokenizer, out_dir: Path) -> Path:
    """Build the architecture with seeded random weights and save it (safetensors + tokenizer)."""
    conf = model_config(cfg)
    torch.manual_seed(cfg.train.seed)
    model = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def load_base(cfg: Config, path: str, device: torch.device, attn: str):
    """The frozen base, quantized to 4 bits when quant.load_in_4bit, on `device`."""
    m = cfg.model
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=quantization_config(cfg),
        dtype=DTYPES[cfg.param_dtype],
        device_map={"": device},
        attn_implementation=attn,
        revision=None if path != m.name_or_path else m.revision,
        trust_remote_code=m.trust_remote_code,
    )
    model.requires_grad_(False)
    model.config.use_cache = False
    _fix_after_load(model)
    return model


def _fix_after_load(model) -> None:
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # NOTE: on CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight in place the first
            # time it runs in eval mode without grad. Under FSDP the repacked bytes are thrown away at the
            # next all-gather and training silently degrades; with it off, every CPU computes the same.
            module.support_avx512bf16_for_cpu = False
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor) and inv_freq.dtype != torch.float32:
            # NOTE: rotary frequencies rounded to bf16 shift every position's angle (measured: logits off
            # by 72%); they must stay fp32. FSDP is told not to cast buffers (parallel.py).
            raise RuntimeError(f"{type(module).__name__}.inv_freq is {inv_freq.dtype}; expected float32")


def add_lora(model, cfg: Config):
    """Wrap the base with PEFT LoRA adapters (float32 master weights), identically on every rank."""
    from peft import LoraConfig, get_peft_model

    lc = cfg.lora
    peft_config = LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=lc.target_modules,
        use_rslora=lc.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    # Every rank must start from the same adapter weights: FSDP shards them without broadcasting.
    torch.manual_seed(cfg.train.seed)
    model = get_peft_model(model, peft_config)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters, counting 4-bit weights by their unpacked size (PEFT's convention)."""
    return model.get_nb_trainable_parameters()


def matmul_parameters(conf) -> int:
    """N in the FLOP count: weights of every matmul (attention, MLP, output head), not embeddings."""
    d, f, n_layers = conf.hidden_size, conf.intermediate_size, conf.num_hidden_layers
    heads, kv = conf.num_attention_heads, getattr(conf, "num_key_value_heads", conf.num_attention_heads)
    head_dim = getattr(conf, "head_dim", None) or d // heads
    attn = d * heads * head_dim * 2 + d * kv * head_dim * 2
    mlp = 3 * d * f
    return n_layers * (attn + mlp) + d * conf.vocab_size
