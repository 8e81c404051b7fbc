"""A training run started as a child of a tool (`shardtune bench`, `shardtune doctor --smoke`): torchrun in
its own session, its output in a log file, stopped with every process it started if it outlives a timeout
(killing torchrun alone would leave its workers holding the GPUs)."""

from __future__ import annotations

import os
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
