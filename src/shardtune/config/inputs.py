"""What a configuration names on this machine, checked before anything is loaded: lora.target_modules and
model.shape against the architecture, local model and tokenizer directories, the adapter to start from
(model.adapter), the trackers' packages, train.resume's checkpoint. Not among Config's own checks (checks.py),
which also run on a saved run's configuration (shardtune merge, export), where these paths may since have moved
and a run trained before a check existed must still load."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from shardtune.config.checks import (
    BUILTIN_SHAPE_NAMES,
    LLAMA_LINEAR_NAMES,
    LLAMA_STYLE_TYPES,
    SAFETENSORS_FILES,
    TRACKERS,
    known_model_type,
    shape_keys_problem,
    target_modules_problem,
)
from shardtune.config.paths import check_output_dir, check_run_name
from shardtune.errors import ConfigError

if TYPE_CHECKING:
    from shardtune.config.schema import Config


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
    _check_tracker_packages(cfg.train.report_to)
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


def _check_tracker_packages(names: list[str]) -> None:
    """Every tracker train.report_to names is importable here (the trackers import theirs only on rank 0, once
    the model is built: a missing one is refused now, before anything loads)."""
    import importlib.util

    missing = [n for n in names if importlib.util.find_spec(TRACKERS[n][0]) is None]
    if missing:
        raise ConfigError(
            f"train.report_to={names}: {', '.join(missing)} not installed here. "
            + "; ".join(TRACKERS[n][1] for n in missing)
            + f". Or leave {', '.join(missing)} out of train.report_to."
        )
