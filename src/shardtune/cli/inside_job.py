"""What runs inside a job that `shardtune submit` queued: each Slurm task (TrainJob, started as task_process),
and the batch script's exit trap that requeues the job after a crash (restart_trap, after_task).

Every task is one rank of the process group, from the environment submitit describes. Its Python starts with
SIGUSR1/SIGUSR2 blocked (stopping.BLOCKED_START): one that comes while it imports waits for the handler instead
of killing it. On USR2 (the time limit, or a preemption with preempt_send_user_signal) or USR1 the tasks agree
on a step, save, and task 0 requeues the job (`scontrol requeue`); SIGTERM alone saves and ends the job. A task
ends without Python's finalization once its result is written (task_process says why).

Crashes: submitit has no launcher to start a dead task again (torchrun's --max-restarts, which slurm/train.sh
uses), so the job's batch script does it: an exit trap (`after_task`) requeues the job when srun failed while
the run neither finished nor stopped on request and recorded no error in its input (a task killed, a segfault,
an out-of-memory kill, a collective that failed), at most --max-restarts times; the requeued job continues from
the newest checkpoint.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import traceback
from datetime import datetime
from pathlib import Path
from typing import NoReturn

import submitit

from shardtune.cli.submission import (
    Submission,
    read_json,
    restart_count,
    restarts_file,
    result_pickles,
)
from shardtune.config import Config, apply_overrides
from shardtune.errors import EXIT_REQUEUE
from shardtune.train.stopping import BLOCKED_START, STOP_SIGNALS, StopRequest

# Slurm's warning ahead of a time limit or a preemption (submitit asks for USR2; a user's --signal may say USR1)
SLURM_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
# what a task stops on: those, and SIGTERM (scancel)
TASK_SIGNALS = (*STOP_SIGNALS, signal.SIGUSR2)

# how srun starts each task's Python: with the stop signals blocked (BLOCKED_START says why)
TASK_PYTHON = f"{shlex.quote(sys.executable)} -S -c {shlex.quote(BLOCKED_START)}"
# submitit's `python` for the job: srun runs `<this> -u -m submitit.core._submit FOLDER`, which is this module's
# `task` command (task_process) taking submitit's command line as its arguments
TASK_COMMAND = f"{TASK_PYTHON} -u -m shardtune.cli.inside_job task"
SUBMITIT_TASK = ["-u", "-m", "submitit.core._submit"]
START_MARK = "[shardtune] job started"  # the batch script's first line in task 0's log, at every start


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


def restart_trap(runs_dir: Path, max_restarts: int) -> list[str]:
    """The batch script's lines before srun: when the script ends after srun failed, `after_task` is told
    srun's exit code and when this start of the job began (a status.json older than that is an earlier
    start's word)."""
    python = shlex.quote(sys.executable)
    return [
        "shardtune_started=$(date +%s)",
        f'shardtune_after_task() {{ {python} -m shardtune.cli.inside_job after-task "$1" "$shardtune_started" '
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
        restarts_file(job).write_text(f"{restarts + 1}\n")
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


if __name__ == "__main__":
    # srun's command for each task (TASK_COMMAND): ... -m shardtune.cli.inside_job task -u -m submitit.core._submit DIR
    if sys.argv[1] == "task":
        if sys.argv[2:-1] != SUBMITIT_TASK:
            sys.exit(f"inside_job task: expected {SUBMITIT_TASK} FOLDER after it, got {sys.argv[2:]}")
        task_process(sys.argv[-1])
    # the batch script's exit trap (restart_trap): ... -m shardtune.cli.inside_job after-task RC STARTED RUNS MAX
    _, _, rc, started, runs, most = sys.argv
    after_task(int(rc), float(started), Path(runs), int(most))
