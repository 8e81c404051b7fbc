"""Overrides (`section.field=value` strings from the command line, a YAML, the environment), validation into a
Config with errors that name the key, where its value came from and the closest valid key, and `--help`."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any, Union

import yaml
from pydantic import ValidationError

from shardtune.config.schema import Config, Section
from shardtune.errors import ConfigError


# ----------------------------------------------------------------------------------------------- key paths
def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _section_type(annotation: Any) -> type[Section] | None:
    inner = _unwrap_optional(annotation)
    return inner if isinstance(inner, type) and issubclass(inner, Section) else None


def _is_dict(annotation: Any) -> bool:
    return typing.get_origin(_unwrap_optional(annotation)) is dict


def field_paths(model: type[Section] = Config, prefix: str = "") -> dict[str, Any]:
    """Every leaf key as 'section.field' -> its FieldInfo (sections are descended into)."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        sub = _section_type(info.annotation)
        if sub is not None:
            out.update(field_paths(sub, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = info
    return out


# Hugging Face TrainingArguments names pasted as keys, and ours
HF_TRAINER_NAMES = {
    "learning_rate": "optim.lr",
    "lr_scheduler_type": "optim.scheduler",
    "optim": "optim.name",
    "adam_beta1": "optim.betas",
    "adam_beta2": "optim.betas",
    "adam_epsilon": "optim.eps",
    "warmup_steps": "optim.warmup_steps",
    "weight_decay": "optim.weight_decay",
    "min_lr_rate": "optim.min_lr_rate",
}


def _resolve_key(key: str) -> tuple[Any, bool]:
    """(FieldInfo of the leaf, whether the key goes inside a dict field). Raises ConfigError if unknown."""
    paths = field_paths()
    if key in paths:
        return paths[key], False
    # keys inside dict-valued fields, e.g. model.shape.num_hidden_layers or data.fields.output
    for path, info in paths.items():
        if key.startswith(path + ".") and _is_dict(info.annotation):
            return info, True
    hf = HF_TRAINER_NAMES.get(key.rsplit(".", 1)[-1])
    close = [hf] if hf else difflib.get_close_matches(key, list(paths), n=2, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    section = key.split(".")[0]
    if section in Config.model_fields and not close:
        names = ", ".join(p.split(".", 1)[1] for p in paths if p.startswith(section + "."))
        hint = f" Valid keys in '{section}': {names}."
    raise ConfigError(f"Unknown config key {key!r}.{hint} (`--help` lists every key.)")


def _parse_value(raw: str, info: Any, inside_dict: bool) -> Any:
    """Turn a command-line string into a Python value, guided by the field's type.

    Plain strings stay strings (pydantic coerces '32' to int and '1e-4' to float itself); YAML is used only
    for values that can only be lists, mappings or null, so that 'no' or '{product}' stay text.
    """
    annotation = info.annotation
    if inside_dict:
        value_type = typing.get_args(_unwrap_optional(annotation))[1:] or (Any,)
        if value_type[0] is str:
            return raw
        try:  # free-form values (e.g. LlamaConfig fields): numbers, booleans, lists as YAML reads them
            return yaml.safe_load(raw)
        except yaml.YAMLError:
            return raw
    if annotation is str:
        return raw
    text = raw.strip()
    if text.lower() in ("null", "none", "~"):
        return None
    if text and text[0] in "[{(":  # (an empty value is text: "" is in every string)
        try:
            return yaml.safe_load(text.replace("(", "[").replace(")", "]") if text[0] == "(" else text)
        except yaml.YAMLError as e:
            raise ConfigError(f"Could not parse {raw!r}: {e}") from None
    return raw


def parse_overrides(items: list[str]) -> dict[str, str]:
    """['a.b=1', ...] -> {'a.b': '1'}; anything that is not key=value is an error."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or " " in key:
            raise ConfigError(f"Expected key=value, got {item!r} (e.g. lora.r=32). `--help` lists every key.")
        out[key.strip()] = value
    return out


def apply_overrides(cfg: Config, overrides: dict[str, Any], source: str) -> Config:
    """A new Config with `overrides` ({'lora.r': '32'}) applied and everything re-validated.

    `source` names where the values came from ('command line', 'accelerate config ...') for error messages.
    String values are parsed by field type; other values are taken as they are.
    """
    return apply_layers(cfg, [(overrides, source)])


def apply_layers(cfg: Config, layers: list[tuple[dict[str, Any], str]]) -> Config:
    """apply_overrides of several (overrides, source) layers, later ones winning, validated once at the end:
    a later layer may settle a conflict between earlier ones (the command line's optim.name=adamw, where the
    recipe's optimizer conflicts with the accelerate config's DeepSpeed)."""
    data, sources = cfg.model_dump(), {}
    for overrides, source in layers:
        for key, value in overrides.items():
            info, inside_dict = _resolve_key(key)
            if isinstance(value, str):
                value = _parse_value(value, info, inside_dict)
            node = data
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
            sources[key] = source
    return validate(data, sources)


def validate(data: dict[str, Any], sources: dict[str, str] | None = None) -> Config:
    """Build a Config from plain data, turning pydantic's errors into ConfigError messages."""
    sources = sources or {}
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e, data, sources)) from None


def _explain(error: ValidationError, data: dict[str, Any], sources: dict[str, str]) -> str:
    paths = field_paths()
    lines = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
        msg = err["msg"].removeprefix("Value error, ")
        if not loc:  # a cross-field check; its message names the fields already, not where they came from
            given = [
                f"{k} from {src}" for k, src in sources.items() if k in msg and src != "the command line"
            ]
            lines.append(msg + (f" ({'; '.join(given)})" if given else ""))
            continue
        key = next((p for p in paths if loc == p or loc.startswith(p + ".")), loc)
        given = data
        for part in key.split("."):
            given = given.get(part) if isinstance(given, dict) else None
        origin = f" (from {sources[key]})" if key in sources else ""
        doc = (paths[key].description or "").split("\n")[0] if key in paths else ""
        lines.append(f"{key}={given!r}{origin}: {msg}." + (f"\n    {key}: {doc}" if doc else ""))
    return "Invalid configuration:\n  " + "\n  ".join(lines)


# --------------------------------------------------------------------------------------------------- help
def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    if text:
        return text
    return str(annotation).replace("typing.", "").replace("NoneType", "None")


def format_help(cfg: Config) -> str:
    """Every key with its current value (the recipe's), type and documentation, grouped by section."""
    values = cfg.model_dump()
    lines = []
    current = None
    for key, info in field_paths().items():
        section = key.split(".")[0]
        if section != current:
            current = section
            doc = Config.model_fields[section].annotation.__doc__ or ""
            lines.append(f"\n{section}:" + (f"  {doc.strip().splitlines()[0]}" if doc.strip() else ""))
        value = values
        for part in key.split("."):
            value = value[part]
        lines.append(f"  {key}={value!r}   [{_type_name(info.annotation)}]")
        for doc_line in (info.description or "").splitlines():
            lines.append(f"      {doc_line.strip()}")
    return "\n".join(lines).lstrip("\n")


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
