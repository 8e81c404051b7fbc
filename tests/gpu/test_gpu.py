"""GPU checks (skipped without CUDA). Run with `make test-gpu` on a machine with 2+ GPUs; results of the runs
recorded for the README are in bench/results/."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import BIN, ROOT, run_env

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]


@pytest.mark.parametrize(
    "shape, extra",
    [("llama3-8b", []), ("llama3-70b", ["model.shape.num_hidden_layers=20"])],
    ids=["8b", "70b-proxy-20-layers"],
)
def test_sharded_logits_equal_one_gpu(shape, extra):
    proc = subprocess.run(
        [str(BIN / "torchrun"), "--nproc_per_node", "2", "tests/workers/gpu_exact.py", shape, *extra],
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rel_l2"] <= 1e-3 and 0.45 < result["rank0_holds"] < 0.55
    print(result, file=sys.stderr)
