"""Config: typed sections, overrides, errors that name the key and the closest valid one, precedence."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT, tmpfs
from shardtune.cli.args import (
    check_backend,
    check_sweep,
    load_recipe,
    parse_args,
    resolve_config,
    split_sweep_values,
)
from shardtune.cli.recipe import main
from shardtune.config import Config, OptimConfig, apply_overrides, format_help, parse_overrides, run_directory
from shardtune.config.accelerate import (
    accelerate_env_overrides,
    accelerate_yaml_overrides,
    launching_config_file,
)
from shardtune.errors import ConfigError


def test_overrides_are_typed():
    cfg = apply_overrides(
        Config(),
        parse_overrides(
            [
                "lora.r=32",
                "optim.lr=1e-4",
                "lora.target_modules=[q_proj, v_proj]",
                "train.max_steps=null",
                "model.shape.num_hidden_layers=2",
                "data.fields.output={response}",
                "optim.betas=(0.9, 0.95)",
                "train.run_name=no",
            ]
        ),
        "the command line",
    )
    assert cfg.lora.r == 32 and cfg.optim.lr == 1e-4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.max_steps is None
    assert cfg.model.shape == {"num_hidden_layers": 2}
    assert cfg.data.fields == {"output": "{response}"}  # stays text, not a YAML mapping
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.train.run_name == "no"  # not YAML's boolean


@pytest.mark.parametrize(
    "key, suggestion",
    [
        ("lora.rr", "lora.r"),
        ("lroa.r", "lora.r"),
        ("optim.learning_rate", "optim.lr"),  # the Hugging Face Trainer's names: ours
        ("train.lr_scheduler_type", "optim.scheduler"),
        ("optim.nesterov_momentum_factor", None),
        ("train.max_step", "train.max_steps"),
    ],
)
def test_unknown_key_names_closest(key, suggestion):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), {key: "1"}, "the command line")
    msg = str(e.value)
    assert f"Unknown config key {key!r}" in msg
    if suggestion:
        assert f"Did you mean {suggestion!r}" in msg
    else:  # no close key: the section's keys are listed
        assert "Valid keys in 'optim'" in msg and "lr" in msg


def test_bad_value_names_key_source_and_doc():
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), {"lora.r": "abc"}, "the command line")
    msg = str(e.value)
    assert "lora.r='abc' (from the command line)" in msg and "valid integer" in msg and "LoRA rank" in msg
    with pytest.raises(ConfigError, match=r"parallel\.mixed_precision='fp8'"):
        apply_overrides(Config(), {"parallel.mixed_precision": "fp8"}, "x")
    with pytest.raises(ConfigError, match="greater than 0"):
        apply_overrides(Config(), {"lora.r": "0"}, "x")


def test_not_key_value():
    with pytest.raises(ConfigError, match="Expected key=value"):
        parse_overrides(["lora.r"])


def test_storage_dtype_must_equal_fsdp_param_dtype():
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), {"parallel.mixed_precision": "bf16", "quant.storage_dtype": "float32"}, "x")
    assert "FSDP" in str(e.value) and "quant.storage_dtype=auto" in str(e.value)
    cfg = apply_overrides(Config(), {"parallel.mixed_precision": "bf16"}, "x")
    assert cfg.storage_dtype == "bfloat16" and cfg.param_dtype == "bfloat16"
    assert Config().storage_dtype == "float32"


def test_cross_checks():
    with pytest.raises(ConfigError, match="SHARD_GRAD_OP does not work with 4-bit"):
        apply_overrides(Config(), {"parallel.sharding_strategy": "SHARD_GRAD_OP"}, "x")
    with pytest.raises(ConfigError, match="built-in shape without weights"):
        apply_overrides(Config(), {"model.init": "pretrained"}, "x")
    with pytest.raises(ConfigError, match=r"no such file: nope\.jsonl"):
        apply_overrides(Config(), {"data.source": "nope.jsonl"}, "x")
    with pytest.raises(ConfigError, match=r"micro_batch_size=64 exceeds"):
        apply_overrides(Config(), {"train.micro_batch_size": "64"}, "x")


def test_the_objective_is_checked_against_the_format_and_a_pairs_length():
    with pytest.raises(ConfigError, match=r"data.format=alpaca does not go with objective.name=dpo"):
        apply_overrides(Config(), {"objective.name": "dpo", "data.format": "alpaca"}, "x")
    with pytest.raises(ConfigError, match=r"data.format=preference does not go with objective.name=sft"):
        apply_overrides(Config(), {"data.format": "preference"}, "x")
    packed = {"data.packing": "true", "data.max_len": "1024", "objective.name": "orpo"}
    with pytest.raises(ConfigError, match=r"less than twice data.max_len=1024.*micro_batch_tokens >= 2048"):
        apply_overrides(Config(), {**packed, "train.micro_batch_tokens": "1500"}, "x")
    with pytest.raises(ConfigError, match=r"objective.label_smoothing"):
        apply_overrides(Config(), {"objective.label_smoothing": "0.5"}, "x")


def test_dpos_reference_is_the_starting_adapter_where_there_is_one():
    dpo = Config(objective={"name": "dpo"})
    assert dpo.objective.reference_model(starts_from_adapter=False) == "base"
    assert dpo.objective.reference_model(starts_from_adapter=True) == "adapter"
    assert Config(objective={"name": "dpo", "reference": "base"}).objective.reference_model(True) == "base"
    with pytest.raises(
        ConfigError, match=r"objective.reference=adapter .* model.adapter is not set: set model"
    ):
        apply_overrides(dpo, {"objective.reference": "adapter"}, "x")
    with pytest.raises(
        ConfigError, match=r"objective.reference=base is DPO's .* objective.name=orpo has none"
    ):
        apply_overrides(Config(), {"objective.name": "orpo", "objective.reference": "base"}, "x")


def test_micro_batches_in_tokens_are_checked_against_packing_the_row_length_and_the_backend():
    packed = {"data.packing": "true", "data.max_len": "1024"}
    with pytest.raises(ConfigError, match=r"micro_batch_tokens=4096 needs data.packing=true"):
        apply_overrides(Config(), {"train.micro_batch_tokens": "4096"}, "x")
    with pytest.raises(ConfigError, match=r"less than data.max_len=1024.*micro_batch_tokens >= 1024"):
        apply_overrides(Config(), {**packed, "train.micro_batch_tokens": "1000"}, "x")
    with pytest.raises(
        ConfigError, match=r"micro_batch_tokens does not work with parallel.backend=deepspeed"
    ):
        apply_overrides(
            Config(), {**packed, "train.micro_batch_tokens": "4096", "parallel.backend": "deepspeed"}, "x"
        )
    # the row count is unused then: a micro_batch_size over the global batch is no error
    cfg = apply_overrides(
        Config(), {**packed, "train.micro_batch_tokens": "4096", "train.micro_batch_size": "64"}, "x"
    )
    assert cfg.train.micro_batch_tokens == 4096


def test_micro_batch_auto_is_parsed_and_refused_beside_a_token_budget():
    assert apply_overrides(Config(), {"train.micro_batch_size": "auto"}, "x").train.micro_batch_size == "auto"
    assert apply_overrides(Config(), {"train.micro_batch_size": "8"}, "x").train.micro_batch_size == 8
    with pytest.raises(ConfigError, match=r"train.micro_batch_size"):
        apply_overrides(Config(), {"train.micro_batch_size": "0"}, "x")
    with pytest.raises(
        ConfigError, match=r"micro_batch_size=auto with train.micro_batch_tokens=4096: .* leave"
    ):
        packed = {"data.packing": "true", "data.max_len": "1024", "train.micro_batch_tokens": "4096"}
        apply_overrides(Config(), {**packed, "train.micro_batch_size": "auto"}, "x")


def test_help_lists_every_key_with_docs():
    text = format_help(Config())
    for key in ("model.name_or_path", "lora.r", "data.max_len", "parallel.mixed_precision", "eval.questions"):
        assert key in text
    assert "LoRA rank." in text and "Compute and FSDP parameter dtype" in text


def test_accelerate_environment_is_read():
    env = {
        "ACCELERATE_USE_FSDP": "true",
        "ACCELERATE_MIXED_PRECISION": "bf16",
        "FSDP_SHARDING_STRATEGY": "1",
        "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer",
        "FSDP_OFFLOAD_PARAMS": "true",
        "FSDP_ACTIVATION_CHECKPOINTING": "true",
        "FSDP_BACKWARD_PREFETCH": "BACKWARD_POST",
        "FSDP_USE_ORIG_PARAMS": "true",
        "FSDP_VERSION": "1",
    }
    values, _ = accelerate_env_overrides(env)
    assert values == {
        "parallel.sharding_strategy": "FULL_SHARD",
        "parallel.wrap_class": "LlamaDecoderLayer",
        "parallel.cpu_offload": True,
        "parallel.activation_checkpointing": True,
        "parallel.backward_prefetch": "BACKWARD_POST",
        "parallel.mixed_precision": "bf16",
    }
    assert accelerate_env_overrides({}) == ({}, None)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "FSDP2 corrupts bitsandbytes 4-bit"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_USE_ORIG_PARAMS": "false"}, "fsdp_use_orig_params=false"),
        (
            {"ACCELERATE_USE_FSDP": "true", "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"},
            "fsdp_auto_wrap_policy",
        ),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"},
            "deepspeed_config_file is not supported",
        ),
    ],
)
def test_accelerate_settings_that_would_change_what_runs_are_refused(env, message):
    with pytest.raises(ConfigError, match=message):
        accelerate_env_overrides(env)


def test_precedence_recipe_then_launcher_then_command_line(tmp_path):
    base = Config()
    base.lora.r = 4
    env = {
        "ACCELERATE_USE_FSDP": "true",
        "ACCELERATE_MIXED_PRECISION": "bf16",
        "FSDP_ACTIVATION_CHECKPOINTING": "true",
    }
    cfg = resolve_config(base, ["parallel.activation_checkpointing=false"], env)
    assert cfg.lora.r == 4  # the recipe's value
    assert cfg.parallel.mixed_precision == "bf16"  # the launcher's
    assert cfg.parallel.activation_checkpointing is False  # the command line wins
    cfg = resolve_config(base, ["parallel.launch_config=fsdp_configs/4xa10g.yaml"], {})
    assert cfg.parallel.cpu_offload and cfg.parallel.mixed_precision == "bf16"


def test_auto_settings_come_through_accelerate_and_its_yaml():
    """`fsdp_activation_checkpointing: auto` and `fsdp_sharding_strategy: auto` (the bundled GPU configs) reach
    the run as 'auto', from the environment `accelerate launch` exports and from the YAML read under torchrun;
    true/false stay booleans, FSDP's strategies stay themselves."""
    env = {
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_ACTIVATION_CHECKPOINTING": "auto",
        "FSDP_SHARDING_STRATEGY": "AUTO",
    }
    cfg = resolve_config(Config(), [], env)
    assert cfg.parallel.activation_checkpointing == "auto" and cfg.parallel.sharding_strategy == "auto"
    env["FSDP_ACTIVATION_CHECKPOINTING"] = "Selective"  # shardtune's other own value
    assert resolve_config(Config(), [], env).parallel.activation_checkpointing == "selective"
    for name in ("2xh100", "8xh100", "multinode"):
        cfg = resolve_config(Config(), [f"parallel.launch_config=fsdp_configs/{name}.yaml"], {})
        assert cfg.parallel.activation_checkpointing == cfg.parallel.sharding_strategy == "auto", name
    cfg = resolve_config(Config(), ["parallel.launch_config=fsdp_configs/4xa10g.yaml"], {})
    assert cfg.parallel.activation_checkpointing is True and cfg.parallel.sharding_strategy == "FULL_SHARD"


