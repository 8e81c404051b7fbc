"""shardtune's own kernels: NF4 dequantization (nf4.py, nf4_kernel.py), the LoRA update fused into the base matmul
(fused_lora.py) with its dropout kernel (lora_kernel.py), torch's varlen attention for packed rows
(varlen.py), and per-token log-probabilities without float32 copies of the logits (token_logps.py). Each has a torch fallback; the Triton ones run where Triton is importable (a GPU machine)."""

import functools
import importlib.util


@functools.cache
def triton_available() -> bool:
    """Whether shardtune's own GPU kernels (nf4_kernel.py, lora_kernel.py) can run: Triton is importable."""
    return importlib.util.find_spec("triton") is not None
