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

from shardtune.config.checks import FALSE_WORDS, TRUE_WORDS, checkpointing_value
from shardtune.errors import ConfigError

# FSDP1's strategies by name, and by number as older accelerate configs give them (torch's ShardingStrategy
# values: 1 = FULL_SHARD, ...). HYBRID_SHARD_ZERO2 is accelerate's name for torch's _HYBRID_SHARD_ZERO2.
_STRATEGIES = {
    "1": "FULL_SHARD",
    "2": "SHARD_GRAD_OP",
    "3": "NO_SHARD",
    "4": "HYBRID_SHARD",
    "5": "HYBRID_SHARD_ZERO2",
}
# What shardtune's parallel.sharding_strategy accepts ('auto' is its own value; SHARD_GRAD_OP only without 4-bit,
# which Config says with the reason)
_ACCEPTED_STRATEGIES = "FULL_SHARD, NO_SHARD, HYBRID_SHARD or auto"
# accelerate's own reading of true/false (accelerate.utils.str_to_bool)
_TRUE, _FALSE = TRUE_WORDS, FALSE_WORDS
# What `accelerate launch` exports for an FSDP setting its config file and command line leave out (accelerate
# 1.x, commands/launch.py and utils/launch.py). Such a value says nothing: the recipe's own setting stands, as it
# does under torchrun with parallel.launch_config, where only the YAML's own keys apply.
_LAUNCH_DEFAULTS = {
    "version": "1",
    "sharding_strategy": "full_shard",
    "reshard_after_forward": "true",
    "offload_params": "false",
    "forward_prefetch": "false",
    "use_orig_params": "true",
    "activation_checkpointing": "false",
    "mixed_precision": "no",
}


def _bool(value: Any, key: str, origin: str) -> bool:
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(
        f"{origin}: {key}={value!r} is not true or false; set {key} to true or false "
        f"(accepted: {', '.join(_TRUE)} / {', '.join(_FALSE)})."
    )


def _strategy(value: Any, key: str, origin: str) -> str:
    """An FSDP1 sharding strategy as accelerate reads one (a name in any case, or torch's number), or 'auto'."""
    text = str(value).strip().upper()
    if text == "AUTO":
        return "auto"
    text = _STRATEGIES.get(text, text)
    if text == "HYBRID_SHARD_ZERO2":
        # NOTE: SHARD_GRAD_OP within each machine: the same parameters-kept-after-forward that 4-bit refuses
        raise ConfigError(
            f"{origin}: {key}=HYBRID_SHARD_ZERO2 is not supported: like SHARD_GRAD_OP it keeps parameters "
            f"gathered after forward, which bitsandbytes' 4-bit weights (re-wrapped in every forward) do not "
            f"allow. Set {key}: HYBRID_SHARD."
        )
    if text in _STRATEGIES.values():
        return text
    if text.lower() in _TRUE + _FALSE:
        # NOTE: accelerate refuses a boolean for FSDP1 too ("not supported with FSDP1, please set to a str")
        raise ConfigError(
            f"{origin}: {key}={value!r} is FSDP2's form (reshard after forward: true/false); with fsdp_version: 1 "
            f"give a sharding strategy: {_ACCEPTED_STRATEGIES}."
        )
    raise ConfigError(
        f"{origin}: {key}={value!r} is not a sharding strategy; set {key} to one of {_ACCEPTED_STRATEGIES}."
    )