@pytest.mark.parametrize(
    "value, parsed",
    [("true", True), ("False", False), ("1", True), ("off", False), ("Offload", "offload"), ("ORK", "ork")],
)
def test_activation_checkpointing_takes_booleans_modes_and_per_layer_patterns(value, parsed):
    """From a command line, a recipe, or the environment `accelerate launch` exports: text booleans become
    booleans, modes and patterns lower case (a pattern is k, o and r: keep, offload, recompute)."""
    cfg = apply_overrides(Config(), {"parallel.activation_checkpointing": value}, "the command line")
    assert cfg.parallel.activation_checkpointing is parsed or cfg.parallel.activation_checkpointing == parsed
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_ACTIVATION_CHECKPOINTING": value}
    assert resolve_config(Config(), [], env).parallel.activation_checkpointing == parsed


@pytest.mark.parametrize(
    "value, hint", [("offlod", "did you mean offload?"), ("okx", "e.g. orr"), ("", "k keeps")]
)
def test_a_checkpointing_value_that_is_none_of_these_is_refused_with_what_is_accepted(value, hint):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), {"parallel.activation_checkpointing": value}, "the command line")
    msg = str(e.value)
    assert f"parallel.activation_checkpointing={value!r}" in msg and hint in msg, msg
    assert "true, false, auto, selective, offload" in msg and "r recomputes them" in msg


