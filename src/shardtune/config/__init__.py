"""Configuration: the typed sections (schema.py), settings that conflict (checks.py), the inputs a configuration
names on this machine (inputs.py), the run directory derived from them (paths.py), key=value overrides, validation and help
(overrides.py), and the settings an accelerate config YAML or `accelerate launch`'s environment carries
(accelerate.py)."""

from shardtune.config.inputs import check_inputs, check_names
from shardtune.config.overrides import (
    apply_overrides,
    field_paths,
    format_help,
    parse_overrides,
    to_yaml,
    validate,
)
from shardtune.config.paths import run_directory
from shardtune.config.schema import (
    Config,
    DataConfig,
    EvalConfig,
    GeneratedTaskConfig,
    LoraSettings,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    ParallelConfig,
    QuantConfig,
    TrainConfig,
)

__all__ = [
    "Config",
    "DataConfig",
    "EvalConfig",
    "GeneratedTaskConfig",
    "LoraSettings",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "ParallelConfig",
    "QuantConfig",
    "TrainConfig",
    "apply_overrides",
    "check_inputs",
    "check_names",
    "field_paths",
    "format_help",
    "parse_overrides",
    "run_directory",
    "to_yaml",
    "validate",
]
