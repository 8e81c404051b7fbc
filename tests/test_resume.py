"""Resume is exact. A run is interrupted (SIGTERM, SIGUSR1, kill -9 during training, kill -9 in the middle of
writing a checkpoint) at several points, including mid-epoch, across epoch boundaries and between the
micro-batches of one gradient-accumulation step, then continued with train.resume=auto: every per-step loss
and the final adapter are bit-identical to an uninterrupted run's. Resuming onto another number of processes
continues the same data order with equal losses (float tolerance). 2 CPU processes, fp32, deterministic."""

import json
import shutil

import pytest
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from conftest import launch, launch_machines
from shardtune.checkpoint.store import verify_checkpoint

pytestmark = pytest.mark.slow

# 190 training rows, 32 per step: 5 steps per epoch, so 12 steps cross two epoch boundaries; micro-batches
# of 8 on 2 processes: 2 accumulation steps each; LoRA dropout on, so every RNG must be restored.
RUN = [
    "recipes/tiny.py",
    "data.generated.rows=200",
    "data.test_size=10",
    "train.max_steps=12",
    "train.global_batch_size=32",
    "train.micro_batch_size=8",
    "train.save_every=4",
    "train.log_every=1",
    "eval.every=3",
    "eval.samples=0",
    "lora.dropout=0.1",
]


def records(run_dir, key: str) -> dict[int, float]:
    """metrics.jsonl's `key` by step; each step's once (a resumed run's file holds no record past its checkpoint
    from the start before it)."""
    pairs = [
        (rec["step"], rec[key]) for rec in map(json.loads, (run_dir / "metrics.jsonl").open()) if key in rec
    ]
    assert len({step for step, _ in pairs}) == len(pairs), pairs
    return dict(pairs)


def losses(run_dir) -> dict[int, float]:
    return records(run_dir, "loss")


def evals(run_dir) -> dict[int, float]:
    return records(run_dir, "eval_loss")


def adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def train(out, *extra, nproc=2, fault=None, check=True, restarts=0):
    launcher = "torchrun" if nproc > 1 else "python"
    return launch(
        [*RUN, f"train.output_dir={out}", "train.run_name=run", *extra],
        nproc=nproc,
        launcher=launcher,
        env={"SHARDTUNE_FAULT": fault} if fault else None,
        check=check,
        restarts=restarts,
    )


