"""DeepSpeed ZeRO-3, the other backend (parallel.backend=deepspeed): for clusters that standardize on it.

What it shards and how it is built mirrors fsdp.py's FSDP path, so the rest of shardtune (loop, checkpoint
format, export) does not change:

- Each decoder layer is partitioned as it is built (`deepspeed.zero.Init(module=layer)`), then the rest of the
  model, so no process holds the whole model. The packed 4-bit weights keep their class and quantization
  state; the 4-bit storage dtype must be the compute dtype (the same rule as FSDP's, config/checks.py).
- DeepSpeed's own bf16 stays off: it would cast every float parameter and buffer (rotary `inv_freq`, whose
  rounding shifts every position's angle) and would reinterpret 4-bit bytes stored in another dtype.
  Parameters keep the dtypes the loader gave them, and the loop's autocast runs the compute in bf16, as under
  FSDP. DeepSpeed partitions the adapters too, with their gradients and the AdamW state (the user's torch
  AdamW, which DeepSpeed drives).
- The loss: DeepSpeed averages gradients over the ranks; shardtune's loss of a micro-batch is its share of
  the global batch's token sum, so it is scaled by the world size before DeepSpeed's backward. Micro-batches
  are accumulated by calling backward once per micro-batch with DeepSpeed's accumulation set to 1, and one
  `step()` per optimizer step (it clips with train.max_grad_norm).
- Checkpoints keep shardtune's one format (backend.py: the whole adapters and their AdamW moments by
  name, through DCP): the full values are assembled from the partitions to save, and written back into them
  on resume, so `shardtune export`, `merge` and a resume onto another process count read them as they read
  an FSDP run's.

Measured on the CPU first (bench/results/2026-11-23-cpu-zero3), tested in tests/test_zero3.py.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from shardtune.config import ParallelConfig
from shardtune.parallel.adapters import fqn, offload_on, step_whole_adapters, whole_adapters_state
from shardtune.parallel.checkpointing import apply_checkpointing
from shardtune.parallel.distributed import DistInfo

MOMENTS = ("exp_avg", "exp_avg_sq")


def ds_config(
    pcfg: ParallelConfig, device: torch.device, micro_batch: int, world_size: int, max_grad_norm: float | None
) -> dict:
    zero: dict = {
        "stage": 3,
        # every parameter partitioned, however small (the default keeps those under 1e5 elements whole on every
        # rank, which in a small model is all of them)
        "stage3_param_persistence_threshold": 0,
        "stage3_model_persistence_threshold": 0,
    }
    if offload_on(pcfg, device):
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,  # the loop accumulates: one backward per micro-batch, one step
        "train_batch_size": micro_batch * world_size,
        "gradient_clipping": float(max_grad_norm or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": False},  # see the module docstring: the loop's autocast computes in bf16
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


class ZeroBackend:
    """The FSDP backend's counterpart: partitions each decoder layer as it is built, then the root. The
    partitioned model runs only inside its engine (`wrap`, made once the optimizer exists): the engine's hooks
    gather each module's weights for its forward and backward, and it drives the optimizer (the user's torch
    AdamW, whose param_groups, and so the scheduler's learning rates, stay the ones DeepSpeed steps with)."""

    name = "DeepSpeed ZeRO-3"
    grad_scaler = None  # fp16 is refused with this backend (config/checks.py)

    def __init__(self, pcfg: ParallelConfig, info: DistInfo, micro_batch: int, max_grad_norm: float | None):
        import deepspeed

        self.pcfg, self.device, self.world_size = pcfg, info.device, info.world_size
        self.enabled, self.max_grad_norm = info.world_size > 1, max_grad_norm
        self.ds_config = ds_config(pcfg, info.device, micro_batch, info.world_size, max_grad_norm)
        self.layer_cls: type | None = None
        self.model = self.optimizer = None
        self.engine = None  # DeepSpeed's, once wrap made it (several processes)
        self.offloader = None  # set with the checkpointing (shard_root)
        if self.enabled:
            # uses the process group shardtune made (gloo on CPU, NCCL on GPUs)
            deepspeed.init_distributed(dist_backend=dist.get_backend())

    def shard_layer(self, layer: torch.nn.Module) -> torch.nn.Module:
        self.layer_cls = type(layer)
        if self.enabled:
            import deepspeed

            deepspeed.zero.Init(module=layer, config_dict_or_path=self.ds_config)
        return layer

    def shard_root(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.enabled:
            import deepspeed

            deepspeed.zero.Init(
                module=model, config_dict_or_path=self.ds_config
            )  # skips the partitioned layers
        self.offloader = apply_checkpointing(model, self.pcfg, self.layer_cls, self.device)
        self.model = model
        return model

    def wrap(self, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        """The DeepSpeed engine around the partitioned model (one process: the plain module, as under FSDP)."""
        self.optimizer = optimizer
        if self.enabled:
            import deepspeed

            self.engine, *_ = deepspeed.initialize(
                model=self.model, optimizer=optimizer, config=self.ds_config
            )
            return self.engine
        return self.model

    def backward(self, loss: torch.Tensor) -> None:
        if self.engine is None:
            loss.backward()
            return
        # DeepSpeed averages the gradients over the ranks; shardtune's loss of a micro-batch is its share of a sum
        self.engine.backward(loss * self.world_size)

    def step(self) -> torch.Tensor:
        """The optimizer step (clipping included); the gradient norm before clipping."""
        if self.engine is None:  # one process: nothing partitioned, no engine
            return step_whole_adapters(self.model, self.optimizer, self.max_grad_norm)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(0.0 if norm is None else float(norm))

    def _named_adapters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(fqn(n), p) for n, p in self.model.named_parameters() if p.requires_grad]

    def trainable_state(self, fresh: bool = False):
        """The adapters and their AdamW state, whole, by name (backend.py's format). Collective.
        `fresh`: zeros of the right shapes to load a checkpoint into (load_trainable_state writes them back)."""
        if self.engine is None:
            return whole_adapters_state(self.model, self.optimizer, fresh)
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        named, engine = self._named_adapters(), self.engine
        states = [] if fresh else [s for s in _flat_states(engine) if s]
        step = states[0]["step"].clone() if states else torch.zeros((), dtype=torch.float32)
        msd, state = {}, {}
        for name, p in named:
            shape = tuple(p.ds_shape)
            if fresh:
                msd[name] = torch.zeros(shape, dtype=torch.float32, device=engine.device)
                moments = {k: torch.zeros_like(msd[name]) for k in MOMENTS}
            else:
                msd[name] = safe_get_full_fp32_param(p).reshape(shape)
                moments = {
                    k: safe_get_full_optimizer_state(p, k).reshape(shape)
                    if states
                    else torch.zeros_like(msd[name])
                    for k in MOMENTS
                }
            state[name] = {"step": step.clone(), **moments}
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [n for n, _ in named]}
            for g in self.optimizer.param_groups
        ]
        return msd, {"state": state, "param_groups": groups}

    def load_trainable_state(self, msd: dict, osd: dict) -> None:
        """Write whole adapters and AdamW moments (as loaded by DCP) into DeepSpeed's partitions. Collective."""
        if self.engine is None:
            return  # DCP loaded into the training tensors themselves
        import deepspeed
        from deepspeed.utils import safe_set_full_optimizer_state

        named, engine = self._named_adapters(), self.engine
        params = [p for _, p in named]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if dist.get_rank() == 0:
                for name, p in named:
                    p.data.copy_(msd[name].to(p.dtype).reshape(p.shape))
        engine.optimizer.refresh_fp32_params()  # its fp32 partitions from the module's (now loaded) values
        step = osd["state"][named[0][0]]["step"] if named else torch.zeros(())
        inner = engine.optimizer.optimizer
        for flat in engine.optimizer.fp32_partitioned_groups_flat:
            # torch AdamW creates its state at the first step unless it exists (as torch's load_state_dict makes it)
            inner.state[flat] = {
                "step": step.clone().float().cpu(),
                **{k: torch.zeros_like(flat) for k in MOMENTS},
            }
        for name, p in named:
            for k in MOMENTS:
                safe_set_full_optimizer_state(p, osd["state"][name][k], k)

    def adapter_grads(self) -> dict[str, torch.Tensor]:
        """DeepSpeed's partitions hold the mean over the ranks of each rank's gradient of its loss scaled by the
        world size (`backward`): the sum over the ranks, gathered whole here. Collective."""
        if self.engine is None:
            return {name: p.grad for name, p in self._named_adapters()}
        from deepspeed.utils import safe_get_full_grad

        return {name: safe_get_full_grad(p).reshape(tuple(p.ds_shape)) for name, p in self._named_adapters()}

    def local_trainable(self) -> list[torch.Tensor]:
        """Each adapter's partition on this rank (`ds_tensor`; the engine's optimizer copies its fp32 master
        into it after every step), from which the next forward gathers it: read now, as the engine re-points the
        partitions into flat buffers when it is made. Between forwards no adapter may be left gathered (no
        persistence: ds_config), or a write here would not reach the forward."""
        if self.engine is None:
            return [p for _, p in self._named_adapters()]
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        named = self._named_adapters()
        gathered = [name for name, p in named if p.ds_status != ZeroParamStatus.NOT_AVAILABLE]
        if gathered:
            raise RuntimeError(f"DeepSpeed left adapters gathered between forwards: {gathered[:3]}")
        return [p.ds_tensor for _, p in named]

    def unwrap(self) -> torch.nn.Module:
        return self.model  # the engine's module is this very model

    def gathered_root(self):
        return contextlib.nullcontext()  # the engine's hooks gather every module's weights as it runs

    def sharding_report(self) -> dict[str, int]:
        params = list(self.model.parameters())
        if params and hasattr(params[0], "ds_numel"):  # partitioned
            return {
                "local": sum(p.ds_tensor.numel() for p in params),
                "total": sum(p.ds_numel for p in params),
            }
        n = sum(p.numel() for p in params)
        return {"local": n, "total": n}


def _flat_states(engine) -> list[dict]:
    """The torch AdamW state of each of DeepSpeed's flat fp32 partitions (created at the first step)."""
    inner = engine.optimizer.optimizer
    return [inner.state[flat] for flat in engine.optimizer.fp32_partitioned_groups_flat]


MOMENTS = ("exp_avg", "exp_avg_sq")