def test_yaml_with_use_cpu_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_processes: 2\n"
        "mixed_precision: 'no'\nuse_cpu: true\nfsdp_config: {fsdp_version: 1}\n"
    )
    with pytest.raises(ConfigError, match="use_cpu: true makes `accelerate launch` start a single process"):
        accelerate_yaml_overrides(bad)
    with pytest.raises(ConfigError, match="no such file"):
        accelerate_yaml_overrides(tmp_path / "missing.yaml")


def test_command_line_flags_and_sweep_values():
    flags, overrides, sweep = parse_args(
        [
            "lora.r=8",
            "--sweep",
            "lora.r=8,16",
            "--sweep",
            "lora.target_modules=[q_proj,v_proj],all-linear",
            "--validate",
            "--sweep",
            "optim.lr=1e-3",  # one value: no sweep, an override beside a bare --sweep
            "--print-config",
            "data.max_len=64",
        ]
    )
    assert flags == {"--sweep", "--validate", "--print-config"} and overrides == [
        "lora.r=8",
        "optim.lr=1e-3",
        "data.max_len=64",
    ]
    assert sweep == {"lora.r": ["8", "16"], "lora.target_modules": ["[q_proj,v_proj]", "all-linear"]}
    assert split_sweep_values("1e-4,2e-4") == ["1e-4", "2e-4"]
    with pytest.raises(ConfigError, match="unknown flag"):
        parse_args(["--frobnicate"])