@pytest.mark.parametrize(
    "fault",
    [
        "rank=0,step=5,micro=1,action=sigterm",  # mid-accumulation, second epoch
        "rank=1,step=2,micro=0,action=sigusr1",  # first epoch, the other rank signalled
        "rank=1,step=6,micro=1,action=kill",  # kill -9 mid-step: steps 5-6 are redone from step-4
        "rank=0,step=8,point=save,action=kill",  # kill -9 while writing step-8: step-4 is used, steps 5-8 redone
    ],
    ids=["sigterm-mid-accumulation", "sigusr1-rank1", "kill9-training", "kill9-mid-save"],
)
def test_interrupted_run_resumes_bit_identically(reference, tmp_path, fault):
    first = train(tmp_path, fault=fault, check=False)
    assert first.returncode != 0  # signalled workers exit 75 (torchrun reports 1); killed ones die
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    if "sig" in fault:
        assert status["status"] == "interrupted" and "got SIG" in first.stderr
    if "point=save" in fault:
        assert list(
            (tmp_path / "run" / "checkpoints").glob(".tmp-step-00000008")
        )  # the torn save, not a step
        assert not (tmp_path / "run" / "checkpoints" / "step-00000008").exists()
    second = train(tmp_path)
    assert "resumed from" in second.stderr
    assert losses(tmp_path / "run") == losses(reference)  # every step, bit for bit
    # and every eval (0, 3, 6, 9, 12): one due at the step a signal stopped after is left to the next start
    assert evals(tmp_path / "run") == evals(reference) and len(evals(reference)) == 5
    a, b = adapter(tmp_path / "run"), adapter(reference)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_an_8bit_optimizer_resumes_bit_identically(tmp_path):
    """optim.name=adamw_8bit (bitsandbytes: 8-bit moment codes, per-block scales, an int step) stopped by
    SIGTERM mid-accumulation and resumed: every step's loss, every eval and the final adapter are the
    uninterrupted run's, bit for bit. Resuming its checkpoint with another optimizer is refused, changing
    nothing."""
    eight_bit = "optim.name=adamw_8bit"
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(whole, eight_bit)
    first = train(cut, eight_bit, fault="rank=0,step=5,micro=1,action=sigterm", check=False)
    assert first.returncode != 0 and "got SIGTERM" in first.stderr
    saved = FileSystemReader(cut / "run" / "checkpoints" / "step-00000006").read_metadata()
    assert any(k.endswith(".absmax1") for k in saved.state_dict_metadata)  # bitsandbytes' 8-bit state
    other = train(cut, nproc=1, check=False)  # optim.name=adamw, the default
    assert other.returncode == 2, other.stderr[-2000:]
    assert "optim.name: checkpoint 'adamw_8bit' -> now 'adamw'" in other.stderr
    second = train(cut, eight_bit)
    assert "resumed from" in second.stderr and "(step 6, saved by 2 processes)" in second.stderr
    assert losses(cut / "run") == losses(whole / "run") and len(losses(whole / "run")) == 12
    assert evals(cut / "run") == evals(whole / "run")
    a, b = adapter(cut / "run"), adapter(whole / "run")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_samples_at_evals_change_no_step_and_resume_without_repeats(reference, tmp_path):
    """The base model's samples at the start and the tuned model's at every eval (eval.samples=3; greedy, LoRA
    dropout on) leave the training as it is without them (the reference has eval.samples=0): every loss, every eval
    and the adapter bit for bit, also stopped by SIGTERM and resumed. generations.jsonl then holds each point's
    samples once, the base model's generated by the first start only."""
    first = train(tmp_path, "eval.samples=3", fault="rank=0,step=5,micro=1,action=sigterm", check=False)
    assert first.returncode != 0 and "got SIGTERM" in first.stderr
    assert "samples @ step 0 (the base model: adapters off)" in first.stdout
    second = train(tmp_path, "eval.samples=3")
    assert "resumed from" in second.stderr and "the base model: adapters off" not in second.stdout
    assert (
        "samples @ step 6 (adapters on)" in second.stdout
    )  # the eval the stop left pending, with its samples
    run = tmp_path / "run"
    assert losses(run) == losses(reference) and evals(run) == evals(reference)
    a, b = adapter(run), adapter(reference)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    saved = [json.loads(x) for x in (run / "generations.jsonl").read_text().splitlines()]
    points = [(r["step"], r["adapter"]) for r in saved if "reference" in r]
    expected = [(0, "off"), (3, "on"), (6, "on"), (9, "on"), (12, "on")]
    assert sorted(points) == sorted(p for p in expected for _ in range(3))
    noted = [r for r in map(json.loads, (run / "metrics.jsonl").open()) if "samples_exact_match" in r]
    assert [r["step"] for r in noted] == [3, 6, 9]  # the end's score is summary.json's
    summary = json.loads((run / "summary.json").read_text())
    assert summary["base_exact_match"] is not None and summary["exact_match"] is not None


