"""Config: typed sections, overrides, errors that name the key and the closest valid one, precedence."""

import pytest

from shardtune.config import Config, ConfigError, apply_overrides, format_help, parse_overrides
from shardtune.launcher import accelerate_env_overrides, accelerate_yaml_overrides
from shardtune.recipe import _parse_args, resolve_config, split_sweep_values


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
        ("optim.learning_rate", None),
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
    flags, overrides, sweep = _parse_args(
        [
            "lora.r=8",
            "--sweep",
            "lora.r=8,16",
            "--sweep",
            "lora.target_modules=[q_proj,v_proj],all-linear",
            "--validate",
            "--sweep",
            "optim.lr=1e-3",
            "data.max_len=64",
        ]
    )
    assert flags == {"--sweep", "--validate"} and overrides == [
        "lora.r=8",
        "optim.lr=1e-3",
        "data.max_len=64",
    ]
    assert sweep == {"lora.r": ["8", "16"], "lora.target_modules": ["[q_proj,v_proj]", "all-linear"]}
    assert split_sweep_values("1e-4,2e-4") == ["1e-4", "2e-4"]
    with pytest.raises(ConfigError, match="unknown flag"):
        _parse_args(["--frobnicate"])
