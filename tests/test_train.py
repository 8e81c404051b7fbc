"""The embedded default trained for real (2 CPU processes, accelerate launch and torchrun), and what it
leaves behind: a loss that falls, a whole adapter that PEFT reloads with the same eval loss, checkpoints
that resume, and refusals that name what changed."""

import json
import shutil

import pytest
import yaml
from safetensors.torch import load_file

from conftest import launch, read_summary

pytestmark = pytest.mark.slow


def test_the_demo_learns_the_task_sharded(tiny_run):
    run, proc = tiny_run
    s = read_summary(run)
    assert s["world_size"] == 2 and 0.45 < s["rank0_holds"] < 0.55  # not DDP, not one process
    assert s["final_eval_loss"] <= 0.5 * s["first_eval_loss"]
    assert s["exact_match"] >= 0.5  # most held-out rows sorted correctly, greedy, in the right direction
    assert s["base_exact_match"] < 0.1  # the random base (the adapters off) sorts nothing
    log = proc.stderr + proc.stdout
    for needle in (
        "tok/s/proc",
        "MFU",
        "peak host RAM",
        "eval @ step 50",
        "samples @ step 0 (the base model: adapters off)",
        "samples @ step 50 (adapters on): exact match on 64 held-out rows",
        "    base : ",
        "    tuned: ",
        "run directory:",
        "adapter (PEFT)",
    ):
        assert needle in log
    for name in ("loss.png", "metrics.jsonl", "generations.jsonl", "config.yaml", "tokenizer", "base"):
        assert (run / name).exists(), name
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000100", "step-00000200"]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert 200 in steps


def test_adapter_holds_full_tensors(tiny_run):
    run, _ = tiny_run
    hf_config = json.loads((run / "base" / "config.json").read_text())
    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    r, d = cfg["lora"]["r"], hf_config["hidden_size"]
    kv = hf_config["num_key_value_heads"] * d // hf_config["num_attention_heads"]
    shapes = {
        "q_proj": (d, d),
        "k_proj": (kv, d),
        "v_proj": (kv, d),
        "o_proj": (d, d),
        "gate_proj": (hf_config["intermediate_size"], d),
        "up_proj": (hf_config["intermediate_size"], d),
        "down_proj": (d, hf_config["intermediate_size"]),
    }
    assert len(tensors) == 2 * len(shapes) * hf_config["num_hidden_layers"]
    for key, t in tensors.items():
        module = key.split(".")[-3]
        out_f, in_f = shapes[module]
        assert tuple(t.shape) == ((r, in_f) if "lora_A" in key else (out_f, r)), key
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # trained, not the zero init


def test_adapter_reloads_with_the_same_eval_loss(tiny_run):
    run, _ = tiny_run
    proc = launch(["tests/workers/reload_adapter.py", str(run)], launcher="python")
    reloaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert reloaded["eval_loss"] == pytest.approx(read_summary(run)["final_eval_loss"], rel=1e-6, abs=1e-7)


def test_resume_continues_from_the_checkpoint_under_torchrun(tiny_run, tmp_path):
    run, _ = tiny_run
    copy = tmp_path / "tiny"
    shutil.copytree(run, copy)
    before = [
        json.loads(x)["step"] for x in (copy / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
    ]
    proc = launch(
        [
            "recipes/tiny.py",
            f"train.output_dir={tmp_path}",
            "train.run_name=tiny",
            "train.max_steps=210",
            "train.log_every=1",
            "eval.samples=8",
        ]
    )
    assert "resumed from" in proc.stderr and "(step 200, saved by 2 processes)" in proc.stderr
    after = [
        json.loads(x)["step"] for x in (copy / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
    ]
    assert after == before + list(range(201, 211))  # the ten new steps, none redone
    s = read_summary(copy)
    assert s["steps"] == 210 and s["first_eval_loss"] == read_summary(run)["first_eval_loss"]
    assert (copy / "checkpoints" / "step-00000210").is_dir()


def test_resume_refuses_a_changed_config_and_keeps_the_checkpoints(tiny_run, tmp_path):
    run, _ = tiny_run
    shutil.copytree(run, tmp_path / "tiny")
    before = sorted(p.name for p in (tmp_path / "tiny" / "checkpoints").iterdir())
    proc = launch(
        [
            "recipes/tiny.py",
            f"train.output_dir={tmp_path}",
            "train.run_name=tiny",
            "lora.r=8",
            "data.max_len=64",
            "train.max_steps=60",
        ],
        check=False,
    )
    assert proc.returncode != 0  # each worker exits 2; torchrun reports any failed worker as 1
    assert "cannot resume" in proc.stderr and "lora.r: checkpoint 16 -> now 8" in proc.stderr
    assert "data.max_len: checkpoint 512 -> now 64" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "tiny" / "checkpoints").iterdir()) == before
    proc = launch(
        ["recipes/tiny.py", f"train.output_dir={tmp_path}", "train.run_name=tiny", "train.resume=never"],
        launcher="python",
        check=False,
    )
    assert proc.returncode == 2 and "already holds checkpoints" in proc.stderr
    # no checkpoint left (the first start died before its first save): a start with other settings makes its
    # own random base instead of reusing the one drawn for the old shape
    shutil.rmtree(tmp_path / "tiny" / "checkpoints")
    shape = "model.shape.num_hidden_layers=2"
    proc = launch(
        [
            "recipes/tiny.py",
            f"train.output_dir={tmp_path}",
            "train.run_name=tiny",
            shape,
            "train.max_steps=1",
        ],
        launcher="python",
    )
    assert "base/: made by an earlier start with other settings" in proc.stderr
    assert json.loads((tmp_path / "tiny" / "base" / "config.json").read_text())["num_hidden_layers"] == 2


