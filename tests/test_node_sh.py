"""launch/node.sh passes a stop signal on to the training processes: SIGUSR1 to the script's process (as a
scheduler sends it) stops the run after an agreed step, saved, and the same command resumes it to the end;
under torchrun and accelerate launch alike (torch >= 2.9: the launcher forwards it itself), and through the
fallback for older torch (USR1_VIA=term: the script turns it into SIGTERM to the launcher)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, ROOT, run_env

pytestmark = pytest.mark.slow

STEPS = 40
ARGS = [
    "recipes/tiny.py",
    f"train.max_steps={STEPS}",
    "train.save_every=0",
    "train.log_every=1",
    "eval.every=0",
    "eval.max_rows=16",
    "eval.samples=0",
]


def node_sh(out: Path, log: Path, **env: str) -> subprocess.Popen:
    machine = dict(NPROC_PER_NODE="2", MAX_RESTARTS="0", PATH=f"{BIN}:{os.environ['PATH']}", **env)
    with log.open("a") as f:
        return subprocess.Popen(
            [str(ROOT / "launch" / "node.sh"), *ARGS, f"train.output_dir={out}", "train.run_name=run"],
            cwd=ROOT,
            env=run_env(**machine),
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def wait_for_training(run_dir: Path, proc: subprocess.Popen, log: Path, timeout: float = 400) -> None:
    """Until the run has logged its first steps (the processes are past their start-up)."""
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"node.sh ended ({proc.returncode}) before training:\n{log.read_text()[-6000:]}"
            )
        if metrics.is_file() and metrics.read_text().count('"loss"') >= 2:
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no training step within {timeout}s:\n{log.read_text()[-6000:]}")


@pytest.mark.parametrize(
    "via",
    [
        {},  # torchrun, forwarding SIGUSR1 itself (PET_SIGNALS_TO_HANDLE)
        {"LAUNCHER": "accelerate", "ACCELERATE_CONFIG": "fsdp_configs/cpu_2proc.yaml"},
        {"USR1_VIA": "term"},  # what torch < 2.9 gets: SIGTERM to the launcher in its place
    ],
    ids=["torchrun", "accelerate", "term-fallback"],
)
def test_sigusr1_to_node_sh_stops_saves_and_the_same_command_resumes(tmp_path, via):
    run_dir, log = tmp_path / "run", tmp_path / "node.log"
    proc = node_sh(tmp_path, log, **via)
    try:
        wait_for_training(run_dir, proc, log)
        os.kill(proc.pid, signal.SIGUSR1)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
    text = log.read_text()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted", text[-6000:]
    assert 2 <= status["step"] < STEPS
    assert f"got {'SIGTERM' if via.get('USR1_VIA') == 'term' else 'SIGUSR1'}: stopping" in text
    saved = run_dir / "checkpoints" / f"step-{status['step']:08d}"
    assert saved.is_dir() and Path(status["checkpoint"]) == saved
    if via:  # the resume is the same for every launcher: once is enough
        return
    again = node_sh(tmp_path, log)
    assert again.wait(timeout=600) == 0, log.read_text()[-6000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "complete" and status["step"] == STEPS
    assert f"resumed from {saved}" in log.read_text()
