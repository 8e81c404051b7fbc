"""What the launcher says: FSDP settings from `accelerate launch` (or an accelerate YAML under torchrun).

`accelerate launch --config_file X.yaml` turns the YAML into FSDP_* / ACCELERATE_* environment variables
for each process. On a machine without GPUs accelerate itself would then run plain DDP (or one process)
without a word, so shardtune never hands the model to accelerate: it reads those settings here and
applies torch's FSDP itself (see parallel.py), the same way on CPU and GPU.

Only the settings that mean something for FSDP + 4-bit QLoRA are mapped; ones that would silently change
what runs (FSDP2, use_orig_params=false, DeepSpeed ZeRO stages other than 3, optimizer offload) are refused
with the reason. A DeepSpeed config selects shardtune's ZeRO-3 backend (parallel.backend=deepspeed, zero3.py);
its batch and clipping values are the recipe's (train.global_batch_size, train.max_grad_norm).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from shardtune.config import ConfigError

# FSDP1 accepted numeric strategies in old accelerate configs (1 = FULL_SHARD, ...).
_STRATEGIES = {"1": "FULL_SHARD", "2": "SHARD_GRAD_OP", "3": "NO_SHARD", "4": "HYBRID_SHARD"}


def _bool(value: str) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _from_fsdp_settings(settings: dict[str, str], mixed_precision: str | None, origin: str) -> dict[str, Any]:
    """Map accelerate's fsdp_* keys (YAML names without the prefix) to shardtune `parallel.*` overrides."""
    version = str(settings.get("version", "1"))
    if version != "1":
        # NOTE: measured on H200s: FSDP2's fully_shard on bitsandbytes Params4bit shifts a 4-bit layer's
        # output by 4.6% while the loss curve looks normal (see README, "What runs where"). FSDP1 is exact.
        raise ConfigError(
            f"{origin}: fsdp_version={version} is not supported with 4-bit weights: FSDP2 corrupts bitsandbytes "
            f"4-bit weights on GPU (the loss does not show it). Set fsdp_version: 1."
        )
    out: dict[str, Any] = {}
    if "sharding_strategy" in settings:
        value = str(settings["sharding_strategy"]).upper()
        # 'auto' is shardtune's own value (accelerate passes it through untouched): the base whole on every GPU
        # where it fits, else sharded
        out["parallel.sharding_strategy"] = "auto" if value == "AUTO" else _STRATEGIES.get(value, value)
    policy = str(settings.get("auto_wrap_policy", "TRANSFORMER_BASED_WRAP")).upper()
    if policy not in ("TRANSFORMER_BASED_WRAP", "NONE", ""):
        raise ConfigError(
            f"{origin}: fsdp_auto_wrap_policy={policy} is not supported; shardtune wraps each decoder layer "
            f"(TRANSFORMER_BASED_WRAP) and each LoRA adapter as its own FSDP unit."
        )
    if settings.get("transformer_layer_cls_to_wrap"):
        classes = [c.strip() for c in str(settings["transformer_layer_cls_to_wrap"]).split(",") if c.strip()]
        if len(classes) != 1:
            raise ConfigError(
                f"{origin}: fsdp_transformer_layer_cls_to_wrap must name one class, got {classes}"
            )
        out["parallel.wrap_class"] = classes[0]
    if "use_orig_params" in settings and not _bool(settings["use_orig_params"]):
        raise ConfigError(
            f"{origin}: fsdp_use_orig_params=false cannot train LoRA on a frozen base (FSDP would need every "
            f"parameter of a unit to be trainable). Set fsdp_use_orig_params: true."
        )
    for key, field in (
        ("offload_params", "cpu_offload"),
        ("activation_checkpointing", "activation_checkpointing"),
        ("forward_prefetch", "forward_prefetch"),
    ):
        if key in settings:
            out[f"parallel.{field}"] = _bool(settings[key])
    checkpointing = str(settings.get("activation_checkpointing", "")).strip().lower()
    if checkpointing in ("auto", "selective"):
        # shardtune's own values (accelerate passes them through untouched): recompute as little as fits, or
        # only the cheap parts
        out["parallel.activation_checkpointing"] = checkpointing
    if settings.get("backward_prefetch"):
        out["parallel.backward_prefetch"] = str(settings["backward_prefetch"]).upper()
    if mixed_precision:
        out["parallel.mixed_precision"] = mixed_precision.lower()
    return out


