"""Preference tuning for real: the embedded DPO demo on 2 CPU processes under FSDP learns the generated pairs, its
adapter reloads with PEFT and prefers the chosen answers there too; a DPO run stopped by SIGTERM mid-step and
resumed ends with the uninterrupted run's adapter, bit for bit; ORPO under DeepSpeed ZeRO-3 trains as under FSDP;
DPO continues from the SFT demo's adapter against it, frozen, under FSDP and ZeRO-3, and resumes onto one
process with the same losses."""

import json

import pytest
import torch
from test_resume import adapter, evals, losses

from conftest import launch, read_summary

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """The demo as the README runs it: `accelerate launch --config_file fsdp_configs/cpu_2proc.yaml
    recipes/tiny_dpo.py`."""
    out = tmp_path_factory.mktemp("dpo")
    proc = launch(
        ["recipes/tiny_dpo.py", f"train.output_dir={out}", "train.run_name=dpo"], launcher="accelerate"
    )
    return out / "dpo", proc


def test_the_dpo_demo_learns_the_preferences_sharded(dpo_run):
    run, proc = dpo_run
    s = read_summary(run)
    first, final = s["first_eval"], s["final_eval"]
    print(
        f"held-out: DPO loss {first['eval_loss']:.4f} -> {final['eval_loss']:.4f}, reward accuracy "
        f"{first['eval_rewards/accuracies']:.3f} -> {final['eval_rewards/accuracies']:.3f} "
        f"over {final['eval_pairs']} pairs"
    )
    assert s["objective"] == "dpo" and s["world_size"] == 2 and 0.45 < s["rank0_holds"] < 0.55
    assert first["eval_loss"] == pytest.approx(0.6931, abs=1e-3)  # B = 0: the policy is the reference
    assert final["eval_rewards/accuracies"] >= 0.9
    assert final["eval_loss"] < 0.5 * first["eval_loss"]
    log = proc.stdout + proc.stderr
    assert "| reward acc" in log and "over 128 pairs" in log and "held-out pairs: reward accuracy" in log
    for name in ("loss.png", "metrics.jsonl", "generations.jsonl", "adapter", "base"):
        assert (run / name).exists(), name
    sample = json.loads((run / "generations.jsonl").read_text().splitlines()[0])
    assert {"prompt", "generated", "reference", "rejected"} <= sample.keys()
    assert sample["prompt"].endswith("### Response:\n")


def test_its_adapter_reloads_with_peft_and_prefers_the_chosen_answers(dpo_run):
    run, _ = dpo_run
    proc = launch(["tests/workers/reload_preference.py", str(run)], launcher="python")
    reloaded = json.loads(proc.stdout.strip().splitlines()[-1])
    final = read_summary(run)["final_eval"]
    assert reloaded["pairs"] == final["eval_pairs"]
    assert reloaded["reward_accuracy"] >= 0.9
    assert reloaded["dpo_loss"] == pytest.approx(final["eval_loss"], rel=1e-4, abs=1e-6)


# 190 pairs, 16 per step: 11 steps per epoch, so 14 steps cross an epoch boundary; micro-batches of 4 pairs on 2
# processes: 2 accumulation steps each; LoRA dropout on, so every RNG must be restored.
RUN = [
    "recipes/tiny_dpo.py",
    "data.generated.rows=200",
    "data.test_size=10",
    "train.max_steps=14",
    "train.global_batch_size=16",
    "train.micro_batch_size=4",
    "train.save_every=5",
    "train.log_every=1",
    "eval.every=4",
    "eval.samples=0",
    "lora.dropout=0.1",
]


def train(out, *extra, nproc=2, fault=None, check=True):
    return launch(
        [*RUN, f"train.output_dir={out}", "train.run_name=run", *extra],
        nproc=nproc,
        launcher="torchrun" if nproc > 1 else "python",
        env={"SHARDTUNE_FAULT": fault} if fault else None,
        check=check,
    )


