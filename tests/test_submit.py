"""`shardtune submit`'s checks that run before anything reaches Slurm (the jobs themselves are tested
against a real cluster in tests/slurm)."""

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import submitit

from shardtune.cli.inside_job import START_MARK, SUBMITIT_TASK, TASK_COMMAND, TASK_PYTHON, restart_decision
from shardtune.cli.main import main as cli
from shardtune.cli.status import srun_error
from shardtune.cli.submission import Submission
from shardtune.cli.submit import Resources, check_resources, merged_resources, submit, time_minutes
from shardtune.config import Config
from shardtune.errors import ConfigError


@pytest.mark.parametrize(
    "text,minutes",
    [("90", 90), ("1:30", 2), ("04:00:00", 240), ("1-12", 2160), ("1-00:00:01", 1441), ("0:10", 1)],
)
def test_slurm_time_formats(text, minutes):
    assert time_minutes(text) == minutes


def test_bad_time_and_lead_are_refused_before_submitting(tmp_path):
    with pytest.raises(ConfigError, match="--time '4h'"):
        time_minutes("4h")
    with pytest.raises(ConfigError, match="lower --signal-lead or raise --time"):
        submit("recipes/tiny.py", [], None, Resources(time="5", signal_lead_s=300), tmp_path)
    with pytest.raises(ConfigError, match=r"train\.max_stepz"):
        submit("recipes/tiny.py", ["train.max_stepz=3"], None, Resources(), tmp_path)
    assert not (tmp_path / "submitit").exists()


STARTED = 1_800_000_000.0  # when the job's current start began (epoch seconds)


def status(run: str, offset_s: int = 5, **fields) -> dict:
    """A status.json as run.write_status writes it, `offset_s` after the start began."""
    written = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(STARTED + offset_s))
    return {"status": run, "time": written, **fields}


@pytest.mark.parametrize(
    "rc,state,record,restarts,requeued,why",
    [
        # killed without a word (status still "running"), or a collective failed when a peer died
        (143, "RUNNING", status("running"), 0, True, "restart 1 of 1"),
        (1, "RUNNING", status("failed", error="RuntimeError: Connection closed by peer"), 0, True, "1 of 1"),
        (137, "RUNNING", {}, 0, True, "restart 1 of 1"),  # died before its first word
        (137, "RUNNING", status("interrupted", offset_s=-60), 0, True, "restart"),  # an earlier start's word
        (143, "RUNNING", status("running"), 1, False, "no restarts left (1 of --max-restarts 1 used)"),
        (0, "RUNNING", status("complete"), 0, False, "srun succeeded"),
        (75, "RUNNING", status("interrupted"), 0, False, "the run is interrupted"),  # task 0 requeued it
        (143, "CANCELLED", status("running"), 0, False, "the job is CANCELLED"),  # scancel: not undone
        (143, "", status("running"), 0, False, "gone from the queue"),
        (1, "RUNNING", status("failed", error="DataError: row 7", input_error=True), 0, False, "row 7"),
    ],
)
def test_a_job_is_requeued_only_after_a_crash(rc, state, record, restarts, requeued, why):
    """The batch script's exit trap requeues a job whose srun failed while its run neither finished nor
    stopped on request nor found an error in its input, within --max-restarts (1 here)."""
    decided, reason = restart_decision(rc, state, record, STARTED, restarts, 1)
    assert decided is requeued and why in reason


@pytest.mark.parametrize(
    "resources,said",
    [
        (Resources(max_restarts=-1), "--max-restarts -1: give 0 (a crash ends the job) or more"),
        (Resources(nodes=0), "--nodes 0: give 1 or more"),
        (Resources(gpus_per_node=-1), "--gpus-per-node -1: give 0 or more"),
        (Resources(gpus_per_node=0, tasks_per_node=0), "--tasks-per-node 0: give 1 or more"),
        (Resources(max_parallel=0), "--max-parallel 0: give 1 or more"),
        (Resources(signal_lead_s=0), "--signal-lead 0: give 1 or more"),
        # each task takes the GPU of its local rank: 2 tasks would leave 6 GPUs idle, 16 find none
        (
            Resources(gpus_per_node=8, tasks_per_node=2),
            "--tasks-per-node 2 with --gpus-per-node 8: a job runs",
        ),
        (Resources(gpus_per_node=8, tasks_per_node=16), "leave --tasks-per-node out"),
    ],
)
def test_resources_a_job_could_not_use_are_refused_before_submitting(tmp_path, resources, said):
    with pytest.raises(ConfigError) as e:
        submit("recipes/tiny.py", [], None, resources, tmp_path)
    assert said in str(e.value)
    assert not (tmp_path / "submitit").exists()
    for fine in (Resources(), Resources(gpus_per_node=8, tasks_per_node=8), Resources(gpus_per_node=0)):
        check_resources(fine)


