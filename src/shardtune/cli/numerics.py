"""`shardtune doctor RECIPE --numerics`: does the sharded model compute what the unsharded model computes?

    torchrun --nproc_per_node 2 -m shardtune.cli doctor recipes/tiny.py --numerics [key=value ...]
    accelerate launch --config_file fsdp_configs/zero3_cpu_2proc.yaml -m shardtune.cli doctor recipes/tiny.py --numerics

Launched as the run is (the same launcher, processes and settings: an accelerate config's apply as they do to
the run), it builds the first LAYERS decoder layers of the run's model exactly as the run builds them (4-bit
base, LoRA, the run's backend and sharding, the settings left to auto decided as the run decides them), and a
second copy unsharded on the same device (one process's model: FsdpBackend alone). Both get the same nonzero
adapters; one forward and backward on a fixed batch; the largest relative difference of the logits, the loss
and the adapters' gradients (summed over the ranks, as the step sums them) against the tolerance: none in
float32 (bit-identical; ZeRO-3's gradients: ZERO3_FP32_GRADS), TOLERANCE in bf16/fp16. The verdict says what
differs first and what to change.
Exit 0 when within the tolerance, 1 when not, 2 for a configuration error.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import sys
import warnings

import torch
import torch.nn.functional as F

from shardtune.cli.args import load_recipe_config, resolve_config
from shardtune.config import Config, apply_overrides
from shardtune.errors import ConfigError
from shardtune.model import loading, modeling
from shardtune.parallel.adapters import adapters, fqn
from shardtune.parallel.backend import Backend
from shardtune.parallel.distributed import DistInfo, all_reduce_max, init_distributed, teardown
from shardtune.parallel.fsdp import FsdpBackend
from shardtune.train.build import resolve_settings, run_backend
from shardtune.train.step import compute_context

LAYERS = 2  # decoder layers built: enough for a layer's output to feed another
TOLERANCE = 1e-3  # largest relative difference allowed in bf16/fp16; float32 must be bit-identical
# except ZeRO-3's adapter gradients in float32: DeepSpeed's own linear (its backward multiplies in another
# order) and its gradient reduction differ from the unsharded model's in the last bits (~1e-6 measured)
ZERO3_FP32_GRADS = 1e-5
ROWS, TOKENS = 2, 32  # the fixed batch (its second row padded from token 24)
# tests only: a broken setting the check must catch ("fsdp-bf16-buffers": FSDP casts buffers, RoPE's inv_freq
# among them, to bf16, as accelerate's own FSDP mixed precision does)
FAULT_ENV = "SHARDTUNE_NUMERICS_FAULT"


def command(recipe: str, overrides: list[str], force_sharding: bool = False) -> int:
    """Every process of the launch runs this; rank 0 prints the report. `force_sharding`: one process goes
    through the backend's sharding too (a run of one process trains the plain module)."""
    main = os.environ.get("RANK", "0") == "0"
    try:
        # the launcher's settings apply as they do to the run (accelerate's environment, its config file)
        cfg = resolve_config(load_recipe_config(recipe), overrides)
        dist = init_distributed(
            cfg.parallel.device, cfg.parallel.timeout_minutes, cfg.parallel.gpu_memory_limit_gib
        )
        _quiet()
        try:
            result = compare(cfg, dist, force_sharding)
        finally:
            teardown()
    except ConfigError as e:
        if main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if main:
        print(result.report(), flush=True)
    return 0 if result.ok else 1


NAMES = ("logits", "loss", "adapter gradients")


def tolerances(dtype: str, backend: str) -> dict[str, float]:
    """The largest relative difference allowed for the logits, the loss and the adapters' gradients."""
    if dtype != "float32":
        return dict.fromkeys(NAMES, TOLERANCE)
    return {
        "logits": 0.0,
        "loss": 0.0,
        "adapter gradients": ZERO3_FP32_GRADS if backend == "deepspeed" else 0.0,
    }


