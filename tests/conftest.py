"""Shared helpers: launching real multi-process runs (torchrun / accelerate launch) on the CPU."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run_env(**extra: str) -> dict[str, str]:
    # a child starts its own process group: nothing of the launcher's (or of an in-process test group) leaks
    dist_vars = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ACCELERATE_", "FSDP_")) and k not in dist_vars
    }
    # PYTHONFAULTHANDLER: a worker dying of a native crash leaves every thread's Python stack in its stderr
    env.update(
        OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", PYTHONFAULTHANDLER="1"
    )
    env.update(extra)
    return env


def launch(
    args: list[str],
    nproc: int = 2,
    launcher: str = "torchrun",
    timeout: int = 900,
    check: bool = True,
    env: dict[str, str] | None = None,
    config: str = "fsdp_configs/cpu_2proc.yaml",
    restarts: int = 0,
) -> subprocess.CompletedProcess:
    """Run a script with 2 (or `nproc`) CPU processes, as a user would (`config`: the accelerate config;
    `restarts`: torchrun's --max-restarts)."""
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(_port())]
        cmd += ["--max-restarts", str(restarts), *args]
    elif launcher == "accelerate":
        cmd = [
            str(BIN / "accelerate"),
            "launch",
            "--config_file",
            str(ROOT / config),
            "--num_processes",
            str(nproc),
            "--main_process_port",
            str(_port()),
            *args,
        ]
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=run_env(**(env or {})), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def launch_machines(
    args: list[str],
    tmp_path: Path,
    machines: int = 2,
    nproc: int = 2,
    timeout: int = 900,
    node_sh: bool = False,
    env: dict[str, str] | None = None,
) -> None:
    """Run a script as `machines` machines of `nproc` CPU processes each: one torchrun agent per machine
    (LOCAL_WORLD_SIZE is `nproc`, WORLD_SIZE machines x nproc); with `node_sh`, the agent that launch/node.sh
    starts (as slurm/train.sh does on every node), else a bare torchrun with a static rendezvous. Each agent's
    output goes to a file in `tmp_path` (a pipe left unread while waiting for another agent could fill and
    stall it); agents still running when one fails or the time is up are stopped. `env` adds variables."""
    port = str(_port())
    agents, logs = [], []
    try:
        for i in range(machines):
            logs.append(open(tmp_path / f"machine{i}.log", "w"))  # noqa: SIM115 (closed below)
            if node_sh:
                cmd = [str(ROOT / "launch" / "node.sh"), *args]
                machine = dict(NNODES=str(machines), NPROC_PER_NODE=str(nproc), NODE_RANK=str(i))
                machine |= dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PATH=f"{BIN}:{os.environ['PATH']}")
            else:
                rdzv = ["--master_addr", "127.0.0.1", "--master_port", port]
                cmd = [str(BIN / "torchrun"), "--nnodes", str(machines), "--node_rank", str(i), *rdzv]
                cmd += ["--nproc_per_node", str(nproc), *args]
                machine = {}
            agents.append(
                subprocess.Popen(
                    cmd,
                    cwd=ROOT,
                    env=run_env(**machine, **(env or {})),
                    stdout=logs[-1],
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + timeout
        while any(agent.poll() is None for agent in agents) and time.monotonic() < deadline:
            if any(agent.returncode for agent in agents):  # one failed: the others would wait for it
                break
            time.sleep(0.5)
    finally:
        for agent in agents:
            if agent.poll() is None:
                # SIGTERM: torchrun stops its workers (in sessions of their own, a SIGKILL would orphan them)
                agent.terminate()
                try:
                    agent.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    agent.kill()
                    agent.wait()
        for log in logs:
            log.close()
    for i, agent in enumerate(agents):
        if agent.returncode:
            text = (tmp_path / f"machine{i}.log").read_text()
            raise AssertionError(f"machine {i} failed ({agent.returncode}):\n{text[-8000:]}")


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *options: str):
    """A real filesystem of `size` (a tmpfs, with mount `options` such as ro) mounted at `path` for the block;
    the test is skipped where mounting needs a root this process lacks."""
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join([f"size={size}", *options])
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {path} ({proc.stderr.strip()}): needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The embedded default, trained exactly as `make demo` does (`accelerate launch --config_file
    fsdp_configs/cpu_2proc.yaml recipes/tiny.py`), shared by the tests that inspect what it leaves."""
    out = tmp_path_factory.mktemp("runs")
    proc = launch(
        ["recipes/tiny.py", f"train.output_dir={out}", "train.run_name=tiny"], launcher="accelerate"
    )
    return out / "tiny", proc


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """test_resume.RUN trained once, uninterrupted, on 2 processes: what the resume tests and the ZeRO-3 test
    compare against."""
    from test_resume import train

    out = tmp_path_factory.mktemp("reference")
    train(out)
    return out / "run"


def free_port() -> int:
    return _port()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on localhost (sqlite backend store, artifacts proxied into a folder), for
    the session: (its URL, its folder). Telemetry off, in the server and in every client this session starts."""
    import importlib.util
    import urllib.request

    if importlib.util.find_spec("mlflow") is None:
        pytest.skip("mlflow is not installed (pip install -e '.[dev]' installs it)")
    quiet = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    os.environ.update(quiet)  # before any client imports mlflow: children (training runs) inherit it
    root = tmp_path_factory.mktemp("mlflow")
    port = _port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db"]
    cmd += ["--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", "1"]
    env = {**os.environ, **quiet, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner processes
    with open(root / "server.log", "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"mlflow server exited:\n{(root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"mlflow server not up in 120 s:\n{(root / 'server.log').read_text()[-3000:]}"
                )
            time.sleep(0.2)
        yield url, root
    finally:
        server.terminate()  # its uvicorn child goes with it
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