# ------------------------------------------------------------------ accelerate configs, read as accelerate does
YAML_HEAD = (
    "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_processes: 2\nmixed_precision: bf16\n"
)


def write_yaml(tmp_path, fsdp: dict, name="acc.yaml"):
    path = tmp_path / name
    path.write_text(YAML_HEAD + "fsdp_config:\n" + "".join(f"  fsdp_{k}: {v}\n" for k, v in fsdp.items()))
    return path


def launched_env(**fsdp: str) -> dict[str, str]:
    """What `accelerate launch` (1.x) exports for an FSDP config: its defaults for every key the file leaves
    out (accelerate/utils/launch.py), the file's values for the others."""
    env = {
        "ACCELERATE_USE_FSDP": "true",
        "ACCELERATE_MIXED_PRECISION": "bf16",
        "FSDP_VERSION": "1",
        "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
        "FSDP_RESHARD_AFTER_FORWARD": "true",
        "FSDP_OFFLOAD_PARAMS": "false",
        "FSDP_MIN_NUM_PARAMS": "100000000",
        "FSDP_FORWARD_PREFETCH": "false",
        "FSDP_USE_ORIG_PARAMS": "true",
        "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
        "FSDP_SYNC_MODULE_STATES": "true",
        "FSDP_ACTIVATION_CHECKPOINTING": "false",
        "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": "false",
    }
    env.update({f"FSDP_{k.upper()}": v for k, v in fsdp.items()})
    return env


@pytest.mark.parametrize(
    "value, strategy",
    [
        ("NO_SHARD", "NO_SHARD"),
        ("HYBRID_SHARD", "HYBRID_SHARD"),
        ("FULL_SHARD", "FULL_SHARD"),
        ("3", "NO_SHARD"),
    ],
)
def test_reshard_after_forward_is_the_fsdp1_sharding_strategy(tmp_path, value, strategy):
    """`accelerate config` writes FSDP1's strategy as fsdp_reshard_after_forward; both launchers read it."""
    path = write_yaml(tmp_path, {"version": 1, "reshard_after_forward": value})
    assert accelerate_yaml_overrides(path)[0]["parallel.sharding_strategy"] == strategy
    # accelerate exports it lower-cased; its old key keeps accelerate's default FULL_SHARD, which says nothing here
    env = launched_env(reshard_after_forward=value.lower())
    assert accelerate_env_overrides(env, path)[0]["parallel.sharding_strategy"] == strategy


@pytest.mark.parametrize(
    "fsdp, message",
    [
        (
            {"sharding_strategy": "FULL_SHARD", "reshard_after_forward": "NO_SHARD"},
            r"fsdp_sharding_strategy='FULL_SHARD' and fsdp_reshard_after_forward='NO_SHARD' disagree.*Keep one",
        ),
        (
            {"reshard_after_forward": "true"},
            r"fsdp_reshard_after_forward=True is FSDP2's form.*FULL_SHARD",
        ),
        (
            {"reshard_after_forward": "HYBRID_SHARD_ZERO2"},
            r"HYBRID_SHARD_ZERO2 is not supported.*HYBRID_SHARD\.",
        ),
        (
            {"reshard_after_forward": "HALF_SHARD"},
            r"'HALF_SHARD' is not a sharding strategy; set fsdp_reshard",
        ),
    ],
)
def test_sharding_keys_that_disagree_or_mean_nothing_are_refused_naming_the_file(tmp_path, fsdp, message):
    path = write_yaml(tmp_path, {"version": 1, **fsdp})
    with pytest.raises(ConfigError, match=message) as e:
        accelerate_yaml_overrides(path)
    assert str(path) in str(e.value)