def test_a_dpo_run_stopped_by_sigterm_resumes_bit_identically(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(whole)
    first = train(cut, fault="rank=1,step=7,micro=1,action=sigterm", check=False)  # mid-accumulation
    assert first.returncode != 0 and "got SIGTERM" in first.stderr
    assert json.loads((cut / "run" / "status.json").read_text())["status"] == "interrupted"
    second = train(cut)
    assert "resumed from" in second.stderr
    assert losses(cut / "run") == losses(whole / "run") and len(losses(whole / "run")) == 14
    assert evals(cut / "run") == evals(whole / "run")
    a, b = adapter(cut / "run"), adapter(whole / "run")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_orpo_under_zero3_trains_as_under_fsdp(tmp_path):
    args = ["objective.name=orpo", "train.max_steps=6", "eval.every=3"]
    fsdp, zero3 = tmp_path / "fsdp", tmp_path / "zero3"
    for out, config in ((fsdp, "fsdp_configs/cpu_2proc.yaml"), (zero3, "fsdp_configs/zero3_cpu_2proc.yaml")):
        launch(
            [*RUN, *args, f"train.output_dir={out}", "train.run_name=run"],
            launcher="accelerate",
            config=config,
        )
    a, b = losses(fsdp / "run"), losses(zero3 / "run")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert max(abs(a[s] - b[s]) / a[s] for s in a) < 1e-5, (a, b)
    assert read_summary(zero3 / "run")["objective"] == "orpo"
    wa, wb = adapter(fsdp / "run"), adapter(zero3 / "run")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6) for k in wa)


def test_dpo_from_the_sft_demos_adapter_trains_against_it_frozen(tiny_run, tmp_path):
    """model.adapter=<the SFT demo's adapter> on its base: DPO's reference is that adapter as it starts, frozen
    (objective.reference=auto, as TRL's DPOTrainer does for a model with an adapter): before the first step the
    policy is its reference (every reward exactly 0) and the run learns the preferences. Each process swaps its
    share of the starting adapters in for the reference's forward (FSDP: its shard, ZeRO-3: its partitions),
    copied before a checkpoint is restored over them: a run stopped by SIGTERM after step 5 and resumed on one
    process (where the swap is the whole adapter) has the same losses and margins as the uninterrupted one on 2,
    and ZeRO-3 those of FSDP (dropout off: each process draws its own masks)."""
    sft, _ = tiny_run
    args = [
        "recipes/tiny_dpo.py",
        f"model.adapter={sft / 'adapter'}",
        f"model.name_or_path={sft / 'base'}",
        "model.init=pretrained",
        "lora.dropout=0.0",
        "train.max_steps=10",
        "train.log_every=1",
        "eval.every=0",
        "eval.samples=0",
        f"train.output_dir={tmp_path}",
    ]
    proc = launch([*args, "train.run_name=dpo"])
    launch([*args, "train.run_name=zero3"], launcher="accelerate", config="fsdp_configs/zero3_cpu_2proc.yaml")
    sigterm = {"SHARDTUNE_FAULT": "rank=0,step=5,micro=0,action=sigterm"}
    assert launch([*args, "train.run_name=cut"], env=sigterm, check=False).returncode != 0
    resumed = launch([*args, "train.run_name=cut"], nproc=1, launcher="python")
    assert "resumed from" in resumed.stderr
    s = read_summary(tmp_path / "dpo")
    print(f"held-out reward accuracy after 10 steps: {s['final_eval']['eval_rewards/accuracies']:.3f}")
    assert s["reference"] == "adapter" and "the reference is the starting adapter" in proc.stderr
    first = s["first_eval"]
    assert first["eval_rewards/chosen"] == first["eval_rewards/rejected"] == 0.0
    assert first["eval_loss"] == pytest.approx(0.693147, rel=1e-5)
    assert s["final_eval"]["eval_rewards/accuracies"] >= 0.9
    assert f"model.adapter={sft / 'adapter'}" not in proc.stderr  # no refusal: the same base and settings
    two, cut, zero3 = (steps(tmp_path / name) for name in ("dpo", "cut", "zero3"))
    assert sorted(two) == sorted(cut) == sorted(zero3) == list(range(1, 11))
    for key in ("loss", "rewards/margins"):
        assert all(cut[s][key] == pytest.approx(two[s][key], rel=1e-5) for s in two), (key, cut, two)
        assert all(zero3[s][key] == pytest.approx(two[s][key], rel=1e-5) for s in two), (key, zero3, two)
    assert two[10]["rewards/margins"] > 0.1  # the policy has moved away from its reference


def steps(run) -> dict[int, dict]:
    """metrics.jsonl's training records by step."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "loss" in r and "eval_loss" not in r}
