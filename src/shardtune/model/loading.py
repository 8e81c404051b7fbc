"""Build the quantized base + LoRA one decoder layer at a time, sharding each layer as soon as it exists.

    skeleton on the meta device (transformers, no memory) -> Linear4bit (or LLM.int8's Linear8bitLt, quant.bits)
    in place of the decoder layers' nn.Linear -> PEFT LoRA on the skeleton
    -> for each decoder layer: stream its weights in (safetensors) or draw them (model.init=random), quantize
       them to NF4 (or int8) on this process's device, initialize its adapters, hand it to the backend (FSDP keeps
       this rank's shard and frees the rest)
    -> embeddings, final norm, output head, rotary buffers -> the backend's root unit

So no process ever holds the whole model, quantized or not: at most one unquantized weight matrix in host
memory and one layer beyond its shards on the device. Every rank reads the same layer at the same time;
safetensors files are memory-mapped, so a node reads each byte from disk once (the page cache serves the
other ranks), and a file is mapped only while one tensor is copied out of it, which keeps resident memory
flat whatever the model's size. Ranks quantize identically (same bytes in, same bytes out), so nothing
needs to be broadcast.

Quantizing here gives bit-for-bit the weights transformers' BitsAndBytesConfig loading gives (tested), so
an adapter trained here reloads onto `from_pretrained(..., quantization_config=...)` exactly.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from shardtune.config import Config
from shardtune.config.inputs import convert_to_safetensors_hint
from shardtune.model import hub
from shardtune.model.modeling import DTYPES

if TYPE_CHECKING:
    from shardtune.parallel.backend import Backend


log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- weight sources
class CheckpointWeights:
    """Tensors of a Hugging Face safetensors checkpoint directory, read one at a time."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: self.dir / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif (self.dir / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(self.dir / "model.safetensors", "pt") as f:
                self.files = {k: self.dir / "model.safetensors" for k in f.keys()}  # noqa: SIM118
        else:
            found = sorted(p.name for p in self.dir.glob("*.bin")) or sorted(
                p.name for p in self.dir.iterdir()
            )
            raise ValueError(
                f"{self.dir}: no safetensors weights (model.safetensors or model.safetensors.index.json); found "
                f"{', '.join(found[:5]) or 'nothing'}. shardtune never unpickles weight files: "
                + convert_to_safetensors_hint(self.dir)
            )
        self.bytes = sum(p.stat().st_size for p in set(self.files.values()))

    def __contains__(self, name: str) -> bool:
        return name in self.files

    @contextmanager
    def opened(self, names: list[str]):
        """A getter for tensors by name. Each read maps its file only while that one tensor is copied out, so
        resident memory stays at one matrix whatever the size of the layer or the model."""
        from safetensors import safe_open

        def get(name: str, shape: tuple[int, ...] | None, kind: str) -> torch.Tensor:
            if name not in self.files:
                raise ValueError(f"{self.dir}: checkpoint has no tensor {name!r} (the model expects it)")
            with safe_open(self.files[name], "pt") as f:
                t = f.get_tensor(name)
            if shape is not None and tuple(t.shape) != tuple(shape):
                raise ValueError(f"{self.dir}: {name} has shape {tuple(t.shape)}, the model expects {shape}")
            return t

        yield get


