"""status.json in the run directory: where the run is (running, interrupted, complete, failed), for launchers
and schedulers that cannot see the processes' exit codes; and the stop an earlier attempt of this same launch
recorded, which a restart by the launcher must not train past."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from shardtune.files import write_atomic
from shardtune.parallel.distributed import DistInfo, all_reduce_max, launcher_restarts

log = logging.getLogger("shardtune")


def write_status(run_dir: Path, status: str, **fields) -> None:
    """status.json: running | interrupted | complete | failed, with the step and what to do next."""
    record = {
        "status": status,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "pid": os.getpid(),
        "launcher": launcher_id(),
        **fields,
    }
    write_atomic(run_dir / "status.json", json.dumps(record, indent=1).encode())


def read_status(run_dir: Path) -> str | None:
    """The status status.json records (running, interrupted, complete, failed), or None where there is none."""
    try:
        return json.loads((run_dir / "status.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def stop_recorded_by_this_launch(run_dir: Path, dist: DistInfo) -> dict | None:
    """The summary of a stop that an earlier attempt of this same launch saved and recorded, when the launcher
    has started the processes again since (`torchrun --max-restarts`); else None. A stopped run exits 0 from
    every process, so no restart should follow it; but one that fails on its way out (a crash in NCCL's
    teardown) makes the launcher start the run again with its STOP file gone, and it would train on past the
    stop (under Slurm into the time limit, unsaved). "This launch": status.json says interrupted and was written
    by a process the same launcher process started (launcher_id: its pid and start time, not a clock: a launch
    started within a second of an earlier one's stop must not take that stop for its own). Every rank takes
    rank 0's answer."""
    if launcher_restarts() == 0:
        return None
    record = _ours_interrupted(run_dir) if dist.is_main else None
    if not all_reduce_max([float(record is not None)], dist.device)[0]:
        return None
    if dist.is_main:
        log.warning(
            "this launch stopped on request after step %s and saved (%s); the launcher started it again after "
            "a process failed on its way out: not training on past the stop",
            record.get("step"),
            record.get("checkpoint"),
        )
    record = record or {}
    return {
        "status": "interrupted",
        "run_dir": str(run_dir),
        "step": record.get("step"),
        "checkpoint": record.get("checkpoint"),
    }


def _ours_interrupted(run_dir: Path) -> dict | None:
    """status.json's record where it says interrupted and this process's launcher wrote it, else None."""
    ours = launcher_id()
    try:
        record = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None
    mine = isinstance(record, dict) and ours is not None and record.get("launcher") == ours
    return record if mine and record.get("status") == "interrupted" else None


def launcher_id() -> str | None:
    """The process that started this one (torchrun's agent, accelerate launch), the same for every attempt of
    one launch: its pid and start time in clock ticks after boot (/proc, Linux; a reused pid has another start
    time); None where that cannot be read."""
    try:
        parent = os.getppid()
        fields = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()
        return f"{parent}:{fields[19]}"  # field 22 of stat, starttime
    except (OSError, IndexError):
        return None
