"""What submitted jobs did: Slurm's state of each job (or array task), its run's status.json and summary, the
error closest to the cause, the restarts after a crash; their logs; cancelling one."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import submitit

from shardtune.cli.inside_job import START_MARK
from shardtune.cli.submission import RECORDS, Submission, read_json, restart_count, result_pickles


def task_report(task: dict, job: submitit.SlurmJob) -> dict:
    """Slurm's state of one job (or array task) and what its run directory says."""
    run_dir = Path(task["run_dir"])
    row = {"job_id": task["job_id"], "state": job.state, "run_dir": str(run_dir), **task["assignment"]}
    status = read_json(run_dir / "status.json")
    row["run"] = status.get("status", "-")
    row["step"] = status.get("step", "-")
    summary = read_json(run_dir / "summary.json")
    if summary.get("final_eval_loss") is not None:
        row["eval_loss"] = f"{summary['final_eval_loss']:.4f}"
    error = _error(status, job)
    if error:
        row["error"] = error
    if count := restart_count(job):
        row["restarts"] = count
    return row


def _error(status: dict, job: submitit.SlurmJob) -> str | None:
    """Why a job failed, in the words closest to the cause: the run's own record of the error, else the
    exception submitit caught in the lowest task that has one (srun kills the others when one fails, so
    rank 0 may have none), else srun's report from its first failed task on (a crash, an OOM kill)."""
    if status.get("status") == "failed" and status.get("error"):
        return status["error"]
    if job.state in ("PENDING", "RUNNING", "REQUEUED", "COMPLETED", "UNKNOWN", "CONFIGURING", "COMPLETING"):
        return None
    for _, path in sorted(result_pickles(job).items()):
        try:
            outcome, result = submitit.core.utils.pickle_load(path)
        except Exception:  # a half-written pickle: fall back to the log
            continue
        if outcome == "error":
            lines = [ln for ln in str(result).strip().splitlines() if ln.strip()]
            if lines:
                return lines[-1]
    return srun_error(job.stderr() or "") or f"Slurm state {job.state}, no log"


def srun_error(stderr: str) -> str | None:
    """srun's report in task 0's log (where srun and the batch script also write) from the first failed task
    on, in the job's last start (START_MARK): an earlier start's report is its requeue ending it."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    starts = [i for i, ln in enumerate(lines) if ln.startswith(START_MARK)]
    lines = lines[starts[-1] + 1 :] if starts else lines
    first = next((i for i, ln in enumerate(lines) if ln.startswith("srun: error:")), max(0, len(lines) - 3))
    return " | ".join(lines[first : first + 3]) or None


def status_rows(record: Submission) -> list[dict]:
    return [task_report(t, j) for t, j in zip(record.tasks, record.jobs(), strict=True)]


def format_status(record: Submission, rows: list[dict]) -> str:
    swept = list(record.tasks[0]["assignment"]) if record.tasks else []
    head = ["job", "state", "run", "step", *swept, "eval loss", "run directory"]
    keys = ["job_id", "state", "run", "step", *swept, "eval_loss", "run_dir"]
    table = [[str(r.get(k, "-")) for k in keys] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(head)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [
        f"job {record.job_id}: {record.recipe} {' '.join(record.overrides)} (submitted {record.submitted})",
        line.format(*head),
    ]
    for row, cells in zip(rows, table, strict=True):
        out.append(line.format(*cells))
        if row.get("restarts"):
            out.append(f"  restarted after a crash ({row['job_id']}): {row['restarts']} time(s)")
        if row.get("error"):
            out.append(f"  error ({row['job_id']}): {row['error']}")
    return "\n".join(out)


def recent(runs_dir: Path, limit: int = 10) -> list[Submission]:
    paths = sorted((runs_dir / RECORDS).glob("*.json"), key=lambda p: p.stat().st_mtime)[-limit:]
    return [Submission(**json.loads(p.read_text())) for p in reversed(paths)]


def logs(record: Submission, task: int | None, rank: int, lines: int | None) -> str:
    """The end of one job's (or array task's) stderr and stdout, of one rank."""
    tasks = record.tasks if task is None else [record.tasks[task]]
    out = []
    for t in tasks:
        job = submitit.SlurmJob(folder=record.folder, job_id=t["job_id"], tasks=(rank,))
        for stream, text in (("stderr", job.stderr()), ("stdout", job.stdout())):
            body = (text or "").splitlines()
            body = body if lines is None else body[-lines:]
            out.append(f"==> job {t['job_id']} rank {rank} {stream} ({getattr(job.paths, stream)}) <==")
            out.extend(body or ["(empty or not written yet)"])
    return "\n".join(out)


def cancel(record: Submission) -> None:
    # the array's id cancels every task of it
    subprocess.run(["scancel", record.job_id], check=True)