def test_a_crash_is_retried_by_torchrun_and_continues_exactly(reference, tmp_path):
    """`torchrun --max-restarts 1`: a process killed mid-step (kill -9, as by an out-of-memory kill or a lost
    GPU) makes torchrun start the processes again, and the same command finishes the run from step-4, every
    step and eval as the uninterrupted run's. (torch reuses its store across restarts: without a store of the
    restart's own, the new processes read the dead ones' addresses and fail to connect.)"""
    fault = f"rank=1,step=6,micro=1,action=kill,once={tmp_path / 'fired'}"
    proc = train(tmp_path, fault=fault, restarts=1)
    assert (tmp_path / "fired").exists()  # it did crash
    assert "the launcher restarted the processes after a failure (restart 1 of 1)" in proc.stderr
    assert "resumed from" in proc.stderr and "(step 4, saved by 2 processes)" in proc.stderr
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "complete"
    assert losses(tmp_path / "run") == losses(reference) and evals(tmp_path / "run") == evals(reference)
    a, b = adapter(tmp_path / "run"), adapter(reference)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_two_machines_started_by_launch_node_sh_retry_a_crash(reference, tmp_path):
    """launch/node.sh on each of 2 "machines" (1 process each, meeting through c10d on this host): a process
    killed mid-step makes both launchers start their processes again, which meet anew (a store per attempt:
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) and continue from step-4 to the uninterrupted run's losses, evals and
    adapter."""
    fault = f"rank=1,step=6,micro=1,action=kill,once={tmp_path / 'fired'}"
    run_args = [*RUN, f"train.output_dir={tmp_path}", "train.run_name=run"]
    launch_machines(run_args, tmp_path, nproc=1, node_sh=True, env={"SHARDTUNE_FAULT": fault})
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("machine*.log")))
    assert (tmp_path / "fired").exists() and "(step 4, saved by 2 processes)" in logs
    assert losses(tmp_path / "run") == losses(reference) and evals(tmp_path / "run") == evals(reference)
    a, b = adapter(tmp_path / "run"), adapter(reference)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_a_requested_stop_is_not_undone_by_torchrun_restarts(tmp_path):
    """A signal (or the STOP file) under `torchrun --max-restarts 1` stops the run after the agreed step with a
    checkpoint, and every process exits 0: a non-zero code would make torchrun start the run again at once and
    train on past the stop. If a process fails on its way out all the same (killed after the run: a crash in
    NCCL's teardown), the restarted processes find the stop this launch recorded and do not train past it."""
    proc = train(tmp_path, fault="rank=0,step=2,micro=0,action=sigterm", restarts=1)
    assert "launcher restarted" not in proc.stderr and "got SIGTERM" in proc.stderr
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "interrupted"
    assert max(losses(tmp_path / "run")) == 3  # stopped after step 3 (0-based step 2) and not run again
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000003"]

    faults = (
        f"rank=1,step=5,micro=0,action=sigterm;rank=1,step=0,point=exit,action=kill,once={tmp_path / 'fired'}"
    )
    proc = train(tmp_path, fault=faults, restarts=1)
    assert (tmp_path / "fired").exists() and "the launcher restarted the processes" in proc.stderr
    assert "this launch stopped on request after step 6" in proc.stderr
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "interrupted" and status["step"] == 6
    assert max(losses(tmp_path / "run")) == 6


def test_a_second_signal_during_the_save_changes_nothing(reference, tmp_path):
    """SIGTERM, then another SIGTERM while the checkpoint is being written (a slow save on rank 0)."""
    fault = "rank=0,step=3,micro=0,action=sigterm"
    proc = launch(
        ["tests/workers/double_signal.py", *RUN, f"train.output_dir={tmp_path}", "train.run_name=run"],
        env={"SHARDTUNE_FAULT": fault},
        check=False,
    )
    assert proc.returncode != 0 and proc.stderr.count("second SIGTERM delivered") == 1
    train(tmp_path)
    assert losses(tmp_path / "run") == losses(reference)


def test_a_time_limit_signal_after_the_run_is_moot(tmp_path):
    """A SIGUSR1 that reaches a process after its run has finished neither kills it (which a scheduler would
    report as a failed job) nor changes the finished run."""
    proc = launch(
        ["tests/workers/late_signal.py", *RUN, "train.max_steps=1", f"train.output_dir={tmp_path}"],
        nproc=1,
        launcher="python",
        check=False,
    )
    assert proc.returncode == 0 and "survived the late SIGUSR1" in proc.stdout, (proc.returncode, proc.stderr)
    [run] = tmp_path.iterdir()
    assert json.loads((run / "status.json").read_text())["status"] == "complete"


