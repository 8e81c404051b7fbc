"""Fault injection for the tests that prove resume is exact: kill or signal one process at a precise point.

    SHARDTUNE_FAULT="rank=0,step=7,micro=1,action=sigterm"   before micro-batch 1 of (0-based) step 7
    SHARDTUNE_FAULT="rank=1,step=10,point=save,action=kill"   mid-checkpoint: files written, manifest not yet
    SHARDTUNE_FAULT="rank=1,step=0,point=start,action=kill"   before the process group forms (rank from RANK)
    SHARDTUNE_FAULT="rank=1,step=7,action=kill,once=/tmp/f"   only the first time (creates /tmp/f): a crash
                                                              that `torchrun --max-restarts` then retries
    SHARDTUNE_FAULT="rank=1,step=0,point=exit,action=kill"    after the run, before the process exits
    SHARDTUNE_FAULT="rank=1,step=2,action=kill,task=2"        only in a job array's task 2 (SLURM_ARRAY_TASK_ID)
    SHARDTUNE_FAULT="...;..."                                 several

actions: sigterm, sigusr1 (delivered to this process, like a scheduler would), kill (SIGKILL: no handler, no
cleanup), sleep:S (a slow save or a slow rank). Unset in normal runs; reading the variable is all it costs.
"""

from __future__ import annotations

import os
import signal
import time
from functools import cache


@cache
def _specs() -> list[dict[str, str]]:
    text = os.environ.get("SHARDTUNE_FAULT")
    if not text:
        return []
    return [dict(part.split("=", 1) for part in one.split(",")) for one in text.split(";")]


def inject(point: str, rank: int, step: int, micro: int = 0) -> None:
    """Act as each SHARDTUNE_FAULT spec that names this point ('micro', 'save', 'start' or 'exit'), rank, step
    (and micro-batch) says."""
    for spec in _specs():
        if spec.get("point", "micro") != point or int(spec.get("rank", 0)) != rank:
            continue
        if int(spec["step"]) != step or int(spec.get("micro", 0)) != micro:
            continue
        if spec.get("task", os.environ.get("SLURM_ARRAY_TASK_ID")) != os.environ.get("SLURM_ARRAY_TASK_ID"):
            continue
        if "once" in spec:
            try:
                open(spec["once"], "x").close()  # exclusive create: only the first process to get here acts
            except FileExistsError:
                continue
        action = spec["action"]
        if action.startswith("sleep:"):
            time.sleep(float(action.split(":", 1)[1]))
        elif action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            os.kill(os.getpid(), {"sigterm": signal.SIGTERM, "sigusr1": signal.SIGUSR1}[action])