def test_shard_grad_op_from_a_yaml_is_refused_with_the_reason_and_the_file(tmp_path):
    path = write_yaml(tmp_path, {"version": 1, "reshard_after_forward": "SHARD_GRAD_OP"})
    with pytest.raises(ConfigError) as e:
        resolve_config(Config(), [f"parallel.launch_config={path}"], env={})
    msg = str(e.value)
    assert "SHARD_GRAD_OP does not work with 4-bit" in msg and f"from accelerate config {path}" in msg


def test_both_launchers_keep_the_recipes_settings_where_the_yaml_is_silent(tmp_path):
    """A YAML without fsdp_offload_params / fsdp_activation_checkpointing: recipes/llama3_70b.py keeps its own
    cpu_offload and activation checkpointing under `accelerate launch` (which exports false for both) as under
    torchrun with parallel.launch_config; settings the file gives apply under both."""
    recipe = load_recipe(ROOT / "recipes/llama3_70b.py").config()
    silent = write_yaml(tmp_path, {"version": 1, "transformer_layer_cls_to_wrap": "LlamaDecoderLayer"})
    torchrun = resolve_config(recipe, [f"parallel.launch_config={silent}"], env={}).parallel
    accelerate = resolve_config(
        recipe, [], env=launched_env()
    ).parallel  # no file found: defaults say nothing
    values, _ = accelerate_env_overrides(launched_env(), silent)
    with_file = apply_overrides(recipe, values, "test").parallel
    for p in (torchrun, accelerate, with_file):
        assert (
            p.cpu_offload is True
            and p.activation_checkpointing is True
            and p.sharding_strategy == "FULL_SHARD"
        )
    # said in the file, the same false applies under both
    said = write_yaml(
        tmp_path, {"version": 1, "offload_params": "false", "activation_checkpointing": "false"}
    )
    torchrun = resolve_config(recipe, [f"parallel.launch_config={said}"], env={}).parallel
    values, origin = accelerate_env_overrides(launched_env(), said)
    assert str(said) in origin
    accelerate = apply_overrides(recipe, values, origin).parallel
    for p in (torchrun, accelerate):
        assert p.cpu_offload is False and p.activation_checkpointing is False
    # a flag of `accelerate launch` (a value other than its default) applies though the file is silent
    flagged, _ = accelerate_env_overrides(launched_env(sharding_strategy="NO_SHARD"), silent)
    assert flagged["parallel.sharding_strategy"] == "NO_SHARD"