def test_shardtune_export_rebuilds_the_same_adapter(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    from shardtune.cli.main import main

    assert main(["export", str(run), str(tmp_path / "again")]) == 0
    a = load_file(run / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert main(["export", str(tmp_path), str(tmp_path / "x")]) == 2  # no checkpoint there: a clear error
    assert main(["export", str(run), str(tmp_path / "again")]) == 0  # an earlier export is replaced
    # an output that is not an earlier adapter, or that holds what it is made from, is refused untouched
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    capsys.readouterr()
    assert main(["export", str(run), str(mine)]) == 2
    assert (
        "is not an earlier adapter" in capsys.readouterr().err and (mine / "notes.txt").read_text() == "keep"
    )
    for out in (run, run.parent, run / "checkpoints"):
        assert main(["export", str(run), str(out)]) == 2
        assert "which it is made from" in capsys.readouterr().err
    assert (run / "checkpoints").is_dir() and (run / "config.yaml").is_file()


def test_merge_writes_a_model_equal_to_base_plus_adapter(tiny_run, tmp_path):
    run, _ = tiny_run
    from shardtune.cli.main import main

    for dtype, tolerance in (("float32", 1e-4), ("bfloat16", 0.1)):
        out = tmp_path / dtype
        assert main(["merge", str(run), str(out), "--dtype", dtype, "--max-shard-gib", "0.005"]) == 0
        assert len(list(out.glob("model-*-of-*.safetensors"))) > 1  # streamed into bounded shards
        assert "quantization_config" not in (out / "config.json").read_text()
        proc = launch(["tests/workers/check_merged.py", str(run), str(out)], launcher="python")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["merged_dtype"] == f"torch.{dtype}"
        assert result["rel_l2"] < tolerance < result["adapter_effect"]  # close, and the adapter matters
    assert main(["merge", str(run), str(run / "base")]) == 2  # over the base it reads: refused
    assert (run / "base" / "config.json").is_file()


def test_adapters_off_generate_what_the_base_model_generates(tiny_run, tmp_path):
    """The base model's samples are generated with PEFT's disable_adapter() through shardtune's fused LoRA layers,
    under FSDP on 2 processes: with an adapter that changes what the model writes (the SFT demo's, to start from),
    they are what transformers' base model alone generates for the same prompts, and the samples with the
    adapters on are what PeftModel.from_pretrained(base, that adapter) generates."""
    sft, _ = tiny_run
    launch(
        [
            "recipes/tiny.py",
            f"model.adapter={sft / 'adapter'}",
            f"model.name_or_path={sft / 'base'}",
            "model.init=pretrained",
            "train.max_steps=1",
            "eval.every=0",
            "eval.samples=6",
            "eval.batch_size=1",  # no padding: the same text however the prompts are batched
            f"train.output_dir={tmp_path}",
            "train.run_name=run",
        ],
        launcher="accelerate",
    )
    proc = launch(
        ["tests/workers/generate_alone.py", str(tmp_path / "run"), str(sft / "adapter")], launcher="python"
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["run_base"] == result["base"]
    assert result["run_tuned"] == result["tuned"]
    assert sum(a != b for a, b in zip(result["base"], result["tuned"], strict=True)) >= 3
