"""model.adapter: the adapters of a run started from a PEFT adapter directory (continued SFT, DPO after SFT).

Its LoRA settings and base are checked against the configuration before anything is read (config/checks.py:
check_adapter); its tensors' names and shapes against the model's skeleton, on the meta device, before any base
weight is read (`check`); then each decoder layer's adapters are filled from it as the layer is built, after
PEFT's own initialization (so that the random state the rest of the run draws from is what it would be
without model.adapter) and before the backend shards the layer (`fill`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from shardtune.errors import ConfigError


def file_key(param_name: str, adapter: str = "default") -> str:
    """A LoRA parameter's name in PEFT's saved file, which leaves the adapter's name out:
    '...q_proj.lora_A.default.weight' -> '...q_proj.lora_A.weight'."""
    return param_name.replace(f".{adapter}.", ".")


class StartingAdapter:
    """The tensors of model.adapter's adapter_model.safetensors, by name."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.dir = Path(directory).expanduser()
        self.file = self.dir / "adapter_model.safetensors"
        with safe_open(self.file, "pt") as f:
            self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118

    def check(self, model: nn.Module) -> None:
        """Every LoRA parameter of `model` (a skeleton, on meta) has a tensor of its shape in the file, and
        every tensor of the file a parameter (a ConfigError naming the differences otherwise)."""
        ours = {file_key(n): tuple(p.shape) for n, p in model.named_parameters() if "lora_" in n}
        missing = sorted(ours.keys() - self.shapes.keys())
        extra = sorted(self.shapes.keys() - ours.keys())
        shapes = [
            f"{k}: {self.shapes[k]} there, {ours[k]} here"
            for k in sorted(ours)
            if k in self.shapes and self.shapes[k] != ours[k]
        ]
        if not (missing or extra or shapes):
            return
        parts = [
            (f"{len(missing)} of this model's adapters are not in it (e.g. {missing[0]})" if missing else ""),
            (f"{len(extra)} of its tensors adapt nothing here (e.g. {extra[0]})" if extra else ""),
            (f"{len(shapes)} have other shapes (e.g. {shapes[0]})" if shapes else ""),
        ]
        raise ConfigError(
            f"model.adapter={self.dir}: its tensors do not fit this model: {'; '.join(p for p in parts if p)}. "
            f"Was it trained on another architecture, or with other LoRA settings?"
        )

    def fill(self, layer: nn.Module, prefix: str) -> None:
        """Copy the file's tensors into the LoRA parameters of `layer` (named `prefix` in the model), in fp32."""
        from safetensors import safe_open

        with safe_open(self.file, "pt") as f, torch.no_grad():
            for name, p in layer.named_parameters():
                if "lora_" in name:
                    p.copy_(f.get_tensor(file_key(f"{prefix}.{name}")).to(dtype=p.dtype, device=p.device))