def test_the_launching_config_file_is_found_in_the_accelerate_process(tmp_path):
    """accelerate does not export its config file's path: it is read from the launching process."""
    import subprocess
    import sys

    code = "from shardtune.config.accelerate import launching_config_file as f; print(f())"
    # a stand-in for `accelerate launch --config_file X`: a process whose command line says so, and its child
    parent = "import subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1]], check=True)"
    out = subprocess.run(
        [sys.executable, "-c", parent, code, "accelerate", "launch", "--config_file", "x.yaml", "recipe.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.strip() == str(tmp_path / "x.yaml"), out.stderr
    assert launching_config_file() is None  # pytest was not started by accelerate


@pytest.mark.parametrize(
    "key, value",
    [("offload_params", "ture"), ("forward_prefetch", "maybe"), ("activation_checkpointing", "every2")],
)
def test_a_setting_that_is_not_a_boolean_is_refused_naming_key_file_and_values(tmp_path, key, value):
    path = write_yaml(tmp_path, {"version": 1, key: value})
    for read in (
        lambda: accelerate_yaml_overrides(path),
        lambda: accelerate_env_overrides(launched_env(**{key: value}), path),
    ):
        with pytest.raises(ConfigError) as e:
            read()
        msg = str(e.value)
        assert f"fsdp_{key}={value!r}" in msg and str(path) in msg and "true" in msg and "false" in msg, msg


# --------------------------------------------------------------- inputs checked before anything is loaded
def test_a_model_path_that_does_not_exist_is_refused(tmp_path):
    with pytest.raises(ConfigError) as e:
        resolve_config(Config(), ["model.name_or_path=/no/such/dir", "model.init=pretrained"], env={})
    assert "model.name_or_path=/no/such/dir: no such directory" in str(e.value)
    with pytest.raises(ConfigError, match=r"model.tokenizer=\./gone: no such directory"):
        resolve_config(Config(), ["model.tokenizer=./gone"], env={})
    # a hub id is left to the hub
    cfg = resolve_config(Config(), ["model.name_or_path=org/model", "model.init=pretrained"], env={})
    assert cfg.model.name_or_path == "org/model"


def test_a_model_directory_without_safetensors_is_refused_with_the_conversion(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConfigError) as e:
        resolve_config(Config(), [f"model.name_or_path={tmp_path}", "model.init=pretrained"], env={})
    msg = str(e.value)
    assert (
        f"model.name_or_path={tmp_path}: no safetensors weights" in msg and "found pytorch_model.bin" in msg
    )
    assert ".save_pretrained(" in msg and f"model.name_or_path={tmp_path}-safetensors" in msg
    (tmp_path / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"no config\.json"):
        resolve_config(Config(), [f"model.name_or_path={tmp_path}", "model.init=pretrained"], env={})


@pytest.mark.parametrize(
    "value, expected",
    [
        (
            "[q_proj,vproj]",
            r"no linear layer of this llama model is called 'vproj' \(did you mean v_proj\?\)",
        ),
        ("q_proj,v_proj", r"'q_proj,v_proj' is one string.*lora.target_modules=\[q_proj,v_proj\]"),
        ("[]", r"lora.target_modules is empty"),
    ],
)
def test_target_modules_the_model_does_not_have_are_refused(value, expected):
    with pytest.raises(ConfigError, match=expected) as e:
        resolve_config(Config(), [f"lora.target_modules={value}"], env={})
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in str(e.value)
    # a swept value is checked too
    with pytest.raises(ConfigError, match=r"sweep lora.target_modules=vproj: .*vproj"):
        from shardtune.cli.sweep import expand

        expand(Config(), {"lora.target_modules": [["q_proj", "v_proj"], ["vproj"]]})


def test_target_modules_peft_accepts_are_accepted():
    """What PEFT matches: a regular expression over whole module paths, names by the end of their path, the head."""
    for value in (r".*\.(q_proj|v_proj)", "[self_attn.q_proj,lm_head]", "all-linear"):
        resolve_config(Config(), [f"lora.target_modules={value}"], env={})


def test_a_shape_field_the_architecture_lacks_is_refused():
    with pytest.raises(ConfigError) as e:
        resolve_config(Config(), ["model.shape.num_hiden_layers=2"], env={})
    msg = str(e.value)
    assert "model.shape.num_hiden_layers: not a field" in msg and "model.shape.num_hidden_layers?" in msg
    cfg = resolve_config(Config(), ["model.shape.num_hidden_layers=2", "model.shape.rope_theta=1e6"], env={})
    assert cfg.model.shape["num_hidden_layers"] == 2


def test_resume_takes_auto_never_or_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError) as e:
        resolve_config(Config(), ["train.resume=nevr"], env={})
    msg = str(e.value)
    assert "train.resume=nevr" in msg and "Did you mean train.resume=never?" in msg and "auto" in msg
    assert resolve_config(Config(), [f"train.resume={tmp_path}"], env={}).train.resume == str(tmp_path)


def test_a_missing_deepspeed_stops_the_run_before_the_data(monkeypatch, capsys):
    import shardtune.cli.recipe as recipe

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "deepspeed" else real(n, *a))
    cfg = apply_overrides(Config(), {"parallel.backend": "deepspeed"}, "test")
    with pytest.raises(
        ConfigError, match=r"parallel.backend=deepspeed .* pip install 'shardtune\[deepspeed\]'"
    ):
        check_backend([cfg])
    monkeypatch.setattr(recipe, "run", lambda *a, **k: pytest.fail("the run started"))
    with pytest.raises(SystemExit) as e:
        main(Config(), argv=["parallel.backend=deepspeed"])
    assert e.value.code == 2 and "needs DeepSpeed" in capsys.readouterr().err


