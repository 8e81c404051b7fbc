"""quant.bits: 4 (NF4, the default), 8 (bitsandbytes' LLM.int8) and 16 (no quantization). The 8-bit base is
built bit for bit as transformers' BitsAndBytesConfig(load_in_8bit=True) loads it, the old quant.load_in_4bit
still reads (and resumes), the plan counts each width's bytes, merge dequantizes as training saw it, and what
cannot be done with an 8-bit base is refused with the fix."""

import json

import bitsandbytes as bnb
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from shardtune.checkpoint.merge import as_trained
from shardtune.checkpoint.resume import exactness_differences
from shardtune.config import Config, apply_overrides, to_yaml
from shardtune.errors import ConfigError
from shardtune.model import loading, modeling
from shardtune.model.tokenizer import build_tiny_tokenizer
from shardtune.parallel.distributed import DistInfo
from shardtune.parallel.fsdp import FsdpBackend
from shardtune.planning.estimate import Shape, estimate

CPU = torch.device("cpu")


def with_(**overrides) -> Config:
    return apply_overrides(Config(), overrides, "test")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("quant") / "base"
    modeling.write_random_base(Config(), build_tiny_tokenizer(), path)
    return path


def build(cfg: Config, base):
    backend = FsdpBackend(cfg.parallel, cfg.param_dtype, DistInfo.alone(CPU))
    model, _ = loading.build_model(cfg, modeling.model_config(cfg), str(base), "sdpa", backend, CPU)
    return model


def test_quantization_config_is_transformers_own():
    assert modeling.quantization_config(with_(**{"quant.bits": 16})) is None
    eight = modeling.quantization_config(with_(**{"quant.bits": "8"}))
    assert eight.to_dict() == BitsAndBytesConfig(load_in_8bit=True).to_dict()
    four = modeling.quantization_config(Config())
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant


def test_8bit_layers_equal_transformers_load_in_8bit(base):
    """Every decoder linear layer: bitsandbytes' Linear8bitLt with the same int8 rows and fp32 row scales as
    from_pretrained(quantization_config=BitsAndBytesConfig(load_in_8bit=True)) gives, the same outlier threshold;
    norms, embeddings and head unquantized and equal; the same forward in training and in eval mode."""
    for dtype in ("no", "bf16"):
        cfg = with_(**{"quant.bits": 8, "parallel.mixed_precision": dtype})
        mine = build(cfg, base)
        reference = AutoModelForCausalLM.from_pretrained(
            base,
            quantization_config=modeling.quantization_config(cfg),
            dtype=modeling.DTYPES[cfg.param_dtype],
            device_map={"": "cpu"},
        )
        theirs = dict(reference.named_modules())
        int8 = 0
        for name, mod in mine.named_modules():
            if isinstance(mod, bnb.nn.Linear8bitLt):
                ref = theirs[loading.checkpoint_name(name + ".weight").removesuffix(".weight")]
                assert type(ref) is bnb.nn.Linear8bitLt and mod.weight.dtype == torch.int8
                assert torch.equal(mod.weight.data, ref.weight.data) and torch.equal(
                    mod.weight.SCB, ref.weight.SCB
                )
                assert (mod.state.threshold, mod.state.has_fp16_weights) == (6.0, False)
                assert (ref.state.threshold, ref.state.has_fp16_weights) == (6.0, False)
                int8 += 1
                if int8 == 1:  # bitsandbytes multiplies differently in training on a CPU: both modes checked
                    x = torch.randn(3, 5, mod.in_features, dtype=modeling.DTYPES[cfg.param_dtype])
                    with torch.no_grad():
                        for training in (True, False):
                            mod.train(training), ref.train(training)
                            assert torch.equal(mod(x), ref(x)), (dtype, training)
        assert int8 == 4 * 7
        plain = {
            loading.checkpoint_name(n): p for n, p in mine.named_parameters() if p.dtype.is_floating_point
        }
        for name, p in reference.named_parameters():
            if p.dtype.is_floating_point and name in plain:
                assert torch.equal(p, plain[name]), name


def test_16_bits_is_the_unquantized_base(base):
    model = build(with_(**{"quant.bits": 16}), base)
    assert not any(isinstance(m, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt) for m in model.modules())
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_load_in_4bit_is_read_as_quant_bits():
    """The old setting: false is bits=16, true bits=4, on the command line and in a recipe; a value that
    disagrees with quant.bits is refused, naming both."""
    assert with_(**{"quant.load_in_4bit": "false"}).quant.bits == 16
    assert with_(**{"quant.load_in_4bit": "true"}).quant.bits == 4
    cfg = Config()
    cfg.quant.load_in_4bit = False  # a recipe written before quant.bits
    assert cfg.quant.bits == 16 and cfg.quant.load_in_4bit is None
    assert "load_in_4bit" in to_yaml(cfg) and "bits: 16" in to_yaml(cfg)
    with pytest.raises(
        ConfigError, match=r"quant.load_in_4bit=true conflicts with quant.bits=8.*set quant.bits"
    ):
        with_(**{"quant.bits": 8, "quant.load_in_4bit": True})
    with pytest.raises(ConfigError, match=r"quant.bits='5'.*Input should be 4, 8 or 16"):
        with_(**{"quant.bits": "5"})


