"""LoRA layers whose update is added to the base layer's output inside one matmul.

PEFT's `Linear.forward` computes `result + lora_B(lora_A(dropout(x.to(fp32)))) * scaling`: under autocast
the input is cast up to the adapters' fp32 and back down to bf16 by autocast (two copies of every adapter's
input, one of them kept for backward), and the update takes three passes over an output-sized tensor (B's
output, the scaling, the sum) plus one more in backward (the scaling's gradient). For Llama-3-70B's MLP
that is 700 MB per pass per 12k tokens, per adapter. Here the input goes to the adapter as it is (autocast
computes in bf16 either way) and the update is one `addmm(result, h, B^T, alpha=scaling)`: the scaling
goes into the matmul and the sum into its epilogue, so the output is read and written once.

The adapters, their names, dropout draws, initialization and saved files are PEFT's own: only `forward`
differs, and only in rounding (the sum is rounded once instead of three times). Registered through PEFT's
custom-module hook (`LoraConfig._register_custom_module`); what it does not cover (merged or disabled
adapters, mixed-adapter batches, DoRA and other variants, a bias on B, an input whose dtype PEFT would
cast outside autocast) runs PEFT's forward unchanged.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import Linear as PeftLinear


class FusedLinear(PeftLinear):
    """PEFT's LoRA `Linear` (also around bitsandbytes' Linear4bit, a subclass of nn.Linear), fused forward."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if (
            self.disable_adapters
            or self.merged
            or kwargs.get("adapter_names") is not None
            or self.lora_variant
        ):
            return super().forward(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A]
        autocast = x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type)  # not meta
        for a in active:
            if self.lora_B[a].bias is not None or not (autocast or self.lora_A[a].weight.dtype == x.dtype):
                return super().forward(x, *args, **kwargs)  # PEFT would cast the input: keep its numerics
        result = self.base_layer(x, *args, **kwargs)
        out = result.reshape(-1, result.shape[-1])
        for a in active:
            h = self.lora_A[a](self.lora_dropout[a](x))
            out = torch.addmm(
                out, h.reshape(-1, h.shape[-1]), self.lora_B[a].weight.t(), alpha=self.scaling[a]
            )
        return out.view(result.shape).to(result.dtype)


def register(lora_config) -> None:
    """Make PEFT build FusedLinear for every linear layer it adapts."""
    lora_config._register_custom_module({torch.nn.Linear: FusedLinear})