def test_optimizers_are_refused_where_they_cannot_run(monkeypatch, capsys):
    """bitsandbytes' optimizers are refused under DeepSpeed (its checkpoints hold AdamW's moments); the paged
    ones on a machine without CUDA (bitsandbytes would fall back to unpaged ones with a warning) and on
    parallel.device=cpu, before anything is loaded, with the optim.name to use instead."""
    import torch

    import shardtune.cli.recipe as recipe

    with pytest.raises(ConfigError, match=r"optim\.name=adamw_8bit .*deepspeed.*set optim\.name=adamw"):
        resolve_config(Config(), ["optim.name=adamw_8bit", "parallel.backend=deepspeed"], env={})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, instead in (("paged_adamw_8bit", "adamw_8bit"), ("paged_adamw_32bit", "adamw")):
        cfg = resolve_config(Config(), [f"optim.name={name}"], env={})  # valid: a GPU machine runs it
        with pytest.raises(ConfigError, match=rf"optim\.name={name} needs CUDA.*set optim\.name={instead} "):
            check_backend([cfg])
    check_backend([resolve_config(Config(), ["optim.name=adamw_8bit"], env={})])  # runs on a CPU
    monkeypatch.setattr(recipe, "run", lambda *a, **k: pytest.fail("the run started"))
    with pytest.raises(SystemExit) as e:
        main(Config(), argv=["optim.name=paged_adamw_8bit"])
    assert e.value.code == 2 and "no CUDA GPU" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_backend([resolve_config(Config(), ["optim.name=paged_adamw_32bit"], env={})])
    on_cpu = resolve_config(Config(), ["optim.name=paged_adamw_8bit", "parallel.device=cpu"], env={})
    with pytest.raises(ConfigError, match=r"needs CUDA.*\(parallel\.device=cpu\)"):
        check_backend([on_cpu])


def test_schedules_by_their_hugging_face_names():
    """optim.scheduler takes transformers' names (constant stays constant_with_warmup's alias);
    cosine_with_min_lr ends at optim.min_lr_rate x optim.lr, and is refused without it."""
    import torch

    from shardtune.train.optim import build_scheduler

    def rates(**settings) -> list[float]:
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([param], lr=1.0)
        scheduler = build_scheduler(OptimConfig(lr=1.0, warmup_steps=2, **settings), optimizer, 10)
        out = []
        for _ in range(11):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    constant = [0.0, 0.5] + [1.0] * 9
    assert rates(scheduler="constant") == rates(scheduler="constant_with_warmup") == constant
    assert rates(scheduler="linear") == pytest.approx(
        [0, 0.5, 1, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0]
    )
    cosine = rates(scheduler="cosine")
    assert cosine[:3] == [0, 0.5, 1] and cosine[3] == pytest.approx(0.9619, abs=1e-4) and cosine[-1] == 0
    floor = rates(scheduler="cosine_with_min_lr", min_lr_rate=0.1)
    assert floor[3] == pytest.approx(0.9657, abs=1e-4) and floor[-1] == pytest.approx(0.1)
    with pytest.raises(ConfigError, match=r"cosine_with_min_lr needs .* set optim\.min_lr_rate"):
        resolve_config(Config(), ["optim.scheduler=cosine_with_min_lr"], env={})
    cfg = resolve_config(Config(), ["optim.scheduler=cosine_with_min_lr", "optim.min_lr_rate=0.1"], env={})
    assert cfg.optim.min_lr_rate == 0.1


# ------------------------------------------------------------------------------------------------ sweeps
def test_sweep_values_a_run_would_drop_are_refused(capsys):
    assert parse_args(["--sweep", "lora.r=32"]) == ({"--sweep"}, ["lora.r=32"], {})
    with pytest.raises(SystemExit) as e:  # a bare --sweep on a recipe without a grid of its own
        main(Config(), argv=["--sweep", "lora.r=32"])
    assert e.value.code == 2 and "has no sweep grid of its own" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"--sweep lora.r is given twice"):
        parse_args(["--sweep", "lora.r=8,16", "--sweep", "lora.r=4,32"])
    _, overrides, grid = parse_args(["--sweep", "lora.r=8,16", "lora.r=4"])
    with pytest.raises(
        ConfigError, match=r"lora.r=4 on the command line is also swept by --sweep \(lora.r: 8, 16\)"
    ):
        check_sweep(overrides, grid, recipe_grid=False)
    with pytest.raises(ConfigError, match=r"lora.r=32 .* also swept by the recipe's --sweep grid"):
        check_sweep(["lora.r=32"], {"lora.r": [8, 16]}, recipe_grid=True)
    check_sweep(["optim.lr=1e-3"], {"lora.r": [8, 16]}, recipe_grid=True)  # a key the grid leaves alone