def test_a_checkpoint_saved_before_quant_bits_resumes():
    """An older run's config.yaml has quant.load_in_4bit and no quant.bits: it resumes as bits=4 (or 16), and
    any setting it lacks counts as its default; a real change is still refused."""
    now = yaml.safe_load(to_yaml(Config()))
    old = yaml.safe_load(to_yaml(Config()))
    old["quant"] = {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True, "storage_dtype": "auto"}
    assert exactness_differences(old, now) == []
    Config.model_validate(old)  # merge and export read it too
    old["quant"]["load_in_4bit"] = False
    assert exactness_differences(old, now) == ["quant.bits: checkpoint 16 -> now 4"]
    del old["quant"]["load_in_4bit"], old["lora"]["fused"]
    assert exactness_differences(old, now) == []


def test_what_an_8bit_base_cannot_do_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"quant.bits=8 does not work with parallel.backend=deepspeed"):
        with_(**{"quant.bits": 8, "parallel.backend": "deepspeed"})
    with pytest.raises(ConfigError, match=r"parallel.cpu_offload=true does not work with quant.bits=8"):
        with_(**{"quant.bits": 8, "parallel.cpu_offload": True})
    # the 4-bit storage and SHARD_GRAD_OP limits are the 4-bit weights' own
    with_(**{"quant.bits": 16, "parallel.mixed_precision": "bf16", "quant.storage_dtype": "float32"})
    with_(**{"quant.bits": 8, "parallel.sharding_strategy": "SHARD_GRAD_OP"})


def test_the_plan_counts_each_width():
    """0.5 byte per 4-bit weight, 1 per 8-bit one (+ an fp32 scale per row), 2 per bf16 one; the 8-bit base
    whole on every GPU (FSDP cannot shard it), and gathering nothing."""
    cfg = apply_overrides(
        Config(), {"model.name_or_path": "llama3-8b", "parallel.mixed_precision": "bf16"}, "t"
    )
    hf_config = modeling.model_config(cfg)
    s = Shape.of(hf_config)
    lin, rest = s.layers * s.layer_weights, (s.layers * 2 * s.hidden + s.root_weights) * 2
    plans = {b: estimate(apply_overrides(cfg, {"quant.bits": b}, "t"), hf_config, 2).gpu for b in (4, 8, 16)}
    assert plans[4]["4-bit base shard"] == pytest.approx((lin * 0.5 + rest) / 2)
    assert plans[8]["8-bit base (whole)"] == pytest.approx(lin * 1.0 + rest)
    assert plans[8]["8-bit statistics (whole)"] == s.layers * s.out_rows * 4
    assert plans[8]["2 decoder layers, gathered"] == plans[8]["embeddings + head, gathered"] == 0
    assert plans[16]["16-bit base shard"] == pytest.approx((lin * 2 + rest) / 2)
    assert "16-bit statistics (whole)" not in plans[16] and plans[16]["dequantized weights (2 matmuls)"] == 0


def test_merge_dequantizes_as_training_saw_it(base):
    """What merge adds the adapter to: the weight bitsandbytes multiplies in training (LLM.int8 on a CPU: the int8
    rows times their scales; NF4: the dequantized blocks), and the weight itself unquantized."""
    from safetensors import safe_open

    with safe_open(base / "model.safetensors", "pt") as f:
        w = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    eight = with_(**{"quant.bits": 8})
    layer = build(eight, base).base_model.model.model.layers[1].mlp.down_proj.base_layer
    x = torch.randn(4, layer.in_features)
    layer.train()
    with torch.no_grad():
        assert torch.equal(layer(x), x @ as_trained(eight, w).t())
    four = as_trained(Config(), w)
    assert 0 < (four - w).abs().max() < 0.5 and not torch.equal(four, as_trained(eight, w))


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 16])
def test_an_8bit_and_a_16bit_run_train_merge_and_reload(tmp_path, bits):
    """The tiny recipe with quant.bits=8 (LLM.int8) or 16 (unquantized), one process, fp32: the loss falls, and
    `shardtune merge` writes a model whose logits are the base's (8-bit: as training multiplied it) + the adapter's
    to 1e-4, loaded back with transformers and PEFT."""
    from conftest import launch
    from shardtune.cli.main import main

    launch(
        [
            "recipes/tiny.py",
            f"quant.bits={bits}",
            "train.max_steps=8",
            "optim.warmup_steps=0",
            "eval.every=0",
            "eval.samples=4",
            "data.generated.rows=600",
            f"train.output_dir={tmp_path}",
            "train.run_name=run",
        ],
        launcher="python",
    )
    run = tmp_path / "run"
    s = json.loads((run / "summary.json").read_text())
    assert s["final_eval_loss"] < s["first_eval_loss"] and s["base_exact_match"] is not None
    assert yaml.safe_load((run / "config.yaml").read_text())["quant"]["bits"] == bits
    assert main(["merge", str(run), str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    proc = launch(["tests/workers/check_merged.py", str(run), str(tmp_path / "merged")], launcher="python")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rel_l2"] < 1e-4 < result["adapter_effect"], result
