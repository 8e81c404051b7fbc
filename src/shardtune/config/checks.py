"""Checks of a configuration beyond each field's own: settings that conflict (run by Config's validator, also on
a saved run's configuration), and what the model's names must be (target modules, model.shape keys, trackers);
the inputs a configuration names on this machine are inputs.py's."""

from __future__ import annotations

import difflib
import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shardtune.config.schema import Config

# Dataset sources that are files on disk, by extension; anything else that is not 'generated' is a hub name.
LOCAL_DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
PARAM_DTYPES = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}
BUILTIN_SHAPE_NAMES = ("tiny", "llama3-8b", "llama3-70b")
# The linear layers of a Llama decoder layer, by the names lora.target_modules gives PEFT, and the model types
# whose decoder layers have exactly these
LLAMA_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA_STYLE_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
# train.report_to's trackers: the module each imports, and what installs it
TRACKERS = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "mlflow": ("mlflow", "pip install 'shardtune[mlflow]' (or: pip install mlflow)"),
    "wandb": ("wandb", "pip install 'shardtune[wandb]' (or: pip install wandb)"),
}


def cross_checks(cfg: Config) -> None:
    """Settings that cannot go together, each refused with the fix (ValueError: pydantic reports it as the
    configuration's error)."""
    _quantization_conflicts(cfg)
    _backend_conflicts(cfg)
    _batch_conflicts(cfg)
    _optimizer_conflicts(cfg)
    _model_and_data_conflicts(cfg)
    _objective_conflicts(cfg)
    _checkpointing_conflicts(cfg)


def _checkpointing_conflicts(cfg: Config) -> None:
    mode, every = cfg.parallel.activation_checkpointing, cfg.parallel.checkpoint_every
    if every != 1 and isinstance(mode, str) and mode not in CHECKPOINTING_MODES:
        raise ValueError(
            f"parallel.checkpoint_every={every} beside the pattern parallel.activation_checkpointing={mode}: a "
            f"pattern says what every layer does itself. Leave parallel.checkpoint_every at 1, or write the "
            f"pattern for it (one layer in {every} recomputed: {'r' + 'k' * (every - 1)})"
        )


def _quantization_conflicts(cfg: Config) -> None:
    old = cfg.quant.load_in_4bit  # left set only where it disagrees with quant.bits (QuantConfig._alias)
    if old is not None:
        raise ValueError(
            f"quant.load_in_4bit={str(old).lower()} conflicts with quant.bits={cfg.quant.bits}: quant.load_in_4bit "
            f"is the old name of quant.bits=4 (true) or 16 (false); set quant.bits alone"
        )
    param = PARAM_DTYPES[cfg.parallel.mixed_precision]
    storage = cfg.quant.storage_dtype
    if cfg.quant.bits == 4 and storage not in ("auto", param):
        # NOTE: FSDP flattens every parameter of a wrapped unit into one FlatParameter of a single dtype.
        # bitsandbytes stores the packed 4-bit bytes inside a tensor of quant.storage_dtype; unless that
        # dtype is the FSDP parameter dtype, FSDP cannot flatten the decoder layer together with its
        # norms, and a mixed-precision cast would reinterpret the packed bytes as numbers.
        raise ValueError(
            f"quant.storage_dtype={storage} conflicts with parallel.mixed_precision="
            f"{cfg.parallel.mixed_precision} (FSDP parameter dtype {param}). FSDP shards the packed 4-bit "
            f"weights only when they are stored in the FSDP parameter dtype; set quant.storage_dtype=auto "
            f"(or {param})."
        )
    if cfg.quant.bits == 8 and cfg.parallel.cpu_offload:
        raise ValueError(
            "parallel.cpu_offload=true does not work with quant.bits=8: FSDP offloads the shards of the base, and "
            "it cannot shard an 8-bit base (every process holds it whole); use quant.bits=4, or no offload."
        )
    if cfg.quant.bits == 4 and cfg.parallel.sharding_strategy == "SHARD_GRAD_OP":
        # NOTE: bitsandbytes re-wraps a Linear4bit's weight in its forward (to reattach the quantization
        # state FSDP's flattening dropped); FSDP1 only allows that when parameters are resharded after
        # forward, which SHARD_GRAD_OP skips ("does not support changing the parameters between forward
        # and backward").
        raise ValueError(
            "parallel.sharding_strategy=SHARD_GRAD_OP does not work with 4-bit bitsandbytes weights (they are "
            "re-wrapped in every forward); use FULL_SHARD, or HYBRID_SHARD across machines."
        )