@dataclasses.dataclass
class Result:
    setup: str  # what was compared, in words
    dtype: str  # the compute dtype
    diffs: dict[str, float]  # logits, loss, adapter gradients: the largest relative difference over the ranks
    tolerance: dict[str, float]  # the same keys: the largest allowed
    buffers: list[str]  # buffers whose dtype differs between the sharded and the unsharded model
    world: int

    def over(self, what: str) -> bool:
        return self.diffs[what] > self.tolerance[what]

    @property
    def ok(self) -> bool:
        return not any(self.over(what) for what in self.diffs)

    def report(self) -> str:
        lines = [f"shardtune doctor --numerics: {self.setup}"]
        if self.world == 1 and "forced" not in self.setup:
            lines.append(
                "  (one process: nothing is sharded; launch this as the run is launched to compare, or add "
                "--force-sharding)"
            )
        for what, d in self.diffs.items():
            summed = " (summed over the processes)" if what == "adapter gradients" else ""
            shown = "0 (bit-identical)" if d == 0 else f"{d:.3g}"
            tol = "bit-identical" if self.tolerance[what] == 0 else f"{self.tolerance[what]:g}"
            mark = "OVER the tolerance" if self.over(what) else "within the tolerance"
            lines.append(f"  {what + summed:<46} largest relative difference {shown:<17} {mark} ({tol})")
        if self.ok:
            lines.append("verdict: OK: the sharded model computes what the unsharded model computes")
        else:
            lines += [f"verdict: FAILED: {self._what_differs()}", f"fix: {self._fix()}"]
        return "\n".join(lines)

    def _what_differs(self) -> str:
        over = [f"{what} {d:.3g}" for what, d in self.diffs.items() if self.over(what)]
        where = (
            "the sharded forward already differs: the weights or buffers it computes with are not the unsharded "
            "model's"
            if self.over("logits")
            else "the forward agrees; the adapters' gradients, summed over the processes, do not"
        )
        return f"{', '.join(over)} over the tolerance ({self.dtype}); {where}"

    def _fix(self) -> str:
        if self.buffers:
            return (
                f"buffers of another dtype under sharding ({'; '.join(self.buffers)}): something casts the "
                "model's buffers (FSDP MixedPrecision(buffer_dtype=...), DeepSpeed's bf16.enabled); leave them in "
                "their own dtype (RoPE's inv_freq rounded to bf16 shifts every position's angle), as shardtune's "
                "backends do"
            )
        if self.over("logits"):
            return (
                "keep the 4-bit storage dtype equal to the compute dtype (quant.storage_dtype=auto) and no wrapper "
                "casting the weights; run again with parallel.mixed_precision=no (float32: must be bit-identical) "
                "and with the other parallel.backend to tell rounding from a backend's fault"
            )
        return (
            "the step must sum the adapters' gradients over the processes exactly once (FSDP: "
            "reduce_adapter_grads; ZeRO-3: the loss scaled by the number of processes before DeepSpeed averages); "
            "check parallel.backend's gradient reduction and the launcher's process count"
        )


def compare(cfg: Config, dist: DistInfo, force_sharding: bool = False) -> Result:
    """The first LAYERS layers built sharded (the run's backend) and unsharded; one forward and backward each."""
    cfg, hf_config = first_layers(cfg, dist)
    path = None if cfg.model.init == "random" else cfg.model.name_or_path  # random: drawn from the seed
    attn = modeling.attention_implementation(cfg.model.attn_implementation, dist.device)
    backend = run_backend(cfg, dist)
    if force_sharding and not backend.enabled:
        _force(backend)
    _inject_fault(backend)
    sharded, _ = loading.build_model(cfg, hf_config, path, attn, backend, dist.device)
    alone = FsdpBackend(cfg.parallel, cfg.param_dtype, DistInfo.alone(dist.device))
    reference, _ = loading.build_model(cfg, hf_config, path, attn, alone, dist.device)
    values = _nonzero_adapters(reference)
    _assign(reference, values)
    _assign(sharded, values)
    model = backend.wrap(torch.optim.AdamW(adapters(sharded), lr=1e-3))
    alone.wrap(torch.optim.AdamW(adapters(reference), lr=1e-3))
    autocast = modeling.DTYPES[cfg.param_dtype] if cfg.lora.compute_dtype == "auto" else None
    autocast = None if cfg.param_dtype == "float32" else autocast
    batch = _fixed_batch(hf_config.vocab_size, dist.device)
    logits, loss = _forward(model, batch, dist.device, autocast)
    backend.backward(loss)
    grads = backend.adapter_grads()
    ref_logits, ref_loss = _forward(reference, batch, dist.device, autocast)
    ref_loss.backward()
    ref_grads = {fqn(n): p.grad * dist.world_size for n, p in reference.named_parameters() if p.requires_grad}
    if grads.keys() != ref_grads.keys():
        raise RuntimeError(
            f"the sharded model's adapters are not the unsharded one's: {sorted(grads)[:4]} ..."
        )
    diffs = all_reduce_max(
        [
            _relative(logits, ref_logits),
            _relative(loss, ref_loss),
            max(_relative(grads[n], ref_grads[n]) for n in ref_grads),
        ],
        dist.device,
    )
    setup = (
        f"{hf_config.num_hidden_layers} of the model's decoder layers ({cfg.model.name_or_path}, "
        f"{modeling.describe_quant(cfg)}, LoRA r="
        f"{cfg.lora.r}), {backend.name} on {dist.world_size} {dist.device.type.upper()} process(es), compute "
        f"{cfg.param_dtype}; one forward and backward on a fixed batch of {ROWS}x{TOKENS} tokens against an "
        "unsharded copy on the same device"
    )
    buffers = _buffer_dtypes(backend.unwrap(), reference)
    diffs = dict(zip(NAMES, diffs, strict=True))
    tolerance = tolerances(cfg.param_dtype, cfg.parallel.backend)
    return Result(setup, cfg.param_dtype, diffs, tolerance, buffers, dist.world_size)