def _sharding_strategy(settings: dict[str, Any], origin: str) -> str | None:
    """parallel.sharding_strategy from fsdp_sharding_strategy and/or fsdp_reshard_after_forward.

    `accelerate config` (1.x) writes the FSDP1 strategy as fsdp_reshard_after_forward (FULL_SHARD, SHARD_GRAD_OP,
    NO_SHARD, HYBRID_SHARD, HYBRID_SHARD_ZERO2; FSDP2 takes true/false there); fsdp_sharding_strategy is the
    older key, which accelerate's plugin still prefers when both are set. Both mean the same setting, so a file
    that gives both must give the same strategy."""
    found = {
        key: _strategy(settings[key], f"fsdp_{key}", origin)
        for key in ("sharding_strategy", "reshard_after_forward")
        if key in settings
    }
    if len(set(found.values())) > 1:
        raise ConfigError(
            f"{origin}: fsdp_sharding_strategy={settings['sharding_strategy']!r} and fsdp_reshard_after_forward="
            f"{settings['reshard_after_forward']!r} disagree; both set the FSDP1 sharding strategy. Keep one of "
            f"them (fsdp_reshard_after_forward is what `accelerate config` writes)."
        )
    return next(iter(found.values()), None)


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
    # 'auto' is shardtune's own value (accelerate passes it through untouched): the base whole on every GPU where
    # it fits, else sharded
    strategy = _sharding_strategy(settings, origin)
    if strategy is not None:
        out["parallel.sharding_strategy"] = strategy
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
    if "use_orig_params" in settings and not _bool(
        settings["use_orig_params"], "fsdp_use_orig_params", origin
    ):
        raise ConfigError(
            f"{origin}: fsdp_use_orig_params=false cannot train LoRA on a frozen base (FSDP would need every "
            f"parameter of a unit to be trainable). Set fsdp_use_orig_params: true."
        )
    for key, field in (("offload_params", "cpu_offload"), ("forward_prefetch", "forward_prefetch")):
        if key in settings:
            out[f"parallel.{field}"] = _bool(settings[key], f"fsdp_{key}", origin)
    if "activation_checkpointing" in settings:
        # 'auto', 'selective', 'offload' and per-layer patterns are shardtune's own values (accelerate passes
        # them through untouched): recompute as little as fits, only the cheap parts, nothing (host memory
        # instead), or a mix of these by layer
        try:
            out["parallel.activation_checkpointing"] = checkpointing_value(
                settings["activation_checkpointing"]
            )
        except ValueError as e:
            raise ConfigError(
                f"{origin}: fsdp_activation_checkpointing={e} (every k-th layer: true, and parallel."
                f"checkpoint_every=k on the command line)."
            ) from None
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
    if "offload_param_device" in settings:  # left out: the recipe's parallel.cpu_offload stands
        param = str(settings["offload_param_device"]).lower()
        if param not in ("none", "cpu"):
            raise ConfigError(
                f"{origin}: offload_param_device={param} is not supported; set offload_param_device to none or cpu."
            )
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


def accelerate_env_overrides(
    env: dict[str, str] | None = None, config_file: str | Path | None = None
) -> tuple[dict[str, Any], str | None]:
    """Overrides from the environment `accelerate launch` sets, and a description of the origin (or None).

    accelerate exports every FSDP setting, its own default where the config file is silent
    (FSDP_OFFLOAD_PARAMS=false, FSDP_ACTIVATION_CHECKPOINTING=false, ...). So that a recipe's settings stand where
    the file is silent, as under torchrun with parallel.launch_config, a setting applies only when the config file
    (`config_file`; by default the one the `accelerate launch` that started this process read) has its key, or its
    value is not accelerate's default (a command-line flag of `accelerate launch` set it)."""
    if env is None:
        env = dict(os.environ)
        config_file = config_file or launching_config_file()
    present = _file_keys(config_file) if config_file else None
    where = f"accelerate config {config_file}" if config_file else "accelerate config"

    def given(key: str, value: str) -> bool:
        return (present is not None and key in present) or str(value).strip().lower() != _LAUNCH_DEFAULTS.get(
            key
        )

    mixed = env.get("ACCELERATE_MIXED_PRECISION")
    mixed = mixed if mixed is not None and given("mixed_precision", mixed) else None
    if _bool(env.get("ACCELERATE_USE_DEEPSPEED", "false"), "ACCELERATE_USE_DEEPSPEED", "environment"):
        origin = f"{where} (ACCELERATE_DEEPSPEED_* environment)"
        # the YAML's deepspeed_config keys, as accelerate exports them (only those the file or a flag gave)
        names = {
            "ACCELERATE_DEEPSPEED_CONFIG_FILE": "deepspeed_config_file",
            "ACCELERATE_DEEPSPEED_ZERO_STAGE": "zero_stage",
            "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "offload_param_device",
            "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "offload_optimizer_device",
        }
        settings = {key: env[var] for var, key in names.items() if var in env}
        return _from_deepspeed_settings(settings, mixed, origin), origin
    if not _bool(env.get("ACCELERATE_USE_FSDP", "false"), "ACCELERATE_USE_FSDP", "environment"):
        if mixed is not None:  # launched by accelerate, but not with an FSDP config
            return {"parallel.mixed_precision": mixed.lower()}, "accelerate launch"
        return {}, None
    settings = {k.removeprefix("FSDP_").lower(): v for k, v in env.items() if k.startswith("FSDP_")}
    if "FSDP_TRANSFORMER_CLS_TO_WRAP" in env:  # the YAML's fsdp_transformer_layer_cls_to_wrap
        settings["transformer_layer_cls_to_wrap"] = settings.pop("transformer_cls_to_wrap")
    settings = {k: v for k, v in settings.items() if given(k, v)}
    origin = f"{where} (FSDP_* environment)"
    return _from_fsdp_settings(settings, mixed, origin), origin


