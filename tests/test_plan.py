"""`shardtune plan`: its parts checked against the real thing where a CPU can measure it (parameter counts,
the bytes autograd keeps for a decoder layer, checkpoint size), and the command itself. Its GPU peak
predictions are checked against GPU runs in bench/results/."""

import importlib.util
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from shardtune.cli.plan import override_line, parse_size
from shardtune.config import Config, apply_overrides
from shardtune.errors import ConfigError
from shardtune.model import loading, modeling
from shardtune.parallel.distributed import DistInfo
from shardtune.parallel.fsdp import FsdpBackend
from shardtune.planning import auto
from shardtune.planning.activations import layer_activation_bytes, saved_bytes
from shardtune.planning.estimate import GPU_MEMORY, Shape, estimate, lora_parameters


@pytest.fixture(scope="module")
def tiny():
    cfg = Config()
    hf_config = modeling.model_config(cfg)
    backend = FsdpBackend(cfg.parallel, cfg.param_dtype, DistInfo.alone(torch.device("cpu")))
    model, _ = loading.build_model(cfg, hf_config, None, "sdpa", backend, torch.device("cpu"))
    return cfg, hf_config, model


def test_adapter_count_is_the_models(tiny):
    cfg, hf_config, model = tiny
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_parameters(Shape.of(hf_config), cfg.lora.r, cfg.lora.target_modules) == trainable
    assert lora_parameters(Shape.of(hf_config), 8, ["q_proj", "v_proj"]) == 4 * 8 * (256 + 256 + 256 + 128)


def test_saved_activations_of_a_real_4bit_layer_are_counted(tiny):
    """The meta-device count equals what a real 4-bit layer with LoRA keeps for its backward on the CPU."""
    from transformers import AttentionInterface

    from shardtune.planning.activations import _fused_attention

    _, hf_config, model = tiny
    s = Shape.of(hf_config)
    rows, seq = 2, 64
    predicted = layer_activation_bytes(
        s.hidden,
        s.inter,
        s.heads,
        s.kv_heads,
        s.head_dim,
        (16, 32.0, 0.0, "all-linear", True, False),  # lora.fused, as the model was built
        rows * seq,
        seq,
        "float32",
    )
    AttentionInterface.register("shardtune_fused", _fused_attention)
    inner = model.base_model.model.model
    layer = inner.layers[0]
    layer.self_attn.config._attn_implementation = "shardtune_fused"
    x = torch.randn(rows, seq, s.hidden, requires_grad=True)
    positions = torch.arange(seq).unsqueeze(0).expand(rows, -1)
    cos_sin = inner.rotary_emb(x, positions)
    try:
        real = saved_bytes(lambda: layer(x, position_embeddings=cos_sin), [*model.parameters(), *cos_sin])
    finally:
        layer.self_attn.config._attn_implementation = "sdpa"
    assert predicted == pytest.approx(real, rel=0.02), (predicted, real)


def test_sizes_parse():
    assert parse_size("24GiB") == parse_size("24G") == 24 * 2**30
    assert parse_size("512MiB") == 2**29
    with pytest.raises(Exception, match="24 gigs"):
        parse_size("24 gigs")


def plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shardtune.cli", "plan", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_plan_says_what_fits_and_fit_recommends_a_line():
    out = plan("recipes/llama3_70b.py", "--gpus", "4", "--gpu-mem", "24GiB", "--fit")
    assert out.returncode == 0, out.stderr
    assert (
        "4-bit base shard" in out.stdout
        and "activations" in out.stdout
        and "checkpoint on disk" in out.stdout
    )
    line = out.stdout.split("paste:")[1].strip().splitlines()[0]
    assert "parallel.activation_checkpointing=" in line and "train.micro_batch_size=" in line
    none = plan("recipes/llama3_70b.py", "--gpus", "1", "--gpu-mem", "24GiB", "--fit")
    assert none.returncode == 1 and "no configuration fits" in none.stdout


def test_zero3_partitions_the_adapters_in_the_plan():

    cfg = Config()
    hf_config = modeling.model_config(cfg)
    fsdp = estimate(cfg, hf_config, 4).gpu
    zero3 = estimate(apply_overrides(cfg, {"parallel.backend": "deepspeed"}, "test"), hf_config, 4).gpu
    whole = fsdp["adapters + grads + AdamW (whole)"]
    assert whole == 16 * lora_parameters(Shape.of(hf_config), cfg.lora.r, cfg.lora.target_modules)
    assert zero3["adapters + grads + AdamW (partitioned)"] == whole / 4