def _backend_conflicts(cfg: Config) -> None:
    if cfg.parallel.backend != "deepspeed":
        return
    if cfg.quant.bits == 8:
        # NOTE: not tried: ZeRO-3 partitions every parameter; LLM.int8 keeps its row scales (SCB) beside the int8
        # weight on the module, which a partitioned weight's gather would not bring back
        raise ValueError(
            "quant.bits=8 does not work with parallel.backend=deepspeed (ZeRO-3 partitions the int8 weights, whose "
            "per-row scales bitsandbytes keeps on the module); train the 8-bit base under FSDP (an fsdp_configs/ "
            "config without zero3: every process holds the whole 8-bit base), or use quant.bits=4."
        )
    if cfg.lora.fused is True:
        raise ValueError(
            "lora.fused=true does not work with parallel.backend=deepspeed (ZeRO-3 gathers lora_B's weight "
            "only when lora_B itself runs, and the fused update reads it directly); use lora.fused=auto."
        )
    if cfg.parallel.mixed_precision == "fp16":
        raise ValueError(
            "parallel.mixed_precision=fp16 is not supported with parallel.backend=deepspeed (its loss scaling "
            "is not wired in); use bf16."
        )
    if cfg.train.micro_batch_tokens is not None:
        raise ValueError(
            "train.micro_batch_tokens does not work with parallel.backend=deepspeed (its engine counts a "
            "fixed number of micro-batches per step); use train.micro_batch_size"
        )


def _batch_conflicts(cfg: Config) -> None:
    tokens = cfg.train.micro_batch_tokens
    if tokens is not None and not cfg.data.packing:
        raise ValueError(
            f"train.micro_batch_tokens={tokens} needs data.packing=true (padded micro-batches are sized in "
            "rows: train.micro_batch_size)"
        )
    if tokens is not None and tokens < cfg.data.max_len:
        raise ValueError(
            f"train.micro_batch_tokens={tokens} is less than data.max_len={cfg.data.max_len}: a row that long "
            f"would not fit a micro-batch; set train.micro_batch_tokens >= {cfg.data.max_len}"
        )
    micro = cfg.train.micro_batch_size
    if tokens is not None and micro == "auto":
        raise ValueError(
            f"train.micro_batch_size=auto with train.micro_batch_tokens={tokens}: packed micro-batches are sized "
            "by their tokens; leave train.micro_batch_size out (or drop train.micro_batch_tokens to let auto "
            "choose the rows)"
        )
    if tokens is None and micro != "auto" and micro > cfg.train.global_batch_size:
        raise ValueError(
            f"train.micro_batch_size={cfg.train.micro_batch_size} exceeds train.global_batch_size="
            f"{cfg.train.global_batch_size}"
        )


def _optimizer_conflicts(cfg: Config) -> None:
    o = cfg.optim
    if o.name != "adamw" and cfg.parallel.backend == "deepspeed":
        # NOTE: DeepSpeed hands the optimizer flat fp32 partitions of the adapters, and zero3.py checkpoints
        # their state as AdamW's moments, whole by name; bitsandbytes' state is blockwise over the flat tensor
        # (8-bit codes, per-block scales), which that format does not carry.
        raise ValueError(
            f"optim.name={o.name} (bitsandbytes) does not work with parallel.backend=deepspeed (its checkpoints "
            f"hold torch AdamW's moments of DeepSpeed's partitions); set optim.name=adamw, or train under FSDP "
            f"(an fsdp_configs/ config without zero3)."
        )
    if o.scheduler == "cosine_with_min_lr" and o.min_lr_rate is None:
        raise ValueError(
            "optim.scheduler=cosine_with_min_lr needs the rate it ends at: set optim.min_lr_rate (a fraction of "
            "optim.lr, e.g. optim.min_lr_rate=0.1)"
        )


def optimizer_device_problem(cfg: Config, cuda: bool) -> str | None:
    """Why optim.name cannot run on this machine (`cuda`: whether it has a GPU), None where it can: the paged
    optimizers need CUDA (on the CPU, bitsandbytes would fall back to the unpaged one with a warning)."""
    name, device = cfg.optim.name, cfg.parallel.device
    if not name.startswith("paged_") or device == "cuda" or (device == "auto" and cuda):
        return None
    where = "parallel.device=cpu" if device == "cpu" else "this machine has no CUDA GPU"
    instead = "adamw_8bit" if name == "paged_adamw_8bit" else "adamw"
    return (
        f"optim.name={name} needs CUDA: a paged optimizer keeps its state in CUDA unified memory ({where}). "
        f"Train on a GPU, or set optim.name={instead} (the same optimizer, unpaged)."
    )