def _file_keys(path: str | Path) -> set[str]:
    """The settings an accelerate config file gives: its top-level keys and those of its fsdp_config and
    deepspeed_config, without the fsdp_ prefix (accelerate adds it when it is missing)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}  # YAML or JSON, as accelerate reads either
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(
            f"{path}: cannot read the accelerate config `accelerate launch` used: {e}"
        ) from None
    keys = set(data) if isinstance(data, dict) else set()
    for section in ("fsdp_config", "deepspeed_config"):
        inner = data.get(section) if isinstance(data, dict) else None
        keys |= {str(k).removeprefix("fsdp_") for k in (inner or {})}
    return keys


def launching_config_file(pid: int | None = None) -> Path | None:
    """The config file of the `accelerate launch` that started this process (its --config_file, else accelerate's
    default config file when it exists, as accelerate itself picks), or None when no such launcher is found.
    accelerate does not export the path; its processes are its children (or, for one process, its child's)."""
    pid = os.getppid() if pid is None else pid
    for _ in range(3):  # the launcher, or torch's elastic agent under it
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None
        # `accelerate launch ...`, `accelerate-launch ...` or `python -m accelerate.commands.launch ...`
        start = next(
            (
                i + 1
                for i, a in enumerate(argv)
                if a in ("accelerate.commands.launch", "accelerate-launch")
                or Path(a).name == "accelerate-launch"
                or (a == "launch" and any(Path(x).name == "accelerate" for x in argv[:i]))
            ),
            None,
        )
        if start is not None:
            args = argv[start:]
            for i, arg in enumerate(args):
                if arg.endswith(".py"):  # the training script: what follows are its own arguments
                    break
                if arg == "--config_file" and i + 1 < len(args):
                    return cwd / args[i + 1]
                if arg.startswith("--config_file="):
                    return cwd / arg.split("=", 1)[1]
            from accelerate.commands.config.config_args import default_config_file

            return Path(default_config_file) if Path(default_config_file).is_file() else None
        if pid <= 1:
            return None
    return None


def accelerate_yaml_overrides(path: str | Path) -> tuple[dict[str, Any], str]:
    """Overrides from an accelerate config YAML file (as `accelerate launch --config_file` would read it): the
    settings the file gives; the recipe's stand where it is silent."""
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
    mixed = None
    if "mixed_precision" in _file_keys(path) and cluster.mixed_precision:
        mixed = str(cluster.mixed_precision).split(".")[-1].lower()
    if distributed == "DEEPSPEED":
        return _from_deepspeed_settings(dict(cluster.deepspeed_config or {}), mixed, origin), origin
    fsdp = {k.removeprefix("fsdp_"): v for k, v in (cluster.fsdp_config or {}).items()}
    return _from_fsdp_settings(fsdp, mixed, origin), origin
