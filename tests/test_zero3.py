"""DeepSpeed ZeRO-3 (parallel.backend=deepspeed): selected by an accelerate DEEPSPEED config, trains as the
FSDP path does, resumes exactly, writes the same checkpoints and adapters. Real DeepSpeed over gloo."""

import json

import pytest
import torch
from test_resume import RUN, adapter, losses

from conftest import launch, read_summary
from shardtune.cli.args import load_recipe, resolve_config
from shardtune.config.accelerate import accelerate_env_overrides, accelerate_yaml_overrides
from shardtune.errors import ConfigError

ZERO3 = "fsdp_configs/zero3_cpu_2proc.yaml"


@pytest.mark.slow
def test_zero3_trains_as_fsdp_does_and_resumes_exactly(reference, tmp_path):
    """12 steps across two epochs with dropout, 2 accumulated micro-batches per process, every layer
    recomputed in backward, interrupted by a SIGTERM mid-accumulation and resumed; against the FSDP run of the
    same recipe (`reference`, without recomputation, which changes no arithmetic)."""
    z3 = tmp_path / "zero3"
    args = [*RUN, f"train.output_dir={z3}", "train.run_name=run", "parallel.activation_checkpointing=true"]
    cut = launch(
        args,
        launcher="accelerate",
        config=ZERO3,
        env={"SHARDTUNE_FAULT": "rank=0,step=5,micro=1,action=sigterm"},
        check=False,
    )
    assert cut.returncode != 0, cut.stderr[-2000:]
    assert "DeepSpeed ZeRO-3 compute float32 on 2 CPU process(s)" in cut.stdout + cut.stderr
    resumed = launch(args, launcher="accelerate", config=ZERO3)
    assert "resumed from" in resumed.stdout + resumed.stderr

    a, b = losses(reference), losses(z3 / "run")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    worst = max(abs(a[s] - b[s]) / a[s] for s in a)
    assert worst < 1e-5, (worst, a, b)  # the same arithmetic; only the order of the gradient sums differs
    sa, sb = read_summary(reference), read_summary(z3 / "run")
    assert sa["first_eval_loss"] == sb["first_eval_loss"]  # before any update: the very same logits
    assert sb["final_eval_loss"] == pytest.approx(sa["final_eval_loss"], rel=1e-5)
    assert sb["rank0_holds"] == 0.5
    wa, wb = adapter(reference), adapter(z3 / "run")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6) for k in wa)


def test_deepspeed_configs_map_to_the_backend_and_refuse_what_it_does_not_do(tmp_path):
    overrides, _ = accelerate_yaml_overrides("fsdp_configs/zero3_4xa10g.yaml")
    assert overrides == {
        "parallel.backend": "deepspeed",
        "parallel.cpu_offload": True,
        "parallel.mixed_precision": "bf16",
    }
    env = {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
        "ACCELERATE_MIXED_PRECISION": "bf16",
    }
    with pytest.raises(ConfigError, match="zero_stage=2: shardtune's DeepSpeed backend is ZeRO stage 3"):
        accelerate_env_overrides(env)
    env.update(ACCELERATE_DEEPSPEED_ZERO_STAGE="3", ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE="cpu")
    with pytest.raises(
        ConfigError, match=r"offload_optimizer_device=cpu: .* Set offload_optimizer_device: none"
    ):
        accelerate_env_overrides(env)
    with pytest.raises(Exception, match=r"fp16 is not supported with parallel\.backend=deepspeed"):
        resolve_config(
            load_recipe("recipes/tiny.py").config(),
            ["parallel.backend=deepspeed", "parallel.mixed_precision=fp16"],
            env={},
        )


@pytest.mark.slow
def test_zero3_logits_equal_the_unsharded_models_in_bf16():
    """bf16 storage for the 4-bit bytes and norms, fp32 adapters: DeepSpeed partitions and gathers them all,
    and the logits before any update are the unsharded model's, bit for bit (the GPU check's worker, on CPU)."""
    proc = launch(
        ["tests/workers/gpu_exact.py", "tiny", "parallel.backend=deepspeed", "parallel.mixed_precision=bf16"],
        env={"SHARDTUNE_DEVICE": "cpu"},
    )
    result = json.loads([x for x in proc.stdout.splitlines() if x.startswith("{")][-1])
    assert result["backend"] == "deepspeed" and result["identical"] and result["rank0_holds"] == 0.5