def _from_deepspeed_settings(
    settings: dict[str, str], mixed_precision: str | None, origin: str
) -> dict[str, Any]:
    """Map accelerate's deepspeed_config keys (zero_stage, offload_param_device, offload_optimizer_device) to
    shardtune `parallel.*` overrides."""
    if settings.get("deepspeed_config_file"):
        raise ConfigError(
            f"{origin}: deepspeed_config_file is not supported; give zero_stage and the offload devices in "
            f"the accelerate YAML's deepspeed_config (see fsdp_configs/zero3_2xh100.yaml)."
        )
    stage = str(settings.get("zero_stage", "3"))
    if stage != "3":
        raise ConfigError(
            f"{origin}: zero_stage={stage}: shardtune's DeepSpeed backend is ZeRO stage 3 (stages 1 and 2 keep the "
            f"whole 4-bit base on every GPU). Set zero_stage: 3, or use an FSDP config from fsdp_configs/."
        )
    out: dict[str, Any] = {"parallel.backend": "deepspeed"}
    param = str(settings.get("offload_param_device", "none")).lower()
    if param not in ("none", "cpu"):
        raise ConfigError(f"{origin}: offload_param_device={param} is not supported; use none or cpu.")
    out["parallel.cpu_offload"] = param == "cpu"
    optimizer = str(settings.get("offload_optimizer_device", "none")).lower()
    if optimizer != "none":
        raise ConfigError(
            f"{origin}: offload_optimizer_device={optimizer}: shardtune keeps the adapters' AdamW state on the "
            f"GPUs (16 bytes per LoRA parameter, partitioned: about 1.5 GiB per GPU for 70B at r=16 on 2 GPUs). Set "
            f"offload_optimizer_device: none."
        )
    if mixed_precision:
        out["parallel.mixed_precision"] = mixed_precision.lower()
    return out


def accelerate_env_overrides(env: dict[str, str] | None = None) -> tuple[dict[str, Any], str | None]:
    """Overrides from the environment `accelerate launch` sets, and a description of the origin (or None)."""
    env = dict(os.environ if env is None else env)
    if _bool(env.get("ACCELERATE_USE_DEEPSPEED", "false")):
        origin = "accelerate config (ACCELERATE_DEEPSPEED_* environment)"
        # the YAML's deepspeed_config keys, as accelerate exports them
        names = {
            "ACCELERATE_DEEPSPEED_CONFIG_FILE": "deepspeed_config_file",
            "ACCELERATE_DEEPSPEED_ZERO_STAGE": "zero_stage",
            "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "offload_param_device",
            "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "offload_optimizer_device",
        }
        settings = {key: env[var] for var, key in names.items() if var in env}
        return _from_deepspeed_settings(settings, env.get("ACCELERATE_MIXED_PRECISION"), origin), origin
    if not _bool(env.get("ACCELERATE_USE_FSDP", "false")):
        if "ACCELERATE_MIXED_PRECISION" in env:  # launched by accelerate, but not with an FSDP config
            return {
                "parallel.mixed_precision": env["ACCELERATE_MIXED_PRECISION"].lower()
            }, "accelerate launch"
        return {}, None
    settings = {k.removeprefix("FSDP_").lower(): v for k, v in env.items() if k.startswith("FSDP_")}
    settings["transformer_layer_cls_to_wrap"] = env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    origin = "accelerate config (FSDP_* environment)"
    return _from_fsdp_settings(settings, env.get("ACCELERATE_MIXED_PRECISION"), origin), origin


def accelerate_yaml_overrides(path: str | Path) -> tuple[dict[str, Any], str]:
    """Overrides from an accelerate config YAML file (as `accelerate launch --config_file` would read it)."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parallel.launch_config: no such file: {path}")
    try:
        cluster = load_config_from_file(str(path))
    except Exception as e:  # accelerate raises plain exceptions for malformed files
        raise ConfigError(f"{path}: not a valid accelerate config: {e}") from None
    origin = f"accelerate config {path}"
    distributed = str(cluster.distributed_type).split(".")[-1]
    if distributed not in ("FSDP", "DEEPSPEED"):
        raise ConfigError(
            f"{origin}: distributed_type is {distributed}; shardtune configs use distributed_type FSDP or DEEPSPEED."
        )
    if getattr(cluster, "use_cpu", False):
        raise ConfigError(
            f"{origin}: use_cpu: true makes `accelerate launch` start a single process; leave it false "
            f"(shardtune trains on the CPU by itself when there is no GPU)."
        )
    mixed = str(cluster.mixed_precision).split(".")[-1].lower() if cluster.mixed_precision else None
    if distributed == "DEEPSPEED":
        return _from_deepspeed_settings(dict(cluster.deepspeed_config or {}), mixed, origin), origin
    fsdp = {k.removeprefix("fsdp_"): v for k, v in (cluster.fsdp_config or {}).items()}
    return _from_fsdp_settings(fsdp, mixed, origin), origin


def launch_info(path: str | Path) -> dict[str, Any]:
    """Process layout an accelerate config asks for (used to validate bundled configs)."""
    from accelerate.commands.config.config_args import load_config_from_file

    cluster = load_config_from_file(str(path))
    return {
        "num_processes": cluster.num_processes,
        "num_machines": cluster.num_machines,
        "distributed_type": str(cluster.distributed_type).split(".")[-1],
    }
