"""Merge a trained adapter into its base: a standalone Hugging Face model directory (safetensors shards).

Each weight the run trained against is rebuilt exactly as training saw it: the base checkpoint's matrix is
quantized with the run's settings (NF4, or LLM.int8's int8 rows with quant.bits=8) and dequantized (the rounding
is part of the model the adapter was fitted to; quant.bits=16 keeps the matrix), then scaling * B @ A is added, and the result is cast to the output dtype. Tensors stream
through one at a time and shards are written as they fill, so host memory stays at about one shard
(max_shard_gib) whatever the model's size; nothing is unpickled and no GPU is required (one is used if there).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from shardtune.checkpoint.export import (
    adapter_tensors,
    check_output,
    checkpoint_model_config,
    find_checkpoint,
)
from shardtune.config import Config
from shardtune.model.loading import CheckpointWeights, decoder_layers, skeleton
from shardtune.model.modeling import DTYPES

log = logging.getLogger(__name__)


class ShardWriter:
    """Writes tensors into numbered safetensors shards of bounded size, then the index."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous().cpu()
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        index = len(self.shards) + 1
        save_file(self.pending, str(self.out / f"model-{index:05d}.safetensors"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            (self.out / f"model-{i:05d}.safetensors").rename(self.out / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def _quantized_names(cfg: Config, hf_config) -> set[str]:
    """Checkpoint names of the weights that training held quantized (the decoder layers' linear layers)."""
    import bitsandbytes as bnb

    from shardtune.model.loading import checkpoint_name

    model = skeleton(cfg, hf_config, "sdpa")
    layers = decoder_layers(model, cfg.parallel.wrap_class)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    return {
        checkpoint_name(f"{prefix}.{n}.weight")
        for n, mod in layers.named_modules()
        if isinstance(mod, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)
    }


def as_trained(cfg: Config, tensor: torch.Tensor) -> torch.Tensor:
    """A base weight as training saw it (float32): quantized with the run's settings and dequantized. NF4: the
    4-bit codes times their block scales; LLM.int8: the int8 rows times their scales (SCB / 127), quantized from
    the weight in fp16 as bitsandbytes' Int8Params quantizes it."""
    import bitsandbytes.functional as bf

    compute = DTYPES[cfg.param_dtype]
    if cfg.quant.bits == 8:
        rows, scales, _ = bf.int8_vectorwise_quant(tensor.to(compute).to(torch.float16))
        return rows.float().mul_(scales.unsqueeze(1).mul(1.0 / 127.0))  # bitsandbytes' MatMul8bitFp's weight
    packed, state = bf.quantize_4bit(
        tensor.to(compute),
        blocksize=64,
        compress_statistics=cfg.quant.double_quant,
        quant_type=cfg.quant.quant_type,
        quant_storage=DTYPES[cfg.storage_dtype],
    )
    return bf.dequantize_4bit(packed, state).float()


def merge_adapter(
    run_or_checkpoint: Path,
    out: Path,
    base: str | None = None,
    dtype: str = "bfloat16",
    max_shard_gib: float = 2.0,
) -> Path:
    """Write base + adapter as one model directory; returns it."""
    from peft import LoraConfig

    t0 = time.perf_counter()
    ckpt = find_checkpoint(Path(run_or_checkpoint))
    cfg = Config.model_validate(yaml.safe_load((ckpt / "config.yaml").read_text()))
    hf_config = checkpoint_model_config(ckpt)
    peft_conf = LoraConfig.from_pretrained(str(ckpt))
    base = base or peft_conf.base_model_name_or_path
    if not base or not Path(base).is_dir():
        raise ValueError(
            f"base model {base!r} is not a local checkpoint directory; pass the base with --base "
            f"(a run with a random base drawn on the devices has none to merge into)"
        )
    out = check_output(out, "merged model", "model.safetensors.index.json", run_or_checkpoint, ckpt, base)
    weights = CheckpointWeights(Path(base))
    scaling = peft_conf.lora_alpha / (math.sqrt(peft_conf.r) if peft_conf.use_rslora else peft_conf.r)
    lora = {}
    for key, tensor in adapter_tensors(ckpt).items():  # ...layers.0.self_attn.q_proj.lora_A.default.weight
        module = key.removeprefix("base_model.model.").split(".lora_")[0]
        lora.setdefault(module + ".weight", {})["A" if ".lora_A." in key else "B"] = tensor.float()
    quantized = _quantized_names(cfg, hf_config) if cfg.quant.quantized else set()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = ShardWriter(tmp, int(max_shard_gib * 2**30))
    with weights.opened(list(weights.files)) as get:
        for name in weights.files:
            tensor = get(name, None, "matrix").to(device)
            if name in quantized:
                tensor = as_trained(cfg, tensor)
            if name in lora:
                tensor = tensor.float() + scaling * (lora[name]["B"].to(device) @ lora[name]["A"].to(device))
            writer.add(name, tensor.to(DTYPES[dtype]))
    writer.finish()
    hf_config.torch_dtype = dtype
    if hasattr(hf_config, "quantization_config"):  # the merged weights are plain tensors
        del hf_config.quantization_config
    hf_config.save_pretrained(tmp)
    for f in (ckpt.parent.parent / "tokenizer").glob("*"):
        shutil.copy2(f, tmp / f.name)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info(
        "merged %s into %s: %d tensors, %.2f GiB, %.1fs",
        ckpt,
        out,
        len(weights.files),
        writer.total / 2**30,
        time.perf_counter() - t0,
    )
    return out
