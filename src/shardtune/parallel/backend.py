"""The Backend: what shards the frozen 4-bit base and drives the adapters' backward and optimizer step.

One protocol, two implementations, chosen in one place (`backend_for`): torch FSDP1 (fsdp.py, the default) and
DeepSpeed ZeRO-3 (zero3.py, parallel.backend=deepspeed). The model is built layer by layer and each layer is
handed to `shard_layer` as soon as it exists, then the rest to `shard_root`; `wrap` gives back what the loop
calls forward on once the optimizer exists. The loop, the checkpoint manager and the evaluation talk to the
backend only: none of them knows how the model is sharded.

Checkpoints hold the adapters and their optimizer state whole, by parameter name (`trainable_state`), whatever
the backend and the number of processes: `shardtune export`, `merge` and a resume onto another process count
read either backend's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from shardtune.config import ParallelConfig
    from shardtune.parallel.distributed import DistInfo

log = logging.getLogger(__name__)


class Backend(Protocol):
    """What a sharding backend does for a run; every method is called by every rank (collectives inside)."""

    name: str  # for the log: "FSDP FULL_SHARD", "DeepSpeed ZeRO-3"
    grad_scaler: object | None  # fp16's loss scaler (checkpointed), or None
    offloader: object | None  # parallel.activation_checkpointing=offload: offload.ActivationOffloader

    def shard_layer(self, layer: torch.nn.Module) -> torch.nn.Module:
        """One decoder layer, complete on this rank: kept as this rank's shard from here on."""

    def shard_root(self, model: torch.nn.Module) -> torch.nn.Module:
        """The rest of the model (its layers already sharded), then activation checkpointing."""

    def wrap(self, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        """What the loop calls forward on, once the optimizer over the adapters exists."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's share of the step's loss (gradients accumulate)."""

    def step(self) -> torch.Tensor:
        """Sum the adapters' gradients over the ranks, clip, step the optimizer, zero the gradients; the
        gradient norm before clipping."""

    def trainable_state(self, fresh: bool = False) -> tuple[dict, dict]:
        """(adapters by name, optimizer state by name), whole, as DCP saves and loads them. `fresh`: tensors
        to load a checkpoint into (load_trainable_state writes them back where needed)."""

    def load_trainable_state(self, msd: dict, osd: dict) -> None:
        """After DCP loaded into trainable_state(fresh=True)'s tensors."""

    def adapter_grads(self) -> dict[str, torch.Tensor]:
        """After `backward` (before `step`): the adapters' gradients, whole and summed over the ranks as the step
        sums them, by name, unscaled (shardtune doctor --numerics compares them)."""

    def local_trainable(self) -> list[torch.Tensor]:
        """The tensors that hold this rank's share of the adapters and that the next forward gathers them from
        (written in place, they change what it computes with; DPO's StartingAdapter swaps them)."""

    def unwrap(self) -> torch.nn.Module:
        """The PEFT model inside the wrappers (its config, generate)."""

    def gathered_root(self) -> contextlib.AbstractContextManager:
        """A context in which the root's weights (embeddings, head) are whole, for `generate` on unwrap()."""

    def sharding_report(self) -> dict[str, int]:
        """Elements of the base this rank holds ('local') against the whole ('total')."""


def backend_for(
    pcfg: ParallelConfig,
    param_dtype: str,
    dist: DistInfo,
    micro_batch_size: int,
    max_grad_norm: float | None,
) -> Backend:
    """The backend parallel.backend names, for this run's processes."""
    if pcfg.backend == "deepspeed":
        from shardtune.parallel.zero3 import ZeroBackend

        return ZeroBackend(pcfg, dist, micro_batch_size, max_grad_norm)
    from shardtune.parallel.fsdp import FsdpBackend

    return FsdpBackend(pcfg, param_dtype, dist, max_grad_norm)


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


DEEPSPEED_MISSING = (
    "parallel.backend=deepspeed (an accelerate DEEPSPEED config sets it) needs DeepSpeed, which is not installed "
    "in this Python: pip install 'shardtune[deepspeed]' (or pip install deepspeed), or use an FSDP config from "
    "fsdp_configs/."
)