def test_no_shard_keeps_the_base_whole_and_gathers_nothing():
    """parallel.sharding_strategy=NO_SHARD: each GPU holds the whole 4-bit base and FSDP gathers nothing;
    HYBRID_SHARD shards it within a node."""

    cfg = apply_overrides(Config(), {"model.name_or_path": "llama3-70b"}, "test")
    hf_config = modeling.model_config(cfg)
    full = estimate(cfg, hf_config, 4).gpu
    whole = estimate(
        apply_overrides(cfg, {"parallel.sharding_strategy": "NO_SHARD"}, "test"), hf_config, 4
    ).gpu
    hybrid = apply_overrides(cfg, {"parallel.sharding_strategy": "HYBRID_SHARD"}, "test")
    assert whole["4-bit base shard"] == pytest.approx(4 * full["4-bit base shard"])
    assert estimate(hybrid, hf_config, 4, nodes=2).gpu["4-bit base shard"] == pytest.approx(
        2 * full["4-bit base shard"]
    )
    assert whole["2 decoder layers, gathered"] == whole["embeddings + head, gathered"] == 0
    assert full["2 decoder layers, gathered"] > 0 and full["embeddings + head, gathered"] > 0


def test_sharding_auto_keeps_the_base_whole_where_that_costs_no_recomputation():
    """parallel.sharding_strategy=auto beside activation_checkpointing=auto (2xh100.yaml, 8xh100.yaml): the least
    recomputation that fits, and at that the base whole on every GPU (NO_SHARD) if it fits, else sharded.
    Sharded wherever keeping it whole cannot help: on a CPU, one GPU, with CPU offload, under DeepSpeed."""

    cfg = apply_overrides(
        Config(),
        {
            "model.name_or_path": "llama3-70b",  # the 80-layer target row of bench/speed.sh
            "parallel.mixed_precision": "bf16",
            "model.fused_kernels": True,
            "data.max_len": 3072,
            "train.micro_batch_size": 1,
            "train.global_batch_size": 2,
            "eval.batch_size": 1,
            "lora.dropout": 0.05,
            "parallel.activation_checkpointing": "auto",
            "parallel.sharding_strategy": "auto",
        },
        "test",
    )
    hf_config = modeling.model_config(cfg)
    choices = [tuple(c.values()) for c in auto.auto_choices(cfg.parallel, 2)]
    assert choices[:3] == [(False, 1, "NO_SHARD"), (False, 1, "FULL_SHARD"), ("offload", 4, "NO_SHARD")]
    assert choices[-1] == (True, 1, "FULL_SHARD") and len(choices) == 2 * len(auto.CHECKPOINT_CHOICES)

    def chosen(gpu_mem, gpus=2, nodes=1, host_mem=None, **overrides):
        changed = apply_overrides(cfg, overrides, "test") if overrides else cfg
        hf = modeling.model_config(changed)
        resolved, _ = auto.resolve_auto(changed, hf, gpus, gpu_mem, nodes, host_mem)
        p = resolved.parallel
        return p.activation_checkpointing, p.checkpoint_every, p.sharding_strategy

    h200, h100 = GPU_MEMORY["h200"], GPU_MEMORY["h100"]
    assert chosen(h200) == (False, 1, "NO_SHARD")  # 35 GiB of base beside one row's activations: whole
    # 100 GiB: the base whole fits with every 4th layer's activations offloaded (their copies hidden behind 3
    # layers' compute), which plans faster than sharding it (all-gathers) with every layer's kept
    assert chosen(100 * 2**30) == ("offload", 4, "NO_SHARD")
    # 80 GiB: every 3rd layer offloaded rather than recomputed (no recomputation, copies hidden); where the
    # host cannot hold them (60 GiB of pinned memory for the 2 processes), every 5th offloaded and one in 5
    # recomputed (23 GiB), rather than every 3rd recomputed
    assert chosen(h100) == ("offload", 3, "FULL_SHARD")
    assert chosen(h100, host_mem=64 * 2**30) == ("orkkk", 1, "FULL_SHARD")
    assert chosen(h100, host_mem=128 * 2**30) == ("offload", 3, "FULL_SHARD")
    small = {"model.name_or_path": "llama3-8b"}
    assert chosen(GPU_MEMORY["a10g"], **small) == (False, 1, "NO_SHARD")  # 8B's base: 5.5 GiB
    assert chosen(1 * 2**30) == (True, 1, "FULL_SHARD")  # nothing fits: the least memory
    # several machines: sharded within each machine, at any recomputation, before across machines
    machines = [tuple(c.values()) for c in auto.auto_choices(cfg.parallel, 16, nodes=2)]
    assert machines[:3] == [(False, 1, "NO_SHARD"), (False, 1, "HYBRID_SHARD"), ("offload", 4, "NO_SHARD")]
    n = len(auto.CHECKPOINT_CHOICES)
    assert [c[2] for c in machines[2 * n :]] == ["FULL_SHARD"] * n and len(machines) == 3 * n
    # 2 x 8 H100s: the base sharded over each machine's 8 (4.5 GiB per GPU) and every 4th layer recomputed,
    # rather than all-gathers across machines
    assert chosen(h100, gpus=16, nodes=2) == (True, 4, "HYBRID_SHARD")
    assert chosen(h200, gpus=16, nodes=2) == (False, 1, "NO_SHARD")
    assert chosen(1 * 2**30, gpus=16, nodes=2) == (True, 1, "FULL_SHARD")
    assert chosen(None) == (False, 1, "FULL_SHARD")  # a CPU run: the processes share the host's memory
    assert chosen(h200, gpus=1) == (False, 1, "FULL_SHARD")
    # the whole 70B on one H100: recomputing every layer fits (1,214 tokens/s planned, 1,244 measured) but a
    # mix is faster: of every 5 layers 2 offloaded (what the link hides), 2 kept (what memory holds), 1
    # recomputed (1,616 planned)
    assert chosen(h100, gpus=1) == ("orokk", 1, "FULL_SHARD")
    assert chosen(h200, **{"parallel.cpu_offload": True})[2] == "FULL_SHARD"
    assert chosen(h200, **{"parallel.backend": "deepspeed", "model.fused_kernels": False})[2] == "FULL_SHARD"
    # only what is 'auto' is decided
    assert chosen(h100, **{"parallel.activation_checkpointing": False}) == (False, 1, "FULL_SHARD")
    assert chosen(h200, **{"parallel.sharding_strategy": "FULL_SHARD"}) == (False, 1, "FULL_SHARD")
    fixed = apply_overrides(
        cfg, {"parallel.activation_checkpointing": False, "parallel.sharding_strategy": "NO_SHARD"}, "t"
    )
    assert auto.resolve_auto(fixed, hf_config, 2, h200)[0] is fixed
    with pytest.raises(ValueError, match=r"sharding_strategy='auto' is unresolved"):
        FsdpBackend(cfg.parallel, cfg.param_dtype, DistInfo(0, 2, 0, 2, torch.device("cpu")))