def _model_and_data_conflicts(cfg: Config) -> None:
    if cfg.data.generated.min_len > cfg.data.generated.max_len:
        raise ValueError("data.generated.min_len must be <= data.generated.max_len")
    if cfg.model.shape and cfg.model.init != "random":
        raise ValueError("model.shape changes the architecture and needs model.init=random")
    # (the names against the model's own layers: check_inputs and modeling.model_config, not here, where a
    # saved run's configuration is validated again by shardtune merge)
    problem = target_modules_problem(cfg.lora.target_modules, None)
    if problem:
        raise ValueError(problem)
    if cfg.model.init == "pretrained" and cfg.model.name_or_path in BUILTIN_SHAPE_NAMES:
        raise ValueError(
            f"model.name_or_path={cfg.model.name_or_path!r} is a built-in shape without weights; "
            f"use model.init=random, or give a hub id or checkpoint directory"
        )
    for key in ("source", "eval_source"):
        value = getattr(cfg.data, key)
        if value and Path(value).suffix in LOCAL_DATA_SUFFIXES:
            problem = data_file_problem(Path(value), f"data.{key}")
            if problem:
                raise ValueError(f"data.{key}: {problem}")


def data_file_problem(path: Path, key: str = "data.source") -> str | None:
    """Why a data source named as a file (by its extension) cannot be read as one, or None."""
    if path.is_dir():
        return (
            f"{path} is a directory, not a {path.suffix} file: give the file itself ({key}=<the {path.suffix} "
            f"file's path>), or, for a dataset folder, a directory whose name does not end in {path.suffix}"
        )
    if not path.is_file():
        return f"no such file: {path}"
    return None


def _objective_conflicts(cfg: Config) -> None:
    pairs, fmt = cfg.objective.name != "sft", cfg.data.format
    if fmt != "auto" and (fmt == "preference") != pairs:
        raise ValueError(
            f"data.format={fmt} does not go with objective.name={cfg.objective.name}: dpo and orpo train on "
            f"preference rows (data.format=preference or auto), sft on one response per row"
        )
    _reference_conflicts(cfg)
    tokens = cfg.train.micro_batch_tokens
    if pairs and tokens is not None and tokens < 2 * cfg.data.max_len:
        raise ValueError(
            f"train.micro_batch_tokens={tokens} is less than twice data.max_len={cfg.data.max_len}: a pair (both "
            f"responses, in one micro-batch) that long would not fit; set train.micro_batch_tokens >= "
            f"{2 * cfg.data.max_len}"
        )


def _reference_conflicts(cfg: Config) -> None:
    o = cfg.objective
    if o.name != "dpo":
        if o.reference != "auto":
            raise ValueError(
                f"objective.reference={o.reference} is DPO's reference model; objective.name={o.name} has none: "
                f"drop objective.reference or set objective.name=dpo"
            )
        return
    if o.reference == "adapter" and cfg.model.adapter is None:
        raise ValueError(
            "objective.reference=adapter is the adapter the run starts from, and model.adapter is not set: set "
            "model.adapter=<an adapter directory, e.g. an SFT run's adapter/>, or objective.reference=base"
        )


# ------------------------------------------------------------------------------------ the model's names
def known_model_type(name_or_path: str) -> str | None:
    """The model type, where it is known without a download: the built-in shapes are Llama; a local directory
    says in its config.json. None otherwise (the run checks once it has read the model's config:
    modeling.model_config)."""
    if name_or_path in BUILTIN_SHAPE_NAMES:
        return "llama"
    config = Path(name_or_path).expanduser() / "config.json"
    if config.is_file():
        try:
            return json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            return None
    return None


def target_modules_problem(targets: str | list[str], model_type: str | None) -> str | None:
    """Why lora.target_modules would not adapt what it names (None when it would). Without a model type, only
    what fails for any model; with a Llama-style one, names its decoder layers lack too."""
    valid = f"{', '.join(LLAMA_LINEAR_NAMES)}, or lora.target_modules=all-linear"
    if isinstance(targets, str):
        names = [t.strip() for t in targets.split(",") if t.strip()]
        if targets == "all-linear" or not all(n.isidentifier() for n in names):
            return None  # PEFT's own value, or a regular expression, which PEFT matches against whole paths
        # NOTE: PEFT reads a string as one regular expression over whole module paths: 'q_proj,v_proj' or 'q_proj'
        # match nothing
        return (
            f"lora.target_modules={targets!r} is one string (PEFT would read it as a regular expression of whole "
            f"module paths, which it matches nowhere); give a list of names: lora.target_modules=[{','.join(names)}]"
            f". Valid names: {valid}"
        )
    if not targets:
        return f"lora.target_modules is empty: nothing would be trained; give names from {valid}"
    if model_type not in LLAMA_STYLE_TYPES:
        return None
    # PEFT matches a name against the end of a module's path: 'self_attn.q_proj' is q_proj; lm_head is the head
    unknown, close = _unknown([t.rsplit(".", 1)[-1] for t in targets], (*LLAMA_LINEAR_NAMES, "lm_head"))
    if not unknown:
        return None
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return (
        f"lora.target_modules: no linear layer of this {model_type} model is called "
        f"{' or '.join(repr(t) for t in unknown)}{hint}, so nothing would be adapted there. Valid names: {valid}"
    )