def test_resume_takes_the_recorded_resources_with_the_given_ones_in_their_place():
    cpu_job = Resources(gpus_per_node=0, tasks_per_node=2, mem="6G", time="30", extra={"exclusive": True})
    recorded = dataclasses.asdict(cpu_job)
    same = merged_resources(recorded, {"time": "20"})
    assert same == Resources(
        gpus_per_node=0, tasks_per_node=2, mem="6G", time="20", extra={"exclusive": True}
    )
    # GPUs given without a task count: one task per GPU, not the CPU job's 2
    gpus = merged_resources(recorded, {"gpus_per_node": 8, "extra": {"qos": "high"}})
    assert (gpus.gpus_per_node, gpus.tasks, gpus.mem) == (8, 8, "6G")
    assert gpus.extra == {"exclusive": True, "qos": "high"}  # --sbatch options add to the earlier ones
    assert merged_resources(recorded, {"gpus_per_node": 0, "tasks_per_node": 4}).tasks == 4


def test_unknown_job_names_the_known_ones(tmp_path, capsys):
    Submission("41", "recipes/tiny.py", [], str(tmp_path / "submitit/%j"), []).save(tmp_path)
    assert cli(["status", "7", f"--runs-dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "no job 7" in err and "known jobs: 41" in err
    assert json.loads((tmp_path / "submitit/41.json").read_text())["job_id"] == "41"


def test_resume_refuses_what_the_record_already_holds(tmp_path, capsys):
    """`shardtune submit --resume JOB` refuses a recipe or overrides beside it (the record has them), an unknown
    job, and a job whose runs all completed, before anything reaches Slurm."""
    run = tmp_path / "tiny-41"
    Submission(
        "41",
        "recipes/tiny.py",
        [],
        str(tmp_path / "submitit/%j"),
        [{"job_id": "41", "run_dir": str(run), "assignment": {}}],
    ).save(tmp_path)
    assert cli(["submit", "--resume", "41", "recipes/tiny.py", "lora.r=8", f"--runs-dir={tmp_path}"]) == 2
    assert "takes the recipe, overrides and sweep from that job's record" in capsys.readouterr().err
    assert cli(["submit", "--resume", "7", f"--runs-dir={tmp_path}"]) == 2
    assert "no job 7" in capsys.readouterr().err
    # a record written before records held the job's resources: they must be given, not default to 1 GPU
    assert cli(["submit", "--resume", "41", f"--runs-dir={tmp_path}"]) == 2
    assert "give them (--nodes, --gpus-per-node, --time, ...)" in capsys.readouterr().err
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"status": "complete"}))
    assert cli(["submit", "--resume", "41", "--nodes=2", f"--runs-dir={tmp_path}"]) == 2
    assert "every run of job 41 is complete" in capsys.readouterr().err
    assert cli(["submit", f"--runs-dir={tmp_path}"]) == 2
    assert "needs a recipe (or --resume JOB)" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "submitit").iterdir()) == ["41.json"]  # nothing submitted


# A task that is still starting (importing) when Slurm's signal comes, then installs its handler.
STARTING_TASK = """
import signal, sys, time
print("started", flush=True)
time.sleep(3)
from shardtune.train.stopping import StopRequest
with StopRequest((signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)) as stop:
    print(stop.received)
"""


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGUSR1])
def test_a_signal_while_the_task_starts_waits_for_its_handler(signum):
    """Slurm may send the time-limit signal before a task's Python has a handler: started as submitit's srun
    starts it, the task survives and receives it; a plain Python dies of it (the default action)."""
    for argv, survives in ((shlex.split(TASK_PYTHON), True), ([sys.executable], False)):
        proc = subprocess.Popen([*argv, "-u", "-c", STARTING_TASK], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "started\n"
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=60)
        if survives:
            assert proc.returncode == 0 and out.split() == [str(int(signum))], (proc.returncode, out)
        else:
            assert proc.returncode == -signum


