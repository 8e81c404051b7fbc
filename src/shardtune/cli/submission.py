"""The record of a `shardtune submit`: runs/submitit/<job id>.json (recipe, overrides, resources, run
directories) beside submitit's folder of pickles and per-task logs, and what status, logs, cancel and a job's
own exit trap read there (a run's status.json, a job's crash restarts, its tasks' results)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import submitit

from shardtune.errors import ConfigError

RECORDS = "submitit"  # under the runs directory


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


def read_json(path: Path) -> dict:
    """A JSON file's content, {} where it is missing or torn (a run that has not written it yet)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def restarts_file(job: submitit.SlurmJob) -> Path:
    """runs/submitit/<job or array task id>.restarts: the requeues after a crash so far (after_task)."""
    return Path(job.paths.folder).parent / f"{job.job_id}.restarts"


def restart_count(job: submitit.SlurmJob) -> int:
    path = restarts_file(job)
    return int(path.read_text()) if path.is_file() else 0


def result_pickles(job: submitit.SlurmJob) -> dict[int, Path]:
    """submitit's result pickle of each task (rank) of the job that wrote one."""
    pickles = {}
    for path in job.paths.folder.glob(f"{job.job_id}_*_result.pkl"):
        if m := re.fullmatch(rf"{re.escape(job.job_id)}_(\d+)_result\.pkl", path.name):
            pickles[int(m[1])] = path
    return pickles