def test_no_shard_trains_and_resumes_as_full_shard(reference, tmp_path):
    """parallel.sharding_strategy=NO_SHARD (the whole 4-bit base on each process: what 'auto' picks on GPUs where
    it fits) trains the same steps as FULL_SHARD and resumes from its own checkpoints, and a run that resumes
    them under 'auto' (FULL_SHARD on a CPU) continues it exactly: a checkpoint does not depend on the strategy."""
    no_shard = "parallel.sharding_strategy=NO_SHARD"
    first = train(tmp_path, no_shard, fault="rank=1,step=5,micro=1,action=sigterm", check=False)
    assert first.returncode != 0 and "FSDP NO_SHARD" in first.stderr
    second = train(tmp_path, no_shard, fault="rank=0,step=10,micro=0,action=sigterm", check=False)
    assert second.returncode != 0 and "resumed from" in second.stderr and "FSDP NO_SHARD" in second.stderr
    third = train(tmp_path, "parallel.sharding_strategy=auto")
    assert "auto: sharding FULL_SHARD (CPU)" in third.stderr and "resumed from" in third.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["sharding_strategy"] == "FULL_SHARD"
    assert losses(tmp_path / "run") == losses(reference)
    a, b = adapter(tmp_path / "run"), adapter(reference)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_micro_batches_in_tokens_resume_exactly(tmp_path):
    """train.micro_batch_tokens: each step's 32 packed rows cut into micro-batches of at most 128 tokens (2-3
    rows of ~45), as many on each process (the same rows per step as row micro-batches: test_data);
    interrupted between two micro-batches and resumed, bit for bit the uninterrupted run."""
    tokens = ["data.packing=true", "data.max_len=64", "train.max_steps=8", "train.micro_batch_tokens=128"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    proc = train(whole, *tokens)
    assert "micro-batches of at most 128 tokens, as many on every process" in proc.stdout + proc.stderr
    first = train(cut, *tokens, fault="rank=1,step=5,micro=1,action=sigterm", check=False)
    assert first.returncode != 0
    train(cut, *tokens)
    assert losses(cut / "run") == losses(whole / "run") and len(losses(whole / "run")) == 8
    a, b = adapter(cut / "run"), adapter(whole / "run")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_resume_onto_one_process_and_back(tmp_path):
    """2 -> 1 and 1 -> 2 processes, same global batch: the same rows each step, the same losses (dropout off,
    because each process draws its own dropout masks)."""
    nodrop = ["lora.dropout=0.0"]
    ref = tmp_path / "ref"
    train(ref, *nodrop)
    down, up = tmp_path / "down", tmp_path / "up"
    train(down, *nodrop, fault="rank=0,step=5,micro=0,action=sigterm", check=False)
    train(down, *nodrop, nproc=1)  # the rest on one process
    train(up, *nodrop, nproc=1, fault="rank=0,step=5,micro=0,action=sigterm", check=False)
    train(up, *nodrop)  # the rest on two
    expected = losses(ref / "run")
    for run in (down, up):
        got = losses(run / "run")
        assert got.keys() == expected.keys()
        for step in expected:
            assert got[step] == pytest.approx(expected[step], rel=1e-5), (run.name, step)


def test_slow_save_does_not_trip_the_collective_timeout(tmp_path):
    """Rank 0 takes 20 s to write its checkpoint; training collectives time out after 6 s. The save waits on
    its own group (train.save_timeout_minutes), so the run completes."""
    proc = train(
        tmp_path,
        "parallel.timeout_minutes=0.1",
        "train.max_steps=5",
        fault="rank=0,step=4,point=save,action=sleep:20",
    )
    assert "saved to" in proc.stderr
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "complete"


def test_timed_saves_and_allowed_changes(reference, tmp_path):
    """save_every_minutes saves on time; a resume may change the learning rate and the step count, and trains
    with the new rate (loading the checkpoint restored the old one)."""
    shutil.copytree(reference, tmp_path / "run")
    proc = train(
        tmp_path,
        "train.max_steps=14",
        "optim.lr=1e-3",
        "train.save_every=0",
        "train.save_every_minutes=0.0001",
    )
    assert "resumed from" in proc.stderr and "optim.lr=0.001 (the checkpoint's: 0.003)" in proc.stderr
    steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert steps == [13, 14]  # one save per step once resumed (keep_last=2)
    lr = records(tmp_path / "run", "lr")
    # still warming up (20 steps): the rate is the base times step / 20, now from the new base
    assert lr[12] == pytest.approx(3e-3 * 11 / 20) and lr[13] == pytest.approx(1e-3 * 12 / 20)
    assert lr[14] == pytest.approx(1e-3 * 13 / 20)


def test_resuming_past_the_last_step_is_refused_and_changes_nothing(reference, tmp_path):
    """train.max_steps below the checkpoint's step: refused before the model is built (it would have saved
    step 12's weights as step 8, over the real step 8), the checkpoints and the finished run's status untouched."""
    shutil.copytree(reference, tmp_path / "run")
    before = {p.name: verify_checkpoint(p) for p in (tmp_path / "run" / "checkpoints").glob("step-*")}
    proc = train(tmp_path, "train.max_steps=8", nproc=1, check=False)
    assert proc.returncode == 2 and "is at step 12, past this run's last step 8" in proc.stderr
    after = {p.name: verify_checkpoint(p) for p in (tmp_path / "run" / "checkpoints").glob("step-*")}
    assert after == before == {"step-00000008": None, "step-00000012": None}
    # a finished run's status.json stays as it was: the refusal is the command's own exit code and error
    # (nor does `shardtune submit` requeue it: a complete run is not restarted)
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "complete"


def test_fp16_loss_scaler_state_is_restored(tmp_path):
    """fp16 trains with a loss scaler; a resume continues its state (the growth tracker counts on from the
    checkpoint instead of starting over)."""
    fp16 = [
        "parallel.mixed_precision=fp16",
        "train.max_steps=6",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "lora.dropout=0.0",
    ]
    train(tmp_path, *fp16, fault="rank=0,step=2,micro=0,action=sigterm", check=False)
    saved = json.loads((tmp_path / "run" / "checkpoints" / "step-00000003" / "train_state.json").read_text())
    assert saved["grad_scaler"]["_growth_tracker"] == 3
    train(tmp_path, *fp16)
    final = json.loads((tmp_path / "run" / "checkpoints" / "step-00000006" / "train_state.json").read_text())
    assert final["grad_scaler"]["_growth_tracker"] == 6 and final["grad_scaler"]["scale"] == 65536.0


def test_resume_refuses_training_data_that_changed(tmp_path):
    """The data file is edited between a stop and the resume: its settings are the same, its rows are not, so
    the saved data position would point into other rows. Refused before the model is built."""
    rows = tmp_path / "rows.jsonl"
    words = ["".join(chr(97 + (i * 7 + j) % 26) for j in range(3 + i % 5)) for i in range(40)]
    rows.write_text(
        "".join(json.dumps({"instruction": f"reverse {w}", "output": w[::-1]}) + "\n" for w in words)
    )
    args = [
        "recipes/tiny.py",
        f"data.source={rows}",
        f"train.output_dir={tmp_path}",
        "train.run_name=run",
        "train.global_batch_size=8",
        "train.micro_batch_size=8",
        "train.save_every=1",
        "eval.every=0",
        "eval.samples=0",
    ]
    launch([*args, "train.max_steps=2"], nproc=1, launcher="python")
    rows.write_text(rows.read_text().replace(f'"{words[7][::-1]}"', '"edited"'))
    proc = launch([*args, "train.max_steps=4"], nproc=1, launcher="python", check=False)
    assert proc.returncode == 2 and "is not what it was trained on" in proc.stderr, proc.stderr[-2000:]
    assert "[shardtune] model:" not in proc.stderr


def test_a_sweep_stops_and_reports_where_a_launcher_looks(tmp_path):
    """A sweep is one run to its launcher (slurm/train.sh touches <run>/STOP and reads <run>/status.json): the
    STOP file stops whichever of its runs is training, the status says interrupted, and the same command
    resumes that run, then trains the rest."""
    sweep = tmp_path / "grid"
    sweep.mkdir()
    (sweep / "STOP").touch()  # asked before the first step: acted on after it
    args = [*RUN, "train.max_steps=2", f"train.output_dir={tmp_path}", "train.run_name=grid"]
    args += ["--sweep", "lora.r=4,8"]
    first = launch(args, nproc=1, launcher="python", check=False)
    status = json.loads((sweep / "status.json").read_text())
    assert first.returncode == 75 and status["status"] == "interrupted" and status["step"] == 1, first.stderr
    assert status["sweep_run"] == "lora.r=4" and not (sweep / "STOP").exists()
    launch(args, nproc=1, launcher="python")
    status = json.loads((sweep / "status.json").read_text())
    assert status["status"] == "complete" and status["runs"] == 2
    assert [len(losses(sweep / "sweep" / p)) for p in ("lora.r=4", "lora.r=8")] == [2, 2]
    again = launch(args, nproc=1, launcher="python")  # a finished sweep's runs are not started again
    assert "resumed from" not in again.stderr and "sweep over lora.r (2 runs)" in again.stdout
    assert [len(evals(sweep / "sweep" / p)) for p in ("lora.r=4", "lora.r=8")] == [2, 2]  # first and final