def first_layers(cfg: Config, dist: DistInfo):
    """The run's settings decided as the run decides them (for the whole model), and the architecture of its
    first LAYERS layers: a model.shape override where the model is random, the layer count cut in the
    architecture where its weights are read from a checkpoint (model.shape needs init=random)."""
    whole = modeling.model_config(cfg)
    cfg = resolve_settings(cfg, whole, dist)
    # dropout off: its masks are drawn, not computed (and sharding has nothing to do with them)
    cfg = apply_overrides(cfg, {"lora.dropout": 0.0}, "shardtune doctor --numerics")
    layers = min(LAYERS, whole.num_hidden_layers)
    if cfg.model.init == "random":
        cfg = apply_overrides(cfg, {"model.shape.num_hidden_layers": layers}, "shardtune doctor --numerics")
        return cfg, modeling.model_config(cfg)
    hf_config = copy.deepcopy(whole)
    hf_config.num_hidden_layers = layers
    return cfg, hf_config


def _quiet() -> None:
    """The warnings the run's logging set-up silences (cli/recipe.py): transformers' and torch's about their own
    internals."""
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")


def _force(backend: Backend) -> None:
    """One process wrapped in the backend's sharding all the same (FSDP units of one rank; DeepSpeed partitions
    of one): where 4-bit weights were seen to break (FSDP2's all-gather of bitsandbytes' packed bytes)."""
    if not isinstance(backend, FsdpBackend):
        import deepspeed

        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    backend.enabled = True
    backend.name += " (forced on one process)"


def _inject_fault(backend: Backend) -> None:
    if os.environ.get(FAULT_ENV) == "fsdp-bf16-buffers" and isinstance(backend, FsdpBackend):
        backend.kwargs["mixed_precision"] = dataclasses.replace(
            backend.kwargs["mixed_precision"], buffer_dtype=torch.bfloat16
        )


def _nonzero_adapters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The same nonzero values for both models' adapters (LoRA B starts at zero, and would leave A untested)."""
    g = torch.Generator().manual_seed(0)
    named = sorted((fqn(n), tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad)
    return {name: torch.randn(shape, generator=g) * 0.05 for name, shape in named}


def _assign(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    named = [(fqn(n), p) for n, p in model.named_parameters() if p.requires_grad]
    partitioned = any(hasattr(p, "ds_shape") for _, p in named)  # ZeRO-3: whole only while gathered
    if partitioned:
        import deepspeed

        context = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=0)
    else:
        context = contextlib.nullcontext()
    with context, torch.no_grad():
        for name, p in named:
            p.copy_(values[name].to(device=p.device, dtype=p.dtype).reshape(p.shape))


def _fixed_batch(vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (ROWS, TOKENS), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 24:] = 0
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _forward(model, batch: dict, device: torch.device, autocast: torch.dtype | None):
    """Logits, and the mean token cross-entropy over the unpadded next tokens (the run's objective)."""
    with compute_context(device, autocast):
        logits = model(**batch, use_cache=False).logits
    labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )
    return logits.detach(), loss


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference relative to the reference's largest magnitude (0 where they are identical)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if torch.equal(a, b):
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _buffer_dtypes(sharded: torch.nn.Module, reference: torch.nn.Module) -> list[str]:
    """Buffers the sharded model holds in another dtype than the unsharded one (after the forward, when a
    wrapper has cast them)."""
    theirs = {fqn(n): b.dtype for n, b in reference.named_buffers()}
    return [
        f"{fqn(n)}: {str(b.dtype).removeprefix('torch.')} sharded, "
        f"{str(theirs[fqn(n)]).removeprefix('torch.')} unsharded"
        for n, b in sharded.named_buffers()
        if fqn(n) in theirs and b.dtype != theirs[fqn(n)]
    ]
