"""bench/dpo_vs_trl.py's CPU-runnable path (--tiny): both systems train the same pairs of random tokens with the
recipe's settings and print one JSON line each. The 8B comparison itself needs a GPU (tests/gpu/test_gpu_dpo.py)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, run_env

pytest.importorskip("trl")
pytestmark = pytest.mark.slow  # two systems trained in subprocesses: about a minute


def test_the_tiny_comparison_runs_both_systems_on_the_same_pairs():
    proc = subprocess.run(
        [sys.executable, "bench/dpo_vs_trl.py", "--tiny", "--steps", "2"],
        cwd=ROOT,
        env={**run_env(), "OMP_NUM_THREADS": "2"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert [line["system"] for line in lines] == ["shardtune", "trl"]
    ours, trl = lines
    assert (
        ours["tokens_per_pair"] == trl["tokens_per_pair"] == 2 * (24 + 12 + 1)
    )  # the same token ids counted
    assert ours["steps"] == trl["steps"] == 2 and ours["pairs_per_step"] == trl["pairs_per_step"] == 4
    assert all(line["tokens_per_s"] > 0 and line["peak_gpu_gib"] is None for line in lines)
    # both start from an adapter that changes nothing (B = 0): the loss of the first step is ln 2
    assert ours["loss_first"] == pytest.approx(0.6931, abs=1e-3) and trl["loss_first"] == pytest.approx(
        0.6931, abs=1e-3
    )
