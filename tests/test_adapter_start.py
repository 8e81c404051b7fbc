"""model.adapter: a run's adapters start from a PEFT adapter directory; settings, base and tensors that do not fit
are a ConfigError before any weight is read (in-process, world size 1, fast)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from shardtune.config import Config, apply_overrides, check_inputs
from shardtune.errors import ConfigError
from shardtune.model import loading, modeling
from shardtune.parallel.backend import backend_for
from shardtune.parallel.distributed import DistInfo

CPU = torch.device("cpu")
SMALL = {"model.shape": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128}, "lora.r": "4"}


def config(**overrides):
    return apply_overrides(Config(), {**SMALL, **overrides}, "test")


def build(cfg):
    backend = backend_for(cfg.parallel, cfg.param_dtype, DistInfo.alone(CPU), 4, 1.0)
    model, _ = loading.build_model(cfg, modeling.model_config(cfg), None, "sdpa", backend, CPU)
    return model


def lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An adapter directory as a run's export writes it: random A and B, base recorded as a random run's."""
    out = tmp_path_factory.mktemp("adapter")
    model = build(config())
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p))
    peft_config = model.peft_config["default"]
    peft_config.base_model_name_or_path = "tiny (random, seed 0)"
    peft_config.save_pretrained(out)
    save_file(
        {n.replace(".default.", "."): t.contiguous() for n, t in lora(model).items()},
        out / "adapter_model.safetensors",
    )
    return out, lora(model)


def test_the_adapters_start_from_the_directory(saved):
    directory, weights = saved
    cfg = config(**{"model.adapter": str(directory)})
    check_inputs(cfg)
    started = lora(build(cfg))
    assert started.keys() == weights.keys() and all(torch.equal(started[k], weights[k]) for k in weights)
    fresh = lora(build(config()))
    assert not torch.equal(
        fresh[next(k for k in fresh if "lora_B" in k)], started[next(k for k in fresh if "lora_B" in k)]
    )


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        ({"lora.r": "8"}, "lora.r: the adapter's is 4, this run's 8"),
        ({"lora.alpha": "16"}, "lora.alpha: the adapter's is 32.0, this run's 16.0"),
        ({"lora.target_modules": "[q_proj,v_proj]"}, "lora.target_modules: the adapter adapts ['down_proj', "),
        ({"train.seed": "1"}, "the adapter was trained on 'tiny (random, seed 0)', and this run draws random weights for 'tiny' with train.seed=1"),
    ],
    ids=["r", "alpha", "targets", "other-random-base"],
)  # fmt: skip
def test_settings_and_base_that_differ_are_refused_before_loading(saved, overrides, said):
    directory, _ = saved
    cfg = config(**{"model.adapter": str(directory), **overrides})
    with pytest.raises(ConfigError) as e:
        check_inputs(cfg)
    assert said in str(e.value) and "does not fit this run" in str(e.value), str(e.value)


def test_a_pretrained_base_of_another_name_is_refused_and_a_copy_of_the_same_accepted(saved, tmp_path):
    from shardtune.config.inputs import adapter_base_problem

    cfg = config(**{"model.adapter": str(saved[0])})
    pretrained = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(
                update={"init": "pretrained", "name_or_path": "meta-llama/Meta-Llama-3-8B"}
            )
        }
    )
    assert adapter_base_problem(pretrained, "meta-llama/Meta-Llama-3-8B") is None
    assert adapter_base_problem(pretrained, "/models/Meta-Llama-3-8B") is None  # a local copy
    assert "this run's base is model.name_or_path='meta-llama/Meta-Llama-3-8B'" in adapter_base_problem(
        pretrained, "mistralai/Mistral-7B-v0.1"
    )
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    (base_dir / "config.json").write_text("{}")
    assert adapter_base_problem(cfg, str(base_dir)) is None  # a run's written random base


def test_tensors_that_do_not_fit_the_skeleton_are_refused_before_any_weight(saved):
    directory, _ = saved
    wider = {"model.shape": {"num_hidden_layers": 2, "hidden_size": 96, "intermediate_size": 128}}
    cfg = config(**{"model.adapter": str(directory), **wider})
    with pytest.raises(ConfigError, match=r"its tensors do not fit this model: .*have other shapes \(e.g. "):
        build(cfg)
    deeper = {"model.shape": {"num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 128}}
    with pytest.raises(ConfigError, match=r"of this model's adapters are not in it"):
        build(config(**{"model.adapter": str(directory), **deeper}))


def test_what_is_not_a_lora_adapter_directory_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        check_inputs(config(**{"model.adapter": str(tmp_path / "nope")}))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(ConfigError, match=r"no adapter_model\.safetensors in this directory"):
        check_inputs(config(**{"model.adapter": str(tmp_path)}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "use_dora": True}))
    with pytest.raises(ConfigError, match="shardtune trains plain LoRA adapters only"):
        check_inputs(config(**{"model.adapter": str(tmp_path)}))