def tracker_names(value: Any) -> list[str]:
    """train.report_to as a list of tracker names: a list, one name, 'a,b', or none / [] / null for none. An
    unknown name is refused with the valid ones (ValueError: pydantic reports it as the field's error)."""
    if value is None:
        return []
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"give a list of tracker names (valid: {', '.join(TRACKERS)}, or none)")
    names = [n for n in names if n]
    if names == ["none"]:
        return []
    unknown, close = _unknown(names, tuple(TRACKERS))
    if unknown:
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(
            f"unknown tracker {', '.join(repr(n) for n in unknown)}{hint}; valid: {', '.join(TRACKERS)}, or "
            "none / [] for no tracker"
        )
    return list(dict.fromkeys(names))


CHECKPOINTING_MODES = ("auto", "selective", "offload")
# how accelerate's environment and YAMLs spell a boolean (none of them is a pattern of k, o and r)
TRUE_WORDS = ("y", "yes", "t", "true", "on", "1")
FALSE_WORDS = ("n", "no", "f", "false", "off", "0")


def checkpointing_value(value: Any) -> bool | str:
    """parallel.activation_checkpointing as the run uses it: true / false (also as text from a command line or
    a YAML), one of CHECKPOINTING_MODES, or a per-layer pattern of k, o, r (lower case). Anything else is
    refused with what is accepted (ValueError: pydantic reports it as the field's error)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS + FALSE_WORDS:
        return text in TRUE_WORDS
    if text in CHECKPOINTING_MODES or (text and set(text) <= set("kor")):
        return text
    close = difflib.get_close_matches(text, CHECKPOINTING_MODES, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ValueError(
        f"{value!r} is not a checkpointing setting{hint}: give true, false, auto, selective, offload, or a "
        "pattern of what each decoder layer does, repeated over the layers: k keeps its activations, o offloads "
        "them to host memory, r recomputes them (e.g. orr)"
    )


def _unknown(names, valid) -> tuple[list[str], list[str]]:
    """The names not among `valid`, and the closest valid name to each (where one is close)."""
    unknown = [n for n in names if n not in valid]
    return unknown, [c for n in unknown for c in difflib.get_close_matches(n, valid, n=1)]


@functools.cache
def _config_fields(model_type: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(every field the model type's transformers config takes, its own fields beyond every config's), or None
    for a model type transformers does not know."""
    import inspect

    from transformers import CONFIG_MAPPING, PretrainedConfig

    if model_type not in CONFIG_MAPPING:
        return None
    cls = CONFIG_MAPPING[model_type]
    common = set(inspect.signature(PretrainedConfig.__init__).parameters)
    own = [p for p in inspect.signature(cls.__init__).parameters if p not in common | {"self", "kwargs"}]
    # rope_theta and rope_scaling: older names transformers folds into rope_parameters
    every = {
        *common,
        *own,
        *cls().to_dict(),
        *getattr(cls, "attribute_map", {}),
        "rope_theta",
        "rope_scaling",
    }
    return tuple(sorted(every)), tuple(own)


def shape_keys_problem(shape: dict[str, Any], model_type: str | None) -> str | None:
    """Why model.shape names a field the architecture's config does not have (None when it does not)."""
    fields = _config_fields(model_type) if shape and model_type else None
    if fields is None:
        return None
    every, own = fields
    unknown, close = _unknown(shape, every)
    if not unknown:
        return None
    hint = f" Did you mean {', '.join(f'model.shape.{c}' for c in close)}?" if close else ""
    return (
        f"model.shape.{unknown[0]}"
        + "".join(f", model.shape.{k}" for k in unknown[1:])
        + f": not a field of the {model_type} model's config, so it would change nothing.{hint} Its fields: "
        + ", ".join(own)
    )
