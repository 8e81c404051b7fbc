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
job whose lead time is too short still finishes, only slower. srun runs with --kill-on-bad-exit: a task that
dies ends the job instead of stalling its peers; the job's exit trap requeues it after such a crash, at most
--max-restarts times (default 1). (A lost node Slurm requeues itself: --requeue.) `shardtune submit --resume
JOB` continues a job that failed past that. What runs inside the job (each task, the exit trap): inside_job.py.

Files: runs/submitit/<job id>.json records each submission (recipe, overrides, resources, run directories;
submission.py); runs/submitit/<job id>/ holds submitit's pickles and the per-task logs.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import submitit

from shardtune.cli.inside_job import START_MARK, TASK_COMMAND, TrainJob, restart_trap
from shardtune.cli.submission import RECORDS, Submission, read_json
from shardtune.cli.sweep import expand, slug
from shardtune.config import Config, apply_overrides
from shardtune.errors import ConfigError


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


def plain(v):
    return list(v) if isinstance(v, tuple) else v
