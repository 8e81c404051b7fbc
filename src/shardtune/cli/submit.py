"""Training on SLURM from Python, through submitit: `shardtune submit | status | logs | cancel`.

    shardtune submit recipes/llama3_70b.py --nodes 2 --gpus-per-node 8 --time 24:00:00 --partition gpu
    shardtune submit recipes/tiny.py --sweep optim.lr=1e-4,2e-4,5e-4      # a job array, one run each
    shardtune status [JOB]      shardtune logs JOB [--task N]      shardtune cancel JOB
    shardtune submit --resume JOB [--time ...]      # a failed or cancelled job's runs, from their checkpoints

The same training as `sbatch slurm/train.sh`, with one Slurm task per GPU instead of a launcher per node:
submitit starts every task, and each joins the process group from the environment submitit describes. The
configuration is resolved and validated on the submitting machine (a typo fails there, before any queue
wait) and travels with the job, so a requeued job trains exactly what was submitted even if the recipe
file changes meanwhile. Input only the job can check (the rows of the data, the model files) fails the job;
`shardtune status` shows the error.

Stopping and requeueing: submitit asks Slurm for SIGUSR2 `--signal-lead` seconds before the time limit (and,
with `SlurmctldParameters=preempt_send_user_signal`, on preemption). Every task records it like SIGTERM and
SIGUSR1; the tasks agree on a step, save a checkpoint, and task 0 requeues the job (`scontrol requeue`); the
next start resumes from that checkpoint (train.resume=auto). SIGTERM alone (`scancel`, `shardtune cancel`)
saves and ends the job without requeueing it. Every start advances at least one step, so a
job whose lead time is too short still finishes, only slower. Each task's Python starts with the signals
blocked (stopping.BLOCKED_START): one that comes while it imports waits for the handler instead of killing it.
srun runs with --kill-on-bad-exit: a task that dies ends the job instead of stalling its peers.
A task ends without Python's finalization once its result is written (task_process says why).

Crashes: submitit has no launcher to start a dead task again (torchrun's --max-restarts, which slurm/train.sh
uses), so the job's batch script does it: an exit trap (`after_task`) requeues the job when srun failed
while the run neither finished nor stopped on request and recorded no error in its input (a task killed, a
segfault, an out-of-memory kill, a collective that failed), at most --max-restarts times (default 1); the
requeued job continues from the newest checkpoint. (A lost node Slurm requeues itself: --requeue.) `shardtune
submit --resume JOB` continues a job that failed past that.

Files: runs/submitit/<job id>.json records each submission (recipe, overrides, resources, run directories);
runs/submitit/<job id>/ holds submitit's pickles and the per-task logs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import submitit

from shardtune.cli.sweep import expand, slug
from shardtune.config import Config, apply_overrides
from shardtune.errors import EXIT_REQUEUE, ConfigError
from shardtune.train.stopping import BLOCKED_START, STOP_SIGNALS, StopRequest

RECORDS = "submitit"  # under the runs directory
# Slurm's warning ahead of a time limit or a preemption (submitit asks for USR2; a user's --signal may say USR1)
SLURM_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
# what a task stops on: those, and SIGTERM (scancel)
TASK_SIGNALS = (*STOP_SIGNALS, signal.SIGUSR2)

# how srun starts each task's Python: with the stop signals blocked (BLOCKED_START says why)
TASK_PYTHON = f"{shlex.quote(sys.executable)} -S -c {shlex.quote(BLOCKED_START)}"
# submitit's `python` for the job: srun runs `<this> -u -m submitit.core._submit FOLDER`, which is this module's
# `task` command (task_process) taking submitit's command line as its arguments
TASK_COMMAND = f"{TASK_PYTHON} -u -m shardtune.cli.submit task"
SUBMITIT_TASK = ["-u", "-m", "submitit.core._submit"]
START_MARK = "[shardtune] job started"  # the batch script's first line in task 0's log, at every start


@dataclass
class Resources:
    """What one job asks Slurm for."""

    nodes: int = 1
    gpus_per_node: int = 1
    tasks_per_node: int | None = None  # one per GPU; set it for CPU-only jobs (gpus_per_node=0)
    cpus_per_task: int | None = None
    mem: str | None = None  # per node, e.g. '200G'
    time: str = "4:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    signal_lead_s: int = 300
    max_parallel: int | None = None  # array tasks running at once
    max_restarts: int = 1  # requeues after a crash, per job (or array task); see after_task
    extra: dict[str, str] = field(default_factory=dict)  # any other sbatch option, e.g. {'exclusive': True}

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)


def check_resources(res: Resources) -> int:
    """Refuse what Slurm would accept but the job could not use, before anything is submitted; the time limit in
    minutes."""
    for flag, value, least in (
        ("--nodes", res.nodes, 1),
        ("--gpus-per-node", res.gpus_per_node, 0),
        ("--tasks-per-node", res.tasks_per_node, 1),
        ("--cpus-per-task", res.cpus_per_task, 1),
        ("--max-parallel", res.max_parallel, 1),
        ("--signal-lead", res.signal_lead_s, 1),
    ):
        if value is not None and value < least:
            raise ConfigError(f"{flag} {value}: give {least} or more")
    if res.max_restarts < 0:
        raise ConfigError(f"--max-restarts {res.max_restarts}: give 0 (a crash ends the job) or more")
    # each task takes the GPU of its local rank: fewer tasks would leave GPUs idle, more would find none
    if res.gpus_per_node and res.tasks_per_node not in (None, res.gpus_per_node):
        raise ConfigError(
            f"--tasks-per-node {res.tasks_per_node} with --gpus-per-node {res.gpus_per_node}: a job runs one "
            "task per GPU; leave --tasks-per-node out (or give --gpus-per-node 0 for a CPU job)"
        )
    minutes = time_minutes(res.time)
    if res.signal_lead_s >= minutes * 60:
        raise ConfigError(
            f"--signal-lead {res.signal_lead_s} s is not shorter than --time {res.time}: "
            "the job would be told to stop before it starts; lower --signal-lead or raise --time"
        )
    return minutes


def time_minutes(text: str) -> int:
    """Slurm's time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes, at least 1."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ConfigError(f"--time {text!r}: use minutes (90) or [D-]HH:MM:SS (e.g. 1-12:00:00)")
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    else:  # MM[:SS]
        seconds = a * 60 + (b or 0)
    return max(1, -(-seconds // 60))


class TrainJob:
    """One training run as a submitit job: every Slurm task runs this, as one rank of the process group.

    The task started with the stop signals blocked (BLOCKED_START), so one that Slurm sent while it was
    starting waits for StopRequest here instead of killing it; submitit's own USR2 handler never runs.

    `run_name` is the run directory's path under train.output_dir, {job_id} filled in when the job starts: the
    run's name, and for a sweep's run the path inside it (<name>/sweep/<point>)."""

    def __init__(self, cfg: Config, run_name: str, name: str):
        self.cfg, self.run_name, self.name = cfg, run_name, name

    def __call__(self) -> dict:
        from shardtune.cli.recipe import run

        env = submitit.JobEnvironment()
        # MASTER_ADDR (the first node), MASTER_PORT (from the job id), RANK, WORLD_SIZE, LOCAL_RANK; every
        # task sees all of its node's GPUs and picks its own by LOCAL_RANK
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a failed rank ends the job, no hang
        job_id = env.array_job_id or env.job_id
        # the run directory's path under train.output_dir: its name, and for a sweep's run the path inside
        # (<name>/sweep/<point>); a run name is one directory name
        run_name, _, sub = self.run_name.format(job_id=job_id).partition("/")
        cfg = apply_overrides(
            self.cfg, {"train.run_name": run_name, "train.resume": "auto"}, "shardtune submit"
        )
        # after the run, a time-limit signal is moot: ignored, it cannot kill a task that has finished (which
        # srun would report as a failed job) nor reach submitit's own handler
        with StopRequest(TASK_SIGNALS, ignore_after=SLURM_SIGNALS) as stop:
            [summary] = run(cfg, self.name, None, stop, sub=sub or None)
        if summary["status"] == "interrupted":
            # USR2/USR1: the time limit or a preemption announced by Slurm. A bare SIGTERM is `scancel`
            # (saved, not requeued) or a preemption without the user signal, which Slurm requeues itself.
            if env.global_rank == 0 and stop.received in SLURM_SIGNALS:
                requeue(env.job_id)  # an array task's own id (<array id>_<task>), not the array's
            # Not a result: submitit writes none for an exit, and the requeued job writes the real one. Only
            # rank 0's code says "checkpointed"; the others leave with 0, since srun ends the whole step at
            # the first non-zero exit (--kill-on-bad-exit), which must not come before rank 0 has requeued.
            sys.exit(EXIT_REQUEUE if env.global_rank == 0 else 0)
        return summary


def task_process(folder: str) -> NoReturn:
    """One task of a submitted job: what submitit's `python -m submitit.core._submit FOLDER` does (load the
    pickled TrainJob, run it, pickle its result), then the end of the process through distributed.exit_process,
    not Python's finalization: gloo's threads outlive the process group, and one of them can abort a task whose
    run has finished while the interpreter finalizes; srun would report the completed job as FAILED."""
    from submitit.core.submission import process_job

    from shardtune.parallel.distributed import exit_process

    try:
        process_job(folder)
    except SystemExit as stop:  # TrainJob's requeue code
        exit_process(stop.code)
    except BaseException:  # pickled as the job's error by process_job; printed as Python would
        traceback.print_exc()
        exit_process(1)
    exit_process(0)


def requeue(job_id: str) -> None:
    out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    # a preempted job is being requeued by Slurm already; scontrol then says so, which is fine
    print(f"[shardtune] scontrol requeue {job_id}: {out.returncode} {out.stderr.strip()}", file=sys.stderr)


@dataclass
class Submission:
    """The record of one `shardtune submit`: enough for status/logs/cancel to find everything later."""

    job_id: str
    recipe: str
    overrides: list[str]
    folder: str
    tasks: list[dict[str, Any]]  # {job_id, run_dir, assignment}
    submitted: str = ""
    resumes: str = ""  # the job whose runs this one continues (`shardtune submit --resume JOB`)
    resources: dict[str, Any] = field(default_factory=dict)  # what the job asked for (Resources' fields)

    @staticmethod
    def path(runs_dir: Path, job_id: str) -> Path:
        return runs_dir / RECORDS / f"{job_id.split('_')[0]}.json"

    def save(self, runs_dir: Path) -> Path:
        path = self.path(runs_dir, self.job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, runs_dir: Path, job_id: str) -> Submission:
        path = cls.path(runs_dir, job_id)
        if not path.is_file():
            known = sorted(p.stem for p in (runs_dir / RECORDS).glob("*.json"))
            raise ConfigError(
                f"no job {job_id} submitted from {runs_dir} (no {path}); "
                + (f"known jobs: {', '.join(known)}" if known else "no jobs recorded there")
                + " (pass --runs-dir if the runs went elsewhere)"
            )
        return cls(**json.loads(path.read_text()))

    def jobs(self) -> list[submitit.SlurmJob]:
        return [submitit.SlurmJob(folder=self.folder, job_id=t["job_id"]) for t in self.tasks]


def submit(
    recipe: str,
    overrides: list[str],
    grid: dict[str, list] | None,
    res: Resources,
    runs_dir: Path,
    job_name: str | None = None,
) -> Submission:
    """Validate every configuration here, then submit one job (or one array task per grid point)."""
    cfg = _resolve(recipe, overrides, runs_dir)
    base = cfg.train.run_name or Path(recipe).stem
    if grid:
        points = [(f"{base}-{{job_id}}/sweep/{slug(a)}", a, c) for a, c in expand(cfg, grid)]
    else:
        points = [(f"{base}-{{job_id}}", {}, cfg)]
    return _submit(recipe, overrides, points, res, runs_dir.resolve(), job_name)


# Slurm states of a job that has not ended (it may still train its run directory)
ACTIVE = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "REQUEUE_HOLD",
    "RESIZING",
}


def resubmit(job_id: str, given: dict[str, Any], runs_dir: Path, job_name: str | None = None) -> Submission:
    """`shardtune submit --resume JOB`: submit again the runs of an earlier submission that did not complete (a
    task crashed, the job was cancelled or failed), each continuing in its own run directory from its newest
    checkpoint, with the recipe, overrides and resources the record holds; `given` (Resources' fields) replaces
    some of those (--sbatch options add to the earlier job's). A sweep's completed runs are left alone."""
    old = Submission.load(runs_dir, job_id)
    if not old.resources and not given:
        raise ConfigError(
            f"job {job_id} was submitted before shardtune recorded a job's resources: give them "
            "(--nodes, --gpus-per-node, --time, ...), or it would resume on the defaults (1 node, 1 GPU)"
        )
    res = merged_resources(old.resources, given)
    cfg = _resolve(old.recipe, old.overrides, runs_dir)
    root = runs_dir.resolve()
    points = []
    for task, job in zip(old.tasks, old.jobs(), strict=True):
        run_dir = Path(task["run_dir"])
        if read_json(run_dir / "status.json").get("status") == "complete":
            continue
        # two jobs training one run directory would overwrite each other's checkpoints
        if job.state in ACTIVE:
            raise ConfigError(
                f"job {task['job_id']} is {job.state}: it is still training {run_dir}; "
                f"cancel it first (shardtune cancel {old.job_id}) or wait for it to end"
            )
        point = (
            apply_overrides(cfg, task["assignment"], f"job {job_id}'s record") if task["assignment"] else cfg
        )
        # the same directory whatever job trains it: no {job_id} in the name (and any brace of it escaped)
        run_name = str(run_dir.relative_to(root)).replace("{", "{{").replace("}", "}}")
        points.append((run_name, task["assignment"], point))
    if not points:
        raise ConfigError(f"every run of job {job_id} is complete; nothing to resume")
    return _submit(old.recipe, old.overrides, points, res, root, job_name, resumes=old.job_id)


def merged_resources(recorded: dict[str, Any], given: dict[str, Any]) -> Resources:
    """An earlier job's resources with those given on the command line in their place: --sbatch options add to
    the earlier ones, and a GPU count given without a task count gets one task per GPU (a CPU job's
    --tasks-per-node 2 must not carry over to --gpus-per-node 8)."""
    resources = {**recorded, **given}
    resources["extra"] = {**recorded.get("extra", {}), **given.get("extra", {})}
    if "gpus_per_node" in given and "tasks_per_node" not in given:
        resources["tasks_per_node"] = None
    return Resources(**resources)


def _resolve(recipe: str, overrides: list[str], runs_dir: Path) -> Config:
    from shardtune.cli.args import load_recipe, resolve_config

    # (paths are checked by the job itself: a login node may not see the compute nodes' storage)
    cfg = resolve_config(load_recipe(recipe).config(), overrides, env={}, check_paths=False)
    return apply_overrides(cfg, {"train.output_dir": str(runs_dir.resolve())}, "shardtune submit")


def _submit(
    recipe: str,
    overrides: list[str],
    points: list[tuple[str, dict, Config]],
    res: Resources,
    runs_dir: Path,
    job_name: str | None,
    resumes: str = "",
) -> Submission:
    """Submit `points` (run name, sweep assignment, configuration) as one job or a job array; its record."""
    name = Path(recipe).stem
    minutes = check_resources(res)
    folder = runs_dir / RECORDS / "%j"
    executor = submitit.SlurmExecutor(folder=folder, python=TASK_COMMAND)
    params = dict(
        job_name=job_name or f"shardtune-{name}",
        nodes=res.nodes,
        ntasks_per_node=res.tasks,
        time=minutes,
        signal_delay_s=res.signal_lead_s,
        # one process per task (submitit's default srun); --requeue lets Slurm requeue it on preemption
        additional_parameters={"requeue": True, **res.extra},
        # a task that dies (an OOM kill while loading, a crash) ends the step at once, instead of leaving its
        # peers waiting in a collective until the process group's timeout (parallel.timeout_minutes)
        srun_args=["--kill-on-bad-exit=1"],
    )
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    for key in ("cpus_per_task", "mem", "partition", "account", "qos", "constraint"):
        if getattr(res, key) is not None:
            params[key] = getattr(res, key)
    if len(points) > 1:
        params["array_parallelism"] = res.max_parallel or len(points)
    # each start of the job marks task 0's log, so that status reports the last start's error (a requeued job's
    # log holds every start, the earlier ones ended by their requeue)
    params["setup"] = [f'echo "{START_MARK} $(date -Is)" >&2']
    if res.max_restarts > 0:
        params["setup"] += restart_trap(runs_dir, res.max_restarts)
    executor.update_parameters(**params)

    trains = [TrainJob(c, run_name, name) for run_name, _, c in points]
    if len(trains) == 1:
        jobs = [executor.submit(trains[0])]
        job_id = jobs[0].job_id
    else:
        jobs = executor.submit_array(trains)
        job_id = jobs[0].job_id.split("_")[0]
    record = Submission(
        job_id=job_id,
        recipe=recipe,
        overrides=overrides,
        folder=str(folder),
        tasks=[
            {
                "job_id": job.job_id,
                "run_dir": str(runs_dir / run_name.format(job_id=job_id)),
                "assignment": {k: plain(v) for k, v in assignment.items()},
            }
            for job, (run_name, assignment, _) in zip(jobs, points, strict=True)
        ],
        submitted=time.strftime("%Y-%m-%d %H:%M:%S"),
        resumes=resumes,
        resources=asdict(res),
    )
    record.save(runs_dir)
    return record


def restart_trap(runs_dir: Path, max_restarts: int) -> list[str]:
    """The batch script's lines before srun: when the script ends after srun failed, `after_task` is told
    srun's exit code and when this start of the job began (a status.json older than that is an earlier
    start's word)."""
    python = shlex.quote(sys.executable)
    return [
        "shardtune_started=$(date +%s)",
        f'shardtune_after_task() {{ {python} -m shardtune.cli.submit after-task "$1" "$shardtune_started" '
        f"{shlex.quote(str(runs_dir))} {max_restarts}; }}",
        "trap 'shardtune_rc=$?; [ $shardtune_rc = 0 ] || shardtune_after_task $shardtune_rc' EXIT",
    ]


def restart_decision(
    rc: int, state: str, status: dict, started: float, restarts: int, max_restarts: int
) -> tuple[bool, str]:
    """Whether a job whose srun exited with `rc` is requeued as a crash: (True, what) or (False, why not).
    `state` is Slurm's state of the job while its batch script ends, `status` the run's status.json,
    `started` when this start of the job began (epoch seconds), `restarts` the requeues after crashes so far."""
    if rc == 0:
        return False, "srun succeeded"
    if state != "RUNNING":  # cancelled, timed out, preempted or requeued already: Slurm's own doing
        return False, f"the job is {state or 'gone from the queue'}"
    written = status.get("time")
    if written and datetime.strptime(written, "%Y-%m-%dT%H:%M:%S%z").timestamp() < started:
        status = {}  # an earlier start's record: this one died before it wrote its own
    run = status.get("status")
    if run in ("complete", "interrupted"):  # stopped on request and saved: task 0 requeued it if it was due
        return False, f"the run is {run}"
    if run == "failed" and status.get("input_error"):
        return False, f"an error in the input fails again on every start: {status.get('error')}"
    if restarts >= max_restarts:
        return False, f"no restarts left ({restarts} of --max-restarts {max_restarts} used)"
    return True, f"restart {restarts + 1} of {max_restarts}"


def after_task(rc: int, started: float, runs_dir: Path, max_restarts: int) -> bool:
    """Run by the batch script as it ends (`restart_trap`): requeue the job if its srun failed as a crash does
    (restart_decision), counting the restarts in runs/submitit/<job>.restarts. Says what it decided on the
    script's stderr, which is task 0's log (`shardtune logs`)."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    # an array task by <array id>_<task>: one of them has the array's id as its SLURM_JOB_ID, which squeue and
    # scontrol read as every task of the array
    task_id = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]
    state = subprocess.run(["squeue", "-h", "-j", task_id, "-o", "%T"], capture_output=True, text=True)
    record = Submission.load(runs_dir, task_id)
    task, job = next(
        (t, j) for t, j in zip(record.tasks, record.jobs(), strict=True) if t["job_id"] == task_id
    )
    restarts = restart_count(job)
    status = read_json(Path(task["run_dir"]) / "status.json")
    requeue_it, why = restart_decision(rc, state.stdout.strip(), status, started, restarts, max_restarts)
    if requeue_it:
        _restarts_file(job).write_text(f"{restarts + 1}\n")
        # the failed start's results (the ranks' exceptions): submitit would read the job as done with them
        for stale in result_pickles(job).values():
            stale.unlink()
        print(
            f"[shardtune] job {task_id}: srun exited {rc} while the run neither finished nor stopped on "
            f"request (a crash); requeued: {why}",
            file=sys.stderr,
        )
        requeue(task_id)
    else:
        print(f"[shardtune] job {task_id}: srun exited {rc}; not restarted: {why}", file=sys.stderr)
    return requeue_it


def _restarts_file(job: submitit.SlurmJob) -> Path:
    """runs/submitit/<job or array task id>.restarts: the requeues after a crash so far (after_task)."""
    return Path(job.paths.folder).parent / f"{job.job_id}.restarts"


def read_json(path: Path) -> dict:
    """A JSON file's content, {} where it is missing or torn (a run that has not written it yet)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def plain(v):
    return list(v) if isinstance(v, tuple) else v


def restart_count(job: submitit.SlurmJob) -> int:
    path = _restarts_file(job)
    return int(path.read_text()) if path.is_file() else 0


def result_pickles(job: submitit.SlurmJob) -> dict[int, Path]:
    """submitit's result pickle of each task (rank) of the job that wrote one."""
    pickles = {}
    for path in job.paths.folder.glob(f"{job.job_id}_*_result.pkl"):
        if m := re.fullmatch(rf"{re.escape(job.job_id)}_(\d+)_result\.pkl", path.name):
            pickles[int(m[1])] = path
    return pickles


if __name__ == "__main__":
    # srun's command for each task (TASK_COMMAND): python -m shardtune.cli.submit task -u -m submitit.core._submit DIR
    if sys.argv[1] == "task":
        if sys.argv[2:-1] != SUBMITIT_TASK:
            sys.exit(
                f"shardtune.cli.submit task: expected {SUBMITIT_TASK} FOLDER after it, got {sys.argv[2:]}"
            )
        task_process(sys.argv[-1])
    # the batch script's exit trap (restart_trap): python -m shardtune.cli.submit after-task RC STARTED RUNS MAX
    _, _, rc, started, runs, most = sys.argv
    after_task(int(rc), float(started), Path(runs), int(most))