# A task whose run has finished, as TrainJob leaves it, with a thread that the run started (gloo starts some)
# still alive while Python shuts down; the signal comes then.
FINISHED_TASK = """
import signal, threading, time
from shardtune.train.stopping import StopRequest
from shardtune.cli.inside_job import SLURM_SIGNALS, TASK_SIGNALS
with StopRequest(TASK_SIGNALS, ignore_after=SLURM_SIGNALS) as stop:
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
print("finished", flush=True)
time.sleep(3)
print(stop.received)
"""


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGUSR1])
def test_a_signal_after_the_run_does_not_fail_the_finished_task(signum):
    """Slurm's time-limit signal can come after the last step (up to a minute early): a task started as srun
    starts it survives it, even with a thread the run started still running, and exits 0 (a death by the
    signal would make srun report the completed job as FAILED)."""
    proc = subprocess.Popen(
        [*shlex.split(TASK_PYTHON), "-u", "-c", FINISHED_TASK], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "finished\n"
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.split() == ["None"], (proc.returncode, out)


# The job a task runs: it registers an exit handler, which Python's finalization would run, then does `end`.
JOB = "import atexit; atexit.register(print, 'finalized', flush=True)\n{end}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "end,code,outcome",
    [("result = 5", 0, "success"), ("raise SystemExit(75)", 75, None), ("int('x')", 1, "error")],
)
def test_a_task_runs_its_job_as_submitit_does_and_ends_without_finalization(tmp_path, end, code, outcome):
    """srun's command for a task (TASK_COMMAND, then submitit's own arguments) runs the pickled job as submitit's
    module does: the result or the error pickled for `shardtune status`, none for TrainJob's requeue exit; and
    the process ends with the job's exit code without Python's finalization (the job's exit handler never
    runs), where gloo's leftover threads could abort a finished task (distributed.exit_process)."""
    paths = submitit.core.utils.JobPaths(tmp_path / "%j", job_id="7", task_id=0)
    paths.folder.mkdir(parents=True)
    submitit.core.utils.DelayedSubmission(exec, JOB.format(end=end)).dump(paths.submitted_pickle)
    env = dict(
        SUBMITIT_EXECUTOR="slurm",
        SLURM_JOB_ID="7",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NODEID="0",
        SLURM_NTASKS="1",
        SLURM_JOB_NUM_NODES="1",
        SLURM_JOB_NODELIST="localhost",
    )
    argv = [*shlex.split(TASK_COMMAND), *SUBMITIT_TASK, str(tmp_path / "%j")]
    proc = subprocess.run(argv, env=os.environ | env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert "finalized" not in proc.stdout
    if outcome is None:
        assert not paths.result_pickle.exists()
        return
    status, result = submitit.core.utils.pickle_load(paths.result_pickle)
    assert status == outcome
    if outcome == "error":
        assert "ValueError: invalid literal for int()" in result and "ValueError" in proc.stderr


@pytest.mark.slow
def test_a_task_command_refuses_what_submitit_did_not_write():
    proc = subprocess.run(
        [sys.executable, "-m", "shardtune.cli.inside_job", "task", "-m", "other", "dir"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "expected ['-u', '-m', 'submitit.core._submit'] FOLDER" in proc.stderr


def test_status_reports_srun_s_error_from_the_job_s_last_start():
    """A requeued job's task-0 log holds every start; the earlier ones end with srun's report of the requeue
    killing them. `shardtune status` quotes the last start's, from its first failed task on."""
    first = [f"{START_MARK} 2026-12-07T17:38:16", "srun: error: localhost: tasks 0-1: Terminated", "step 3"]
    last = [
        f"{START_MARK} 2026-12-07T17:39:02",
        "[shardtune] data: generated task",
        "srun: error: localhost: task 1: Aborted (core dumped)",
        "srun: error: localhost: task 0: Terminated",
        "[shardtune] job 10: srun exited 134; not restarted: the run is complete",
    ]
    assert srun_error("\n".join(first + last)) == " | ".join(last[2:])
    assert srun_error("\n".join(first[1:] + last[1:])) == " | ".join(
        first[1:] + last[1:2]
    )  # no marks: the first
    assert (
        srun_error("\n".join(last[:2])) == "[shardtune] data: generated task"
    )  # no srun error: the last lines
    assert srun_error("") is None


def test_a_submitted_sweep_run_is_named_by_its_run_and_the_path_inside(monkeypatch, tmp_path):
    """A job's run path (<name>-<job id>/sweep/<point> for an array task) gives the run its name (one directory
    name) and the sweep point's path inside it, as `--sweep` does without Slurm: runs/<name>/sweep/<point>."""
    from types import SimpleNamespace

    from shardtune.cli import inside_job, recipe

    env = SimpleNamespace(job_id="7_1", array_job_id="7", global_rank=0)
    monkeypatch.setattr(inside_job.submitit, "JobEnvironment", lambda: env)
    monkeypatch.setattr(
        inside_job.submitit.helpers,
        "TorchDistributedEnvironment",
        lambda: SimpleNamespace(export=lambda **_: None),
    )
    seen = []

    def fake_run(cfg, name, grid, stop, sub=None):
        seen.append((cfg.train.run_name, sub))
        return [{"status": "complete"}]

    monkeypatch.setattr(recipe, "run", fake_run)
    cfg = Config(train={"output_dir": str(tmp_path)})
    assert inside_job.TrainJob(cfg, "tiny-{job_id}/sweep/lora.r=8", "tiny")() == {"status": "complete"}
    assert inside_job.TrainJob(cfg, "tiny-{job_id}", "tiny")() == {"status": "complete"}
    assert seen == [("tiny-7", "sweep/lora.r=8"), ("tiny-7", None)]


def test_submit_refuses_a_run_name_with_a_path_before_submitting(tmp_path):
    with pytest.raises(ConfigError, match=r"train.run_name='\.\./esc' has a path separator"):
        submit("recipes/tiny.py", ["train.run_name=../esc"], None, Resources(), tmp_path)
    assert list(tmp_path.iterdir()) == []
