"""slurm/train.sh against a real SLURM cluster on this machine (slurmctld + slurmd + slurmdbd from Debian,
started by slurm/cluster.sh): a job that completes, a job cut by its time limit, a job preempted by a
higher-priority partition, and the multi-node launch logic (2 srun tasks as 2 nodes); then the same through
`shardtune submit` (submitit): a time limit, a preemption, a sweep, errors, cancel, a task that dies while
starting. The cut jobs must end with the same adapter, bit for bit, as the uninterrupted one. Needs root (the
cluster's daemons)."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ROOT, launch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.slurm,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("apt-get"), reason="starting SLURM daemons needs root"
    ),
]
# The same run everywhere, so that the uninterrupted one is the reference for the cut ones.
# (long enough, ~45 s of training, that a 1-minute limit always cuts it)
RUN = ["recipes/tiny.py", "train.max_steps=70", "train.save_every=10", "eval.samples=0", "eval.every=0"]


@pytest.fixture(scope="module")
def cluster():
    subprocess.run([str(ROOT / "slurm/cluster.sh"), "up"], check=True, capture_output=True, text=True)
    yield
    subprocess.run([str(ROOT / "slurm/cluster.sh"), "down"], check=False, capture_output=True)


def job_env(extra: dict | None) -> dict[str, str]:
    """This environment without Slurm's or a process group's variables, plus `extra` (sbatch passes the
    environment on to the job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD", "MASTER"))}
    return env | (extra or {})


def sbatch(runs: Path, options: list[str], *, nproc: int = 2, args=RUN, env: dict | None = None) -> str:
    """`sbatch slurm/train.sh`; `env` adds variables."""
    env = job_env(env)
    env.update(
        NPROC_PER_NODE=str(nproc),
        RUNS_DIR=str(runs),
        OMP_NUM_THREADS="1",
        VENV=str(Path(sys.executable).parent.parent),
    )
    out = subprocess.run(
        ["sbatch", "--parsable", "--mem=6G", f"--output={runs}/%x-%j.out", *options, "slurm/train.sh", *args],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().split(";")[0]


def wait(job: str, timeout: float = 600) -> None:
    """Until the job has left the queue and accounting (which lags behind it) records how it ended."""
    end = time.time() + timeout
    while time.time() < end:
        queued = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip()
        # the current record of the job (or of each array task), not the earlier starts `states` lists
        now = subprocess.run(["sacct", "-n", "-X", "-j", job, "-o", "State"], capture_output=True, text=True)
        ended = now.stdout.split() and not set(now.stdout.split()) & {
            "PENDING",
            "RUNNING",
            "REQUEUED",
            "COMPLETING",
        }
        if not queued and ended:
            return
        time.sleep(2)
    raise AssertionError(f"job {job} still in the queue after {timeout} s: {states(job)}")


def states(job: str) -> list[str]:
    """The job's state at the end of each of its starts (sacct -D lists every requeued start)."""
    out = subprocess.run(
        ["sacct", "-n", "-D", "-X", "-j", job, "-o", "State"], capture_output=True, text=True
    )
    return out.stdout.split()


def adapter(run: Path) -> dict:
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """Test 1: `sbatch slurm/train.sh` runs to completion and leaves an adapter that PEFT reloads."""
    runs = tmp_path_factory.mktemp("slurm")
    job = sbatch(runs, ["--cpus-per-task=2"])
    wait(job)
    run = runs / f"shardtune-{job}"
    assert states(job) == ["COMPLETED"], (runs / f"shardtune-{job}.out").read_text()[-3000:]
    assert json.loads((run / "status.json").read_text())["status"] == "complete"
    for name in ("config-restart0.yaml", "code-restart0.txt", "train.sh", "restart-0.log"):
        assert (run / "slurm" / name).is_file(), name
    return run


def test_sbatch_leaves_a_loadable_adapter(reference):
    proc = launch(["tests/workers/reload_adapter.py", str(reference)], launcher="python")
    reloaded = json.loads(proc.stdout.strip().splitlines()[-1])["eval_loss"]
    assert reloaded == pytest.approx(
        json.loads((reference / "summary.json").read_text())["final_eval_loss"], rel=1e-6
    )


def test_time_limit_checkpoints_requeues_and_finishes_identically(reference, tmp_path):
    # a 1-minute limit and USR1 30 s before it: the run needs longer, so it is cut at least once
    job = sbatch(tmp_path, ["--cpus-per-task=2", "--time=1", "--signal=B:USR1@30"])
    wait(job)
    run, log = tmp_path / f"shardtune-{job}", (tmp_path / f"shardtune-{job}.out").read_text()
    assert states(job)[-1] == "COMPLETED" and "REQUEUED" in states(job), log[-3000:]
    assert "got SIGUSR1: asking the training processes to stop" in log and "resumed from" in log
    assert not (run / "STOP").exists()  # acted on and removed
    a, b = adapter(run), adapter(reference)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def preempt_after_step(run: Path, step: int, runs: Path) -> str:
    """Once the run has logged `step`, a job on the higher-priority `urgent` partition that needs the whole
    node (4 CPUs advertised): Slurm preempts the run's job (GraceTime 20 s, then requeue). Its job id."""
    metrics = run / "metrics.jsonl"
    for _ in range(300):
        if metrics.is_file() and f'"step": {step}' in metrics.read_text():
            break
        time.sleep(0.5)
    return subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--partition=urgent",
            "--cpus-per-task=4",
            "--mem=1G",
            f"--output={runs}/urgent-%j.out",
            "--wrap",
            "sleep 5",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def test_preemption_checkpoints_requeues_and_finishes_identically(reference, tmp_path):
    job = sbatch(tmp_path, ["--cpus-per-task=4"])  # the whole node (4 CPUs advertised)
    urgent = preempt_after_step(tmp_path / f"shardtune-{job}", 2, tmp_path)
    wait(job)
    wait(urgent)
    log = (tmp_path / f"shardtune-{job}.out").read_text()
    assert "REQUEUED" in states(job) and states(job)[-1] == "COMPLETED", log[-3000:]
    assert states(urgent) == ["COMPLETED"] and "resumed from" in log
    a, b = adapter(tmp_path / f"shardtune-{job}"), adapter(reference)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_two_launchers_rendezvous_as_two_nodes(cluster, tmp_path):
    """2 srun tasks of 1 process each (two "nodes" on one machine) meet through c10d and train as one job."""
    job = sbatch(
        tmp_path,
        ["--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1"],
        nproc=1,
        args=[*RUN[:1], "train.max_steps=6", "eval.samples=0", "eval.every=0"],
    )
    wait(job)
    log = (tmp_path / f"shardtune-{job}.out").read_text()
    assert states(job) == ["COMPLETED"], log[-3000:]
    assert "2 launcher(s) x 1 process(es)" in log
    summary = json.loads((tmp_path / f"shardtune-{job}" / "summary.json").read_text())
    assert summary["world_size"] == 2 and 0.45 < summary["rank0_holds"] < 0.55


def test_a_node_that_fails_while_starting_ends_the_job(cluster, tmp_path):
    """The second "node"'s process is killed before the process group forms (as by an out-of-memory kill while
    loading): its launcher fails and srun ends the first one's at once, instead of rank 0 waiting for rank 1
    until the process group's 30-minute timeout."""
    job = sbatch(
        tmp_path,
        ["--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1"],
        nproc=1,
        args=[*RUN[:1], "train.max_steps=6", "eval.samples=0", "eval.every=0"],
        env={"SHARDTUNE_FAULT": "point=start,rank=1,step=0,action=kill"},
    )
    wait(job, timeout=180)
    log = (tmp_path / f"shardtune-{job}.out").read_text()
    assert states(job) == ["FAILED"] and "not requeued" in log, log[-3000:]


def test_a_crashed_process_is_restarted_within_the_job(reference, tmp_path):
    """A training process killed mid-run (kill -9: an out-of-memory kill, a lost GPU) on the second of two
    "nodes": the launchers start every process again in the same job (MAX_RESTARTS, default 1), rendezvousing
    anew, and the run continues from its newest checkpoint to the same adapter as the uninterrupted job's."""
    job = sbatch(
        tmp_path,
        ["--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1"],
        nproc=1,
        env={"SHARDTUNE_FAULT": f"rank=1,step=25,action=kill,once={tmp_path / 'fired'}"},
    )
    wait(job)
    run, log = tmp_path / f"shardtune-{job}", (tmp_path / f"shardtune-{job}.out").read_text()
    assert states(job) == ["COMPLETED"] and (tmp_path / "fired").exists(), log[-3000:]
    assert "resumed from" in log and "(step 20, saved by 2 processes)" in log
    a, b = adapter(run), adapter(reference)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


# --- shardtune submit (submitit): one Slurm task per process, requeued by the job itself -------------------

CPU_JOB = ["--gpus-per-node=0", "--tasks-per-node=2", "--cpus-per-task=1", "--mem=6G"]


def shardtune(args: list[str], check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI as a user runs it; `env` adds variables."""
    env = job_env(env)
    env.update(OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "shardtune"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def submit(
    runs: Path, args: list[str], options: list[str], env: dict | None = None
) -> tuple[str, list[Path]]:
    """`shardtune submit`; the job id and the run directories it announces."""
    out = shardtune(["submit", *args, *CPU_JOB, *options, f"--runs-dir={runs}"], env=env).stdout
    job = out.split("submitted job ")[1].split(":")[0]
    return job, [Path(line.split(": ", 1)[1]) for line in out.splitlines() if line.startswith(f"  {job}")]


def test_submitit_time_limit_requeues_and_finishes_identically(reference, tmp_path):
    """Test 4: a submitit job cut by its 1-minute limit saves, requeues itself and ends with the adapter of
    the uninterrupted sbatch run, bit for bit."""
    job, [run] = submit(tmp_path, RUN, ["--time=1", "--signal-lead=30"])
    wait(job)
    report = shardtune(["status", job, f"--runs-dir={tmp_path}"]).stdout
    assert "REQUEUED" in states(job) and states(job)[-1] == "COMPLETED", report
    assert re.search(rf"^{job}\s+COMPLETED\s+complete\s+70\s", report, re.M), report
    log = shardtune(["logs", job, f"--runs-dir={tmp_path}", "--lines=0"]).stdout
    assert "got SIGUSR2: stopping after this step" in log and "resumed from" in log, log[-3000:]
    a, b = adapter(run), adapter(reference)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_submitit_preemption_requeues_and_finishes_identically(reference, tmp_path):
    """A submitit job preempted by the `urgent` partition gets its USR2 (preempt_send_user_signal), saves, is
    requeued and ends with the adapter of the uninterrupted sbatch run, bit for bit."""
    job, [run] = submit(tmp_path, RUN, ["--time=10"])
    urgent = preempt_after_step(run, 2, tmp_path)
    wait(job)
    wait(urgent)
    report = shardtune(["status", job, f"--runs-dir={tmp_path}"]).stdout
    assert "REQUEUED" in states(job) and states(job)[-1] == "COMPLETED", report
    assert states(urgent) == ["COMPLETED"]
    log = shardtune(["logs", job, f"--runs-dir={tmp_path}", "--lines=0"]).stdout
    assert "got SIGUSR2: stopping after this step" in log and "resumed from" in log, log[-3000:]
    a, b = adapter(run), adapter(reference)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_submitit_crashed_task_is_restarted_within_the_job(reference, tmp_path):
    """A task killed mid-run (step 25): the job's batch script requeues it (a crash, --max-restarts 1), and
    the same job continues from its checkpoint at step 20 to the uninterrupted run's adapter, bit for bit."""
    fault = f"rank=1,step=25,action=kill,once={tmp_path / 'fired'}"
    job, [run] = submit(tmp_path, RUN, [], env={"SHARDTUNE_FAULT": fault})
    wait(job)
    log = shardtune(["logs", job, f"--runs-dir={tmp_path}", "--lines=0"]).stdout
    assert states(job) == ["REQUEUED", "COMPLETED"] and (tmp_path / "fired").exists(), log[-3000:]
    assert f"job {job}: srun exited" in log and "requeued: restart 1 of 1" in log, log[-3000:]
    assert "(step 20, saved by 2 processes)" in log, log[-3000:]
    assert "restarted after a crash" in shardtune(["status", job, f"--runs-dir={tmp_path}"]).stdout
    a, b = adapter(run), adapter(reference)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_submitit_crashed_job_is_resumed_by_submit_resume(reference, tmp_path):
    """A task killed at step 25 on every start: requeued once, killed again, the job ends FAILED (its
    checkpoint at step 20 kept); `shardtune submit --resume JOB` submits its run again (refused while the job
    is still queued or running: two jobs would train one run directory) with the earlier job's resources but
    for those given, and it continues in the same run directory from step 20 to the same adapter as the
    uninterrupted run's."""
    job, [run] = submit(tmp_path, RUN, [], env={"SHARDTUNE_FAULT": "rank=1,step=25,action=kill"})
    early = shardtune(["submit", "--resume", job, *CPU_JOB, f"--runs-dir={tmp_path}"], check=False)
    assert (
        early.returncode == 2 and f"cancel it first (shardtune cancel {job})" in early.stderr
    )  # still queued
    wait(job)
    log = shardtune(["logs", job, f"--runs-dir={tmp_path}", "--lines=0"]).stdout
    assert states(job) == ["REQUEUED", "FAILED"], log[-3000:]
    assert "not restarted: no restarts left (1 of --max-restarts 1 used)" in log, log[-3000:]
    # the earlier job's resources (2 CPU tasks, no GPU: this cluster has none) but for the one given
    out = shardtune(["submit", "--resume", job, "--time=20", f"--runs-dir={tmp_path}"]).stdout
    again = out.split("submitted job ")[1].split(":")[0]
    assert f"  {again}: {run}" in out and "1 node(s) x 2 task(s), time 20" in out  # the same run directory
    wait(again)
    assert states(again) == ["COMPLETED"], shardtune(["logs", again, f"--runs-dir={tmp_path}"]).stdout[-3000:]
    record = json.loads((tmp_path / "submitit" / f"{again}.json").read_text())
    assert record["resumes"] == job and record["resources"]["gpus_per_node"] == 0
    assert record["resources"]["mem"] == "6G" and record["resources"]["time"] == "20"
    log = shardtune(["logs", again, f"--runs-dir={tmp_path}", "--lines=0"]).stdout
    assert "(step 20, saved by 2 processes)" in log, log[-3000:]
    a, b = adapter(run), adapter(reference)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_submitit_sweep_is_a_job_array_of_runs(cluster, tmp_path):
    """Test 5: --sweep with 3 values is one job array; each task is its own run with its own config. The
    last task (the one whose SLURM_JOB_ID is the array's own id) crashes once: it alone is requeued."""
    lrs = ["1e-3", "2e-3", "4e-3"]
    crash = {"SHARDTUNE_FAULT": f"rank=1,step=2,action=kill,task=2,once={tmp_path / 'fired'}"}
    job, runs = submit(
        tmp_path,
        [
            "recipes/tiny.py",
            "train.max_steps=4",
            "eval.samples=0",
            "eval.every=0",
            "--sweep",
            f"optim.lr={','.join(lrs)}",
        ],
        ["--time=10"],
        env=crash,
    )
    wait(job)
    assert len(runs) == 3 and len({r.parent for r in runs}) == 1  # <name>-<array id>/sweep/<point>
    assert sorted(states(job)) == ["COMPLETED"] * 3 + ["REQUEUED"] and (tmp_path / "fired").exists()
    for run, lr in zip(runs, lrs, strict=True):
        assert json.loads((run / "status.json").read_text())["status"] == "complete", run
        assert f"lr: {float(lr)}" in (run / "config.yaml").read_text()
        assert (run / "adapter" / "adapter_model.safetensors").is_file()
    report = shardtune(["status", job, f"--runs-dir={tmp_path}"]).stdout
    assert len(re.findall(r"COMPLETED\s+complete", report)) == 3 and "optim.lr" in report, report
    assert f"restarted after a crash ({job}_2): 1 time(s)" in report, report
    assert report.count("restarted") == 1, report


def test_submitit_errors_reach_status_and_cancel_works(cluster, tmp_path):
    """Test 6: a typo fails at submit time (nothing queued); an input only the job can check fails the job,
    and `shardtune status` shows the job's own error text; `shardtune cancel` stops a job."""
    typo = shardtune(
        ["submit", "recipes/tiny.py", "train.max_stepz=5", *CPU_JOB, f"--runs-dir={tmp_path}"], check=False
    )
    assert typo.returncode == 2 and "train.max_stepz" in typo.stderr and "max_steps" in typo.stderr
    assert not (tmp_path / "submitit").exists()

    # a data file with a bad row: the configuration is valid (the file exists), the job's data check is not
    rows = [{"instruction": f"say {i}", "input": "", "output": str(i)} for i in range(40)]
    rows[6]["output"] = None
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job, _ = submit(tmp_path, ["recipes/tiny.py", f"data.source={bad}"], ["--time=10"])
    long, _ = submit(tmp_path, ["recipes/tiny.py", "train.max_steps=100000"], ["--time=30"])
    wait(job)
    report = shardtune(["status", job, f"--runs-dir={tmp_path}"]).stdout
    assert "FAILED" in report and "row 7: column 'output' is empty" in report, report
    assert states(job) == ["FAILED"]  # not requeued as a crash: it would fail the same way again
    assert "not restarted: an error in the input" in shardtune(["logs", job, f"--runs-dir={tmp_path}"]).stdout
    shardtune(["cancel", long, f"--runs-dir={tmp_path}"])
    wait(long, timeout=60)
    assert "CANCELLED" in shardtune(["status", long, f"--runs-dir={tmp_path}"]).stdout
    assert "REQUEUED" not in states(long)  # its SIGTERM saved the run; only USR1/USR2 requeue
    listing = shardtune(["status", f"--runs-dir={tmp_path}"]).stdout  # no job id: the newest submissions
    assert f"job {job}:" in listing and f"job {long}:" in listing


def test_submitit_a_task_dead_while_starting_ends_the_job(cluster, tmp_path):
    """Test 7: a task killed before the process group forms (as by an OOM kill while loading) ends the job in
    seconds; its peer does not wait for it in the rendezvous until the process group's 30-minute timeout.
    Killed on every start, the job is requeued once (--max-restarts 1) and then fails."""
    kill = {"SHARDTUNE_FAULT": "point=start,rank=1,step=0,action=kill"}
    job, _ = submit(tmp_path, ["recipes/tiny.py"], ["--time=10"], env=kill)
    wait(job, timeout=240)
    report = shardtune(["status", job, f"--runs-dir={tmp_path}"]).stdout
    assert states(job) == ["REQUEUED", "FAILED"] and "task 1: Killed" in report, report