class RandomWeights:
    """Seeded random weights drawn on the device, the same on every rank: N(0, initializer_range) for
    matrices and embeddings, ones for norms (transformers' Llama init). Drawn in float32 and returned in
    `dtype`; a lower-precision matrix is drawn a block of rows at a time into its final tensor, so that no
    float32 copy of a whole embedding (2 GiB for Llama-3's) is held beside it: a spike above the run's
    steady memory, before the first step."""

    DRAW_BYTES = 64 << 20  # float32 per block of rows

    def __init__(self, std: float, seed: int, device: torch.device, dtype: torch.dtype = torch.float32):
        self.std, self.seed, self.device, self.dtype = std, seed, device, dtype
        self.bytes = 0

    def __contains__(self, name: str) -> bool:
        return True

    @contextmanager
    def opened(self, names: list[str]):
        def get(name: str, shape: tuple[int, ...], kind: str) -> torch.Tensor:
            if kind == "norm":
                return torch.ones(shape, device=self.device, dtype=self.dtype)
            if kind == "bias":
                return torch.zeros(shape, device=self.device, dtype=self.dtype)
            gen = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
            if self.dtype == torch.float32:
                return torch.empty(shape, device=self.device).normal_(0.0, self.std, generator=gen)
            out = torch.empty(shape, device=self.device, dtype=self.dtype)
            row_bytes = 4 * (out[0].numel() if out.dim() > 1 else 1)  # a vector: one block
            for block in out.split(max(1, self.DRAW_BYTES // row_bytes)):
                drawn = torch.empty(block.shape, device=self.device).normal_(0.0, self.std, generator=gen)
                block.copy_(drawn)
            return out

        yield get


def weight_source(cfg: Config, path: str | None, hf_config, device: torch.device):
    """Where the base weights come from: a checkpoint directory, or a seeded generator when `path` is None."""
    if path is None:
        return RandomWeights(hf_config.initializer_range, cfg.train.seed, device, DTYPES[cfg.param_dtype])
    local = Path(path)
    if not local.is_dir():
        from huggingface_hub import snapshot_download

        with hub.refusal_is_input_error("model.name_or_path", path):
            local = Path(
                snapshot_download(
                    path,
                    revision=cfg.model.revision,
                    allow_patterns=["*.json", "*.safetensors", "tokenizer*"],
                )
            )
    return CheckpointWeights(local)


# ------------------------------------------------------------------------------------------- skeleton
def skeleton(cfg: Config, hf_config, attn: str):
    """The model on the meta device: the decoder layers' nn.Linear replaced by bitsandbytes' quantized layers
    (quant.bits 4 or 8; 16 keeps them), PEFT LoRA around them."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from shardtune.model.modeling import lora_config

    dtype = DTYPES[cfg.param_dtype]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation=attn)
        if cfg.quant.quantized:
            for layer in decoder_layers(model, cfg.parallel.wrap_class):
                for parent in list(layer.modules()):
                    for name, child in list(parent.named_children()):
                        if type(child) is nn.Linear:
                            setattr(parent, name, quantized_linear(cfg, child))
        if cfg.model.fused_kernels is True:  # resolved from 'auto' by the run (modeling.fused_kernels)
            from shardtune.model.modeling import apply_fused_kernels

            apply_fused_kernels(model)
        model.requires_grad_(False)
        model.config.use_cache = False
        model = get_peft_model(model, lora_config(cfg))
    return model


def quantized_linear(cfg: Config, child: nn.Linear) -> nn.Module:
    """The bitsandbytes layer (on meta) that replaces `child`, as transformers' BitsAndBytesConfig loading builds
    it (modeling.quantization_config): Linear4bit (shardtune's, dequantizing in one kernel on GPUs) or LLM.int8's
    Linear8bitLt (int8 weights, no fp16 copy, outlier threshold 6.0)."""
    import bitsandbytes as bnb

    from shardtune.kernels.nf4 import Linear4bit
    from shardtune.model.modeling import INT8_THRESHOLD

    bias = child.bias is not None
    if cfg.quant.bits == 8:
        return bnb.nn.Linear8bitLt(
            child.in_features,
            child.out_features,
            bias=bias,
            has_fp16_weights=False,
            threshold=INT8_THRESHOLD,
            device="meta",
        )
    return Linear4bit(
        child.in_features,
        child.out_features,
        bias=bias,
        compute_dtype=DTYPES[cfg.param_dtype],
        compress_statistics=cfg.quant.double_quant,
        quant_type=cfg.quant.quant_type,
        quant_storage=DTYPES[cfg.storage_dtype],
        device="meta",
    )


def decoder_layers(model: nn.Module, wrap_class: str) -> nn.ModuleList:
    """The ModuleList holding the decoder layers (instances of `wrap_class`)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and type(module[0]).__name__ == wrap_class:
            return module
    names = sorted({type(m).__name__ for m in model.modules() if "Layer" in type(m).__name__})
    raise ValueError(
        f"parallel.wrap_class={wrap_class!r} matches no list of layers in the model; its layer "
        f"classes: {names}"
    )


def checkpoint_name(peft_name: str) -> str:
    """'base_model.model.model.layers.0.mlp.up_proj.base_layer.weight' -> 'model.layers.0.mlp.up_proj.weight'."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


# ------------------------------------------------------------------------------------ materialization
def _fill(module: nn.Module, prefix: str, get, cfg: Config, device: torch.device) -> None:
    """Give every meta parameter under `module` its real value on `device` (4-bit where quantized)."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    dtype = DTYPES[cfg.param_dtype]
    for mod_name, mod in module.named_modules():
        full = f"{prefix}.{mod_name}" if mod_name else prefix
        if isinstance(mod, LoraLayer):
            continue  # the adapters are initialized below, after the base weights
        if isinstance(mod, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt):
            w = get(checkpoint_name(f"{full}.weight"), (mod.out_features, mod.in_features), "matrix")
            mod.weight = quantize(mod, w.to(device=device, dtype=dtype), cfg, device)
            del w
            if mod.bias is not None:
                mod.bias = nn.Parameter(
                    get(checkpoint_name(f"{full}.bias"), tuple(mod.bias.shape), "bias").to(
                        device=device, dtype=dtype
                    ),
                    requires_grad=False,
                )
            continue
        if any(part.startswith("lora_") for part in mod_name.split(".")):
            continue  # inside an adapter
        _materialize(mod, full, get, dtype, device)


def quantize(mod: nn.Module, w: torch.Tensor, cfg: Config, device: torch.device) -> nn.Parameter:
    """`w` (in the compute dtype, on `device`) quantized for `mod` as bitsandbytes quantizes it when
    transformers loads with BitsAndBytesConfig: NF4 (Params4bit) or LLM.int8 (Int8Params: int8 rows and their
    absmax scales SCB, quantized from w in fp16)."""
    import bitsandbytes as bnb

    if isinstance(mod, bnb.nn.Linear8bitLt):
        return bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)._quantize(device)
    param = bnb.nn.Params4bit(
        w,
        requires_grad=False,
        compress_statistics=cfg.quant.double_quant,
        quant_type=cfg.quant.quant_type,
        quant_storage=DTYPES[cfg.storage_dtype],
        module=mod,
    )
    weight = param._quantize(device)  # also records mod.quant_state, which FSDP's views lose
    # NOTE: on AVX512-BF16 CPUs bitsandbytes repacks the weight in place in eval mode; under FSDP the repacked
    # bytes vanish at the next all-gather. Off, so every CPU computes the same.
    mod.support_avx512bf16_for_cpu = False
    return weight


def _materialize(mod: nn.Module, name: str, get, dtype: torch.dtype, device: torch.device) -> None:
    """Give `mod`'s own meta parameters (not its children's) their values, frozen, on `device`."""
    for pname, p in list(mod.named_parameters(recurse=False)):
        if not p.is_meta:
            continue
        kind = "norm" if "norm" in type(mod).__name__.lower() else "matrix"
        value = get(checkpoint_name(f"{name}.{pname}"), tuple(p.shape), kind)
        mod._parameters[pname] = nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=False)


def _init_adapters(layer: nn.Module, seed: int, device: torch.device) -> None:
    """PEFT's own initialization of every adapter in `layer`, in fp32, identical on every rank."""
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    for mod in layer.modules():
        if isinstance(mod, LoraLayer):
            for sub in (mod.lora_A, mod.lora_B):
                for lin in sub.values():
                    for pname, p in list(lin.named_parameters(recurse=False)):
                        lin._parameters[pname] = nn.Parameter(
                            torch.empty(p.shape, device=device, dtype=torch.float32)
                        )
            for adapter in mod.lora_A:
                mod.reset_lora_parameters(adapter, init_lora_weights=True)


def _materialize_buffers(model: nn.Module, hf_config, device: torch.device) -> None:
    """Rebuild meta buffers (RoPE frequencies) in fp32 on the device, as their module computes them."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if any(b.is_meta for b in child.buffers(recurse=False)) and hasattr(child, "inv_freq"):
                setattr(parent, name, type(child)(config=hf_config).to(device))
    leftover = [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:
        raise RuntimeError(f"buffers left on the meta device: {leftover[:5]}")


@dataclass
class BuildReport:
    load_s: float
    trainable: int
    total: int
    source_bytes: int


def build_model(cfg: Config, hf_config, path: str | None, attn: str, backend: Backend, device: torch.device):
    """The trainable model on `device`, sharded by `backend` as it is built; `path` None draws random weights."""
    t0 = time.perf_counter()
    model = skeleton(cfg, hf_config, attn)
    starting = None
    if cfg.model.adapter is not None:  # its tensors against the skeleton, before any weight is read
        from shardtune.model.adapter_weights import StartingAdapter

        starting = StartingAdapter(cfg.model.adapter)
        starting.check(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    source = weight_source(cfg, path, hf_config, device)
    layers = decoder_layers(model, cfg.parallel.wrap_class)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    for i in range(len(layers)):
        names = [checkpoint_name(f"{prefix}.{i}.{n}") for n, _ in layers[i].named_parameters()]
        with source.opened(names) as get:
            _fill(layers[i], f"{prefix}.{i}", get, cfg, device)
        _init_adapters(layers[i], cfg.train.seed * 100_003 + i, device)
        if starting is not None:
            starting.fill(layers[i], f"{prefix}.{i}")
        layers[i] = backend.shard_layer(layers[i])
    rest = [n for n, p in model.named_parameters() if p.is_meta]
    with source.opened([checkpoint_name(n) for n in rest]) as get:
        tied = getattr(hf_config, "tie_word_embeddings", False)
        for mod_name, mod in model.named_modules():
            if not (tied and mod is model.get_output_embeddings()):
                _materialize(mod, mod_name, get, DTYPES[cfg.param_dtype], device)
        if tied:
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
    _materialize_buffers(model, hf_config, device)
    model = backend.shard_root(model)
    return model, BuildReport(time.perf_counter() - t0, trainable, total, source.bytes)
