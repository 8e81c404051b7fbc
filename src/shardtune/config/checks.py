"""Checks of a configuration beyond each field's own: settings that conflict (run by Config's validator, also on
a saved run's configuration), and the names and paths a configuration gives, checked against the model's
architecture and this machine before anything is loaded (check_names, check_inputs: not in the validator, where
a run trained before a check existed must still load for `shardtune merge`).
"""

from __future__ import annotations

import difflib
import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardtune.config.paths import check_output_dir, check_run_name
from shardtune.errors import ConfigError

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


def cross_checks(cfg: Config) -> None:
    """Settings that cannot go together, each refused with the fix (ValueError: pydantic reports it as the
    configuration's error)."""
    _quantization_conflicts(cfg)
    _backend_conflicts(cfg)
    _batch_conflicts(cfg)
    _optimizer_conflicts(cfg)
    _model_and_data_conflicts(cfg)
    _objective_conflicts(cfg)


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
    if tokens is None and cfg.train.micro_batch_size > cfg.train.global_batch_size:
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
    tokens = cfg.train.micro_batch_tokens
    if pairs and tokens is not None and tokens < 2 * cfg.data.max_len:
        raise ValueError(
            f"train.micro_batch_tokens={tokens} is less than twice data.max_len={cfg.data.max_len}: a pair (both "
            f"responses, in one micro-batch) that long would not fit; set train.micro_batch_tokens >= "
            f"{2 * cfg.data.max_len}"
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


# --------------------------------------------------------------------------- inputs on this machine
def _looks_like_path(value: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything else with a slash, or starting like a path, is a path."""
    return value.startswith(("/", "./", "../", "~")) or value.count("/") > 1 or "\\" in value


def convert_to_safetensors_hint(directory: str | Path) -> str:
    return (
        f"convert it once with transformers (which reads .bin files with weights_only=True): python -c "
        f"\"from transformers import AutoModelForCausalLM as M; M.from_pretrained('{directory}', dtype='auto')"
        f".save_pretrained('{directory}-safetensors')\", then set model.name_or_path={directory}-safetensors"
    )


def check_names(cfg: Config) -> None:
    """train.run_name (one directory name), lora.target_modules and model.shape against the architecture,
    where its type is known without a download (a built-in shape, a local directory; modeling.model_config
    checks the rest once it has the model's config). Not among Config's own checks, which also run on a saved
    run's configuration (shardtune merge), where a run trained before these checks existed must still load."""
    check_run_name(cfg.train.run_name, cfg.train.output_dir)
    model_type = known_model_type(cfg.model.name_or_path)
    problem = target_modules_problem(cfg.lora.target_modules, model_type) or shape_keys_problem(
        cfg.model.shape, model_type
    )
    if problem:
        raise ConfigError(problem)


def check_inputs(cfg: Config) -> None:
    """What the configuration names on this machine, checked before anything is loaded: a local model directory
    (and its safetensors weights, for model.init=pretrained), a local tokenizer, train.resume's checkpoint, a
    train.output_dir this process can write.
    Separate from Config's own checks, which also run on a saved run's configuration (shardtune merge, export),
    where these paths may since have moved."""
    check_names(cfg)
    check_output_dir(cfg.train)
    m = cfg.model
    if m.name_or_path not in BUILTIN_SHAPE_NAMES:
        path = Path(m.name_or_path).expanduser()
        if _looks_like_path(m.name_or_path) and not path.is_dir():
            raise ConfigError(
                f"model.name_or_path={m.name_or_path}: no such directory. Give an existing checkpoint directory, "
                f"a hub id (org/name), or a built-in shape ({', '.join(BUILTIN_SHAPE_NAMES)}) with model.init=random."
            )
        if path.is_dir():
            have = sorted(p.name for p in path.iterdir())
            if "config.json" not in have:
                raise ConfigError(
                    f"model.name_or_path={m.name_or_path}: no config.json in this directory, so it is not a "
                    f"Hugging Face model directory (it has: {', '.join(have[:8]) or 'nothing'}). Point "
                    f"model.name_or_path at the directory that holds config.json."
                )
            if m.init == "pretrained" and not any(name in have for name in SAFETENSORS_FILES):
                found = [n for n in have if n.endswith((".bin", ".pt", ".pth", ".ckpt"))] or have
                raise ConfigError(
                    f"model.name_or_path={m.name_or_path}: no safetensors weights ({' or '.join(SAFETENSORS_FILES)}); "
                    f"found {', '.join(found[:5]) or 'nothing'}. shardtune loads safetensors only (it never unpickles "
                    f"weight files): " + convert_to_safetensors_hint(m.name_or_path)
                )
    if m.tokenizer and _looks_like_path(m.tokenizer) and not Path(m.tokenizer).expanduser().is_dir():
        raise ConfigError(
            f"model.tokenizer={m.tokenizer}: no such directory. Give an existing tokenizer directory or a hub id "
            f"(org/name), or leave model.tokenizer unset for the model's own."
        )
    if m.adapter is not None:
        check_adapter(cfg)
    resume = cfg.train.resume
    if resume not in ("auto", "never") and not Path(resume).is_dir():
        close = difflib.get_close_matches(resume, ["auto", "never"], n=1)
        hint = f" Did you mean train.resume={close[0]}?" if close else ""
        raise ConfigError(
            f"train.resume={resume}: not auto, never, or an existing checkpoint directory (no directory "
            f"{resume}).{hint} Values: auto (continue from the run's newest intact checkpoint), never (refuse a run "
            f"directory that has checkpoints), or the path of a checkpoint (runs/<run>/checkpoints/step-N)."
        )


# ------------------------------------------------------------------------------- model.adapter to start from
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def read_adapter_config(path: str) -> dict:
    """model.adapter's adapter_config.json, after checking the directory holds an adapter shardtune can load."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ConfigError(
            f"model.adapter={path}: no such directory. Give a PEFT adapter directory (e.g. an SFT run's adapter/: "
            f"train it first), or model.adapter=null to start from PEFT's initialization."
        )
    missing = [name for name in ADAPTER_FILES if not (directory / name).is_file()]
    if missing:
        have = sorted(p.name for p in directory.iterdir())
        raise ConfigError(
            f"model.adapter={path}: no {' or '.join(missing)} in this directory (it has: {', '.join(have[:8]) or 'nothing'}); "
            f"a PEFT adapter directory holds {' and '.join(ADAPTER_FILES)} (shardtune loads safetensors only)."
        )
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.adapter={path}: adapter_config.json is not readable JSON ({e})") from None
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ConfigError(
            f"model.adapter={path}: its adapters have ranks or alphas of their own per layer (rank_pattern, "
            f"alpha_pattern), which a run's lora.r and lora.alpha cannot express."
        )
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("modules_to_save"):
        raise ConfigError(
            f"model.adapter={path}: a {config.get('peft_type')} adapter"
            f"{' with DoRA' if config.get('use_dora') else ''}"
            f"{' that also trains ' + str(config['modules_to_save']) if config.get('modules_to_save') else ''}; "
            f"shardtune trains plain LoRA adapters only."
        )
    return config


def _module_names(targets) -> set[str] | str:
    if isinstance(targets, str):
        return targets
    return {t.rsplit(".", 1)[-1] for t in targets}


def adapter_settings_problems(cfg: Config, config: dict, model_type: str | None) -> list[str]:
    """How model.adapter's LoRA settings differ from this run's lora.* (an empty list when they agree)."""
    lora = cfg.lora
    problems = []
    for key, theirs, ours in (
        ("r", config.get("r"), lora.r),
        ("alpha", config.get("lora_alpha"), lora.alpha),
        ("use_rslora", bool(config.get("use_rslora", False)), lora.use_rslora),
    ):
        if theirs != ours and not (key == "alpha" and theirs is not None and float(theirs) == ours):
            problems.append(f"lora.{key}: the adapter's is {theirs!r}, this run's {ours!r}")
    theirs, ours = _module_names(config.get("target_modules") or []), _module_names(lora.target_modules)
    if ours == "all-linear" and model_type in LLAMA_STYLE_TYPES:
        ours = set(LLAMA_LINEAR_NAMES)
    if theirs == "all-linear" and model_type in LLAMA_STYLE_TYPES:
        theirs = set(LLAMA_LINEAR_NAMES)
    if isinstance(ours, set) and isinstance(theirs, set) and ours != theirs:
        problems.append(f"lora.target_modules: the adapter adapts {sorted(theirs)}, this run {sorted(ours)}")
    return problems


def adapter_base_problem(cfg: Config, recorded: str | None) -> str | None:
    """Why model.adapter's base (adapter_config.json's base_model_name_or_path, where recorded) is not this
    run's, or None. The same name, the same directory, or the same last path part (a hub id and a local copy of
    it) agree; a shardtune run on random weights records '<shape> (random, seed N)' or its written base
    directory, which agrees with a random run of that shape and seed, or with any random run whose adapters
    have the shapes of its (model.adapters checks them against the skeleton)."""
    m = cfg.model
    if not recorded:
        return None
    if m.init == "random":
        if recorded == f"{m.name_or_path} (random, seed {cfg.train.seed})":
            return None
        if not recorded.endswith(")") and (Path(recorded) / "config.json").is_file():
            return None  # a run's written random base: its shapes are checked against the skeleton's
        return (
            f"the adapter was trained on {recorded!r}, and this run draws random weights for {m.name_or_path!r} "
            f"with train.seed={cfg.train.seed}"
        )
    if (
        recorded == m.name_or_path
        or recorded.rstrip("/").split("/")[-1] == m.name_or_path.rstrip("/").split("/")[-1]
    ):
        return None
    here, there = Path(m.name_or_path), Path(recorded)
    if here.exists() and there.exists() and here.resolve() == there.resolve():
        return None
    return (
        f"the adapter was trained on {recorded!r}, this run's base is model.name_or_path={m.name_or_path!r}"
    )


def check_adapter(cfg: Config) -> None:
    """model.adapter against this run, before anything is loaded: an adapter directory, plain LoRA, the same
    LoRA settings and base model (the tensors' names and shapes are checked against the model's skeleton:
    model.adapters)."""
    config = read_adapter_config(cfg.model.adapter)
    problems = adapter_settings_problems(cfg, config, known_model_type(cfg.model.name_or_path))
    base = adapter_base_problem(cfg, config.get("base_model_name_or_path"))
    if base:
        problems.append(
            base
            + " (the same model under another name? set base_model_name_or_path in its adapter_config.json)"
        )
    if problems:
        raise ConfigError(
            f"model.adapter={cfg.model.adapter} does not fit this run:\n  " + "\n  ".join(problems) + "\nSet "
            "this run's settings to the adapter's (its adapter_config.json), or start without model.adapter."
        )