@pytest.mark.slow
def test_plan_fit_offers_the_base_whole(tmp_path):
    """`shardtune plan --fit` weighs keeping the base whole on every GPU (no all-gathers) beside sharding and
    offloading it, and `shardtune plan` says what 'auto' chose."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "shardtune.cli",
            "plan",
            "recipes/llama3_8b.py",
            "--gpus",
            "2",
            "--gpu-mem",
            "80GiB",
            "--fit",
            "parallel.sharding_strategy=auto",
            "parallel.cpu_offload=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "auto: sharding NO_SHARD (the whole 4-bit base on every GPU)" in out.stdout
    assert out.stdout.strip().endswith("parallel.sharding_strategy=NO_SHARD"), out.stdout[-400:]


def test_a_token_budget_is_planned_as_that_many_tokens():
    """train.micro_batch_tokens: the plan holds one packed sequence of the budget's tokens (not the whole rows of
    data.max_len it would round down to), and for packed rows fit searches token budgets, not row counts."""

    cfg = apply_overrides(Config(), {"data.max_len": "384", "data.packing": "true"}, "test")
    hf_config = modeling.model_config(cfg)

    def activations(**kw):
        return estimate(apply_overrides(cfg, kw, "test"), hf_config, 2).gpu["activations"]

    rows = activations(**{"train.micro_batch_size": "2"})  # 768 tokens
    budget = activations(**{"train.micro_batch_tokens": "1000"})  # not 2 rows of 384
    assert budget == pytest.approx(rows * 1000 / 768, rel=0.05)
    fits = auto.fit(cfg, hf_config, 2, 80 * 2**30, 1, "h200")  # 32 rows per step: 16 per GPU
    budgets = {e.settings["train.micro_batch_tokens"] for e in fits}
    assert budgets == {m * 384 for m in (1, 2, 4, 8, 16)}
    assert (
        fits[0].settings["train.micro_batch_tokens"] == 16 * 384
    )  # nothing is tight: the fullest is fastest
    assert "train.micro_batch_size" not in override_line(fits[0])
    padded = auto.fit(
        apply_overrides(cfg, {"data.packing": "false"}, "t"), hf_config, 2, 80 * 2**30, 1, "h200"
    )
    assert {e.settings["train.micro_batch_size"] for e in padded} == {1, 2, 4, 8, 16}


def test_fit_suggests_only_micro_batches_the_sampler_accepts(capsys):
    """Every process gets the same rows per step (data/loader.py): on 3 GPUs a global batch of 32 cannot run with
    any micro-batch, and for 36 only the divisors of 12 rows per GPU are offered."""
    from shardtune.cli.main import main as cli
    from shardtune.data.loader import GlobalBatchSampler
    from shardtune.errors import ConfigError

    cfg = Config()
    hf_config = modeling.model_config(cfg)
    with pytest.raises(ConfigError, match=r"global_batch_size=32 is not a multiple of the 3 GPUs.*=30 or 33"):
        auto.fit(cfg, hf_config, 3, 80 * 2**30, 1, "h200")
    assert cli(["plan", "recipes/tiny.py", "--gpus", "3", "--gpu-mem", "80GiB", "--fit"]) == 2
    assert "train.global_batch_size=30 or 33" in capsys.readouterr().err
    cfg36 = apply_overrides(cfg, {"train.global_batch_size": "36"}, "test")
    fits = auto.fit(cfg36, hf_config, 3, 80 * 2**30, 1, "h200")
    sizes = {e.settings["train.micro_batch_size"] for e in fits}
    assert sizes == {1, 2, 4}
    for micro in sizes:  # what the run itself does with it
        GlobalBatchSampler(360, 36, micro, 3, 0, 0)
    # without --fit, the recipe's own micro-batch must divide too
    assert cli(["plan", "recipes/tiny.py", "--gpus", "4"]) == 2
    assert "train.micro_batch_size=16 x 4 GPUs" in capsys.readouterr().err


def test_plan_doctor_and_bench_usage_name_their_own_options(capsys):
    from shardtune.cli.main import main as cli

    for command in ("plan", "doctor", "bench"):
        with pytest.raises(SystemExit):
            cli([command, "--help"])
        assert "[key=value ...]" in capsys.readouterr().out, command
    for bad in (["--gpus", "0"], ["--gpu-memory"]):
        with pytest.raises(SystemExit) as e:
            cli(["plan", "recipes/tiny.py", *bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "usage: shardtune plan" in err and "--print-config" not in err, err
    assert "--gpus: 0 is not a count" in cli_error(["plan", "recipes/tiny.py", "--gpus", "0"], capsys)
    assert "--gpu-memory (did you mean --gpu-mem?)" in cli_error(
        ["plan", "recipes/tiny.py", "--gpu-memory"], capsys
    )
    # overrides may come before or after the options
    assert cli(["plan", "recipes/tiny.py", "lora.r=8", "--gpus", "2", "data.max_len=64"]) == 0
    assert "seq 64, global batch 32, LoRA r=8" in capsys.readouterr().out


def cli_error(argv: list[str], capsys) -> str:
    from shardtune.cli.main import main as cli

    with pytest.raises(SystemExit):
        cli(argv)
    return capsys.readouterr().err


@pytest.mark.skipif(
    importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed here"
)
def test_a_login_node_plans_the_kernels_the_gpu_run_will_use(capsys):
    """`shardtune plan --gpu h100` on a machine without liger-kernel (a login node) plans model.fused_kernels=auto
    as the GPU run uses it, the fused loss holding no logits (8B, one 3072-token row: 0.14 GiB, not 4.40), and says
    what it assumed; model.fused_kernels=false plans the logits."""
    from shardtune.cli.main import main as shardtune

    rows = {"model.name_or_path": "llama3-8b", "data.max_len": "3072", "train.micro_batch_size": "1"}
    cfg = apply_overrides(Config(), rows, "test")
    hf_config = modeling.model_config(cfg)
    fused = estimate(cfg, hf_config, 1).gpu["logits + loss"]
    plain = estimate(apply_overrides(cfg, {"model.fused_kernels": "false"}, "t"), hf_config, 1).gpu[
        "logits + loss"
    ]
    assert (round(fused / 2**30, 2), round(plain / 2**30, 2)) == (0.14, 4.4)
    # (the recipe's hub id is planned with the built-in shape of the same architecture)
    assert shardtune(["plan", "recipes/llama3_8b.py", "train.micro_batch_size=1", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "planned with Liger's fused loss" in out and "pip install 'shardtune[gpu]'" in out
    assert shardtune(["plan", "recipes/llama3_8b.py", "model.fused_kernels=false", "--gpu", "h100"]) == 0
    assert "Liger" not in capsys.readouterr().out


def test_pairs_double_the_tokens_and_dpo_adds_the_references_forward():
    """A preference pair runs both responses in one micro-batch: twice the activations and logits of a row of
    SFT (the logits held more leanly); the step's time counts both sequences and, for DPO, the reference's forward (2N per token more on the
    4N of forward and backward); Liger's fused loss, which holds no logits, is SFT's only."""
    from shardtune.cli.args import load_recipe
    from shardtune.kernels.token_logps import CHUNK_BYTES

    hf_config = modeling.model_config(apply_overrides(Config(), {"model.name_or_path": "llama3-8b"}, "x"))
    base = {
        "model.name_or_path": "llama3-8b",
        "parallel.mixed_precision": "bf16",
        "train.micro_batch_size": "2",
        "model.fused_kernels": "false",  # like for like: Liger's fused loss is SFT's only (below)
    }
    sft, dpo, orpo = (
        estimate(apply_overrides(Config(), {**base, "objective.name": name}, "x"), hf_config, 1)
        for name in ("sft", "dpo", "orpo")
    )
    assert dpo.gpu["activations"] == pytest.approx(2 * sft.gpu["activations"], rel=0.05)
    # twice the logits, held in bf16 with their bf16 gradient (kernels/token_logps.py: 4 bytes per logit and a few
    # fp32 chunks) where SFT's cross-entropy holds ~12 bytes per logit
    assert dpo.gpu["logits + loss"] == orpo.gpu["logits + loss"] < 0.7 * 2 * sft.gpu["logits + loss"]
    assert dpo.gpu["logits + loss"] == 4 * 2 * sft.gpu["logits + loss"] / 12 + 3 * CHUNK_BYTES
    # evaluating: no gradient, the eval rows' logits in bf16 beside the weights (SFT: ~10 bytes per logit)
    static = sum(v for k, v in dpo.gpu.items() if k not in ("activations", "logits + loss"))
    eval_rows = min(Config().eval.batch_size, Config().eval.max_rows or Config().eval.batch_size)
    logits = eval_rows * 2 * Config().data.max_len * hf_config.vocab_size
    assert dpo.eval_bytes == pytest.approx(static + 2 * logits + 3 * CHUNK_BYTES)
    assert sft.eval_bytes - static == pytest.approx(10 * logits / 2)
    fused = {**base, "model.fused_kernels": "auto"}  # (on a GPU: the fused loss where it can run, SFT only)
    fused_sft, fused_dpo = (
        estimate(apply_overrides(Config(), {**fused, "objective.name": name}, "x"), hf_config, 1)
        for name in ("sft", "dpo")
    )
    assert fused_sft.gpu["logits + loss"] < sft.gpu["logits + loss"] / 20
    assert fused_dpo.gpu["logits + loss"] == dpo.gpu["logits + loss"]
    assert 1.4 < orpo.step_s / sft.step_s < 2  # twice the tokens, in micro-batches that run at a higher MFU
    assert 1.4 < dpo.step_s / orpo.step_s < 1.6
    assert dpo.tokens_per_s_per_gpu == pytest.approx(2 * 1024 * 16 / dpo.step_s)
    recipe = load_recipe("recipes/tiny_dpo.py").config()
    assert recipe.objective.sequences == 2 and recipe.objective.reference_forward


def test_dpo_from_an_adapter_plans_the_starting_adapters_copy():
    """DPO against the adapter it starts from keeps two more fp32 copies of the adapters (the start's, and the
    current values while the reference runs): whole under FSDP, partitioned under ZeRO-3; none against the base."""
    hf_config = modeling.model_config(Config())
    dpo = {"objective.name": "dpo", "model.adapter": "runs/tiny/adapter"}
    lora = lora_parameters(Shape.of(hf_config), Config().lora.r, Config().lora.target_modules)
    fsdp = estimate(apply_overrides(Config(), dpo, "x"), hf_config, 4).gpu
    zero3 = estimate(
        apply_overrides(Config(), {**dpo, "parallel.backend": "deepspeed"}, "x"), hf_config, 4
    ).gpu
    base = estimate(apply_overrides(Config(), {**dpo, "objective.reference": "base"}, "x"), hf_config, 4).gpu
    assert fsdp["DPO reference: starting adapters"] == 8 * lora
    assert zero3["DPO reference: starting adapters"] == 8 * lora / 4
    assert "DPO reference: starting adapters" not in base
    assert sum(fsdp.values()) - sum(base.values()) == pytest.approx(8 * lora)


def test_micro_batch_auto_takes_the_fastest_planned_step_that_fits():
    """train.micro_batch_size=auto beside activation_checkpointing=auto, the 8B at 3072 tokens on one GPU of
    B GiB (parallel.gpu_memory_limit_gib): every micro-batch that divides the GPU's rows per step gets the least
    recomputation that fits, and the run takes the fastest planned step among them. The choice fits B; more
    memory never plans a slower step; no other micro-batch that fits plans a faster one; where none fits, the
    least memory. Without a GPU limit (a CPU run): the largest micro-batch. A global batch the GPUs do not
    divide is refused with the fix."""
    cfg = apply_overrides(
        Config(),
        {
            "model.name_or_path": "llama3-8b",
            "parallel.mixed_precision": "bf16",
            "model.fused_kernels": True,
            "data.max_len": 3072,
            "train.global_batch_size": 8,
            "train.micro_batch_size": "auto",
            "eval.batch_size": 1,
            "lora.dropout": 0.05,
            "parallel.activation_checkpointing": "auto",
        },
        "test",
    )
    hf_config = modeling.model_config(cfg)
    picked = {}
    for gib in (12, 16, 24, 48, 80):
        budget = gib * 2**30
        resolved, est = auto.resolve_auto(cfg, hf_config, 1, budget)
        t, p = resolved.train, resolved.parallel
        picked[gib] = (t.micro_batch_size, p.activation_checkpointing, p.checkpoint_every)
        assert est.gpu_peak <= auto.AUTO_MARGIN * budget, (gib, picked[gib])
        assert est.settings["train.micro_batch_size"] == t.micro_batch_size
        for m in (1, 2, 4, 8):
            sized = apply_overrides(cfg, {"train.micro_batch_size": m}, "test")
            _, other = auto.choose_settings(sized, hf_config, 1, budget)
            assert other.gpu_peak > auto.AUTO_MARGIN * budget or other.step_s >= est.step_s, (gib, m)
        picked[gib] += (round(est.step_s, 3),)
    steps = [step for *_, step in picked.values()]
    assert steps == sorted(steps, reverse=True)
    assert picked[80][:2] == (4, False)  # nothing recomputed; 8 rows would need ~98 GiB
    # 24 GiB: one row and nothing recomputed (planned 17.6 GiB) is faster than 4 rows recomputed (12.4 GiB)
    assert picked[24][:2] == (1, False) and picked[16][1] is True
    # nothing fits 8 GiB (the plan: 9.8 GiB at one row, every layer recomputed): the least memory, run anyway
    least, est = auto.resolve_auto(cfg, hf_config, 1, 8 * 2**30)
    assert (least.train.micro_batch_size, least.parallel.checkpoint_every) == (
        1,
        1,
    ) and est.gpu_peak > 8 * 2**30
    assert auto.describe_auto(cfg, auto.resolve_auto(cfg, hf_config, 1, 80 * 2**30)[0]).startswith(
        "micro-batch 4 rows, activation checkpointing none"
    )
    cpu, _ = auto.resolve_auto(cfg, hf_config, 2, None)
    assert (cpu.train.micro_batch_size, cpu.parallel.activation_checkpointing) == (4, False)
    with pytest.raises(ConfigError, match=r"train.global_batch_size=8 is not a multiple of the 3 GPUs"):
        auto.resolve_auto(cfg, hf_config, 3, 80 * 2**30)


@pytest.mark.slow
def test_plan_prints_what_micro_batch_auto_chooses():
    out = subprocess.run(
        [
            *(sys.executable, "-m", "shardtune.cli", "plan", "recipes/llama3_8b.py"),
            *("--gpus", "1", "--gpu-mem", "24GiB", "--gpu", "h100"),
            *("train.micro_batch_size=auto", "parallel.activation_checkpointing=auto"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("auto: "))
    assert line.startswith("auto: micro-batch ") and "activation checkpointing" in line, out.stdout