# ------------------------------------------------------------------------------------------- run directory
@pytest.mark.parametrize("name", ["../../esc", "/etc", "", ".", "..", "a/b", "a\\b", "C:\\runs", "~x"])
def test_a_run_name_is_one_directory_name(name, tmp_path, capsys):
    """train.run_name names one directory under train.output_dir: a path (which would write outside it, or into
    another run), '.', '..' or nothing is refused with the reason and the fix, before anything starts."""
    with pytest.raises(ConfigError, match=r"train.run_name=.* give a plain name"):
        resolve_config(Config(), [f"train.output_dir={tmp_path}", f"train.run_name={name}"])
    with pytest.raises(SystemExit) as e:
        main(Config(), argv=["--validate", f"train.output_dir={tmp_path}", f"train.run_name={name}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: train.run_name=") and "is valid" not in err
    with pytest.raises(ConfigError, match=r"train.run_name="):  # and where the run directory is made
        run_directory(Config(train={"output_dir": str(tmp_path), "run_name": name}).train, "recipe")
    assert list(tmp_path.iterdir()) == []


def test_the_run_directory_is_derived_in_one_place(tmp_path):
    train = Config(train={"output_dir": str(tmp_path)}).train
    assert run_directory(train, "tiny") == tmp_path / "tiny"
    assert run_directory(train, "tiny", "sweep/lora.r=8") == tmp_path / "tiny" / "sweep" / "lora.r=8"
    named = Config(train={"output_dir": str(tmp_path), "run_name": "mine"}).train
    assert run_directory(named, "tiny") == tmp_path / "mine"
    with pytest.raises(ConfigError, match=r"the run name='\.\.'"):  # a recipe's name is checked too
        run_directory(train, "..")


def test_a_sweep_trains_each_point_in_its_own_directory_under_the_run(tmp_path, monkeypatch):
    """The on-disk layout runs/<name>/sweep/<point>/, each point's configuration keeping the run's own name
    (a sweep passes the path inside the run; no run name with a path in it)."""
    from shardtune.cli import sweep
    from shardtune.parallel.distributed import DistInfo
    from shardtune.train import run as run_module

    calls = []

    def fake_train(cfg, dist, name, stop=None, stop_file=None, sub=None):
        calls.append((cfg.train.run_name, sub, stop_file))
        run_dir = run_directory(cfg.train, name, sub)
        run_dir.mkdir(parents=True)
        return {"status": "complete", "run_dir": str(run_dir), "trainable_params": 1}

    monkeypatch.setattr(run_module, "train", fake_train)
    monkeypatch.setattr(sweep, "format_table", lambda grid, results: "table")
    cfg = Config(train={"output_dir": str(tmp_path), "run_name": "grid"})
    results = sweep.run_grid(cfg, {"lora.r": [4, 8]}, DistInfo.alone(torch.device("cpu")), "tiny")
    base = tmp_path / "grid"
    assert calls == [("grid", f"sweep/lora.r={r}", base / "STOP") for r in (4, 8)]
    assert [Path(r["run_dir"]) for r in results] == [base / "sweep" / f"lora.r={r}" for r in (4, 8)]
    assert json.loads((base / "status.json").read_text())["status"] == "complete"


# ------------------------------------------------------------------------------------------- output and data
def test_a_read_only_output_dir_is_one_line_before_anything_starts(tmp_path, capsys, monkeypatch):
    """A read-only train.output_dir (a real read-only filesystem: root may write anywhere else) is refused by
    every process before anything is loaded, in one line naming the directory and the fix, exit 2."""
    from shardtune.cli import recipe

    monkeypatch.setattr(recipe, "run", lambda *a, **k: pytest.fail("the run started"))
    with tmpfs(tmp_path / "ro", "1m", "ro") as ro, pytest.raises(SystemExit) as e:
        main(Config(), argv=[f"train.output_dir={ro}/runs", "train.max_steps=1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(
        f"error: train.output_dir={ro}/runs: the run cannot be written there ({ro} is on a read-only "
        "filesystem). Give a directory you can write"
    )


def test_a_directory_named_like_a_data_file_is_said_to_be_one(tmp_path):
    (tmp_path / "x.jsonl").mkdir()
    with pytest.raises(
        ConfigError, match=r"data.source: .*x.jsonl is a directory, not a .jsonl file: give the"
    ):
        apply_overrides(Config(), {"data.source": str(tmp_path / "x.jsonl")}, "x")


def test_slurm_train_sh_refuses_a_run_name_with_a_path_before_making_anything(tmp_path):
    import subprocess

    from conftest import run_env

    env = run_env(
        SLURM_JOB_ID="7", SLURM_SUBMIT_DIR=str(ROOT), RUN_NAME="../esc", RUNS_DIR=str(tmp_path / "runs")
    )
    proc = subprocess.run(
        ["bash", "slurm/train.sh", "recipes/tiny.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "RUN_NAME='../esc': give one directory name" in proc.stdout, proc
    assert list(tmp_path.iterdir()) == []
