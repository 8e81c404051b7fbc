"""A training run started as a child of a tool (`shardtune bench`, `shardtune doctor --smoke`): torchrun in
its own session, its output in a log file, stopped with every process it started if it outlives a timeout
or the tool is interrupted (killing torchrun alone would leave its workers holding the GPUs)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path


def torchrun(args: list[str], procs: int, log_path: Path, timeout_s: float) -> int | str:
    """Run `torchrun --standalone --nproc_per_node=procs ARGS...` (this Python), stdout and stderr to
    `log_path`; its exit code, or "timed out after Ns"."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={procs}",
        *args,
    ]
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return f"timed out after {timeout_s:.0f}s"
        except BaseException:  # Ctrl-C or a signal to the tool: its own session would outlive it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise


def failure(log: str) -> str:
    """What a failed run's log says went wrong: shardtune's own "error: ..." (bad config or data), else the
    exception a rank raised, else its last lines (torchrun's summary names no cause)."""
    # torchrun prefixes a worker's traceback with "[rankN]: "
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", ln.strip()) for ln in log.splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith("error: ")]
    raised = [
        ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b.*: ", ln) and "ChildFailedError" not in ln
    ]
    return " | ".join(dict.fromkeys(ours or raised[-1:] or lines[-3:]))[-600:]
