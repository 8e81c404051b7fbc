"""A run whose disk fills up (a real one: a small tmpfs as train.output_dir) while it saves, on 2 processes:
one line that names the directory, the space needed and free and the fix; the torn save removed before
anything else is written; status.json `failed` with the reason; the earlier checkpoints intact."""

from __future__ import annotations

import json

import pytest

from conftest import launch, tmpfs
from shardtune.checkpoint.store import verify_checkpoint

pytestmark = pytest.mark.slow

# the random base (~12 MiB) and the tokenizer are written into the run directory; a checkpoint is ~4 MiB
RUN = [
    "recipes/tiny.py",
    "train.run_name=run",
    "train.save_every=2",
    "train.keep_last=3",
    "train.log_every=1",
    "eval.every=0",
    "eval.max_rows=16",
    "eval.samples=0",
]


@pytest.mark.parametrize(
    "size,steps,kept,how",
    [
        (
            "15m",
            4,
            [],
            "it had written when the disk filled (removed)",
        ),  # the first save: no size to check beforehand
        ("22m", 8, ["step-00000002", "step-00000004"], "(the last one's size)"),  # refused before it starts
    ],
    ids=["first-save-runs-out", "later-save-refused-beforehand"],
)
def test_a_full_disk_during_a_save_is_one_line_and_a_failed_status(tmp_path, size, steps, kept, how):
    with tmpfs(tmp_path / "disk", size) as disk:
        proc = launch([*RUN, f"train.output_dir={disk}", f"train.max_steps={steps}"], check=False)
        run = disk / "run"
        ours = [line for line in proc.stderr.splitlines() if "no room for checkpoint" in line]
        assert proc.returncode != 0 and len(ours) == 1, proc.stderr[-6000:]
        assert ours[0].startswith(
            f"error: no room for checkpoint step-0000000{len(kept) * 2 + 2} in {run}/checkpoints:"
        )
        assert how in ours[0] and "free there" in ours[0] and "train.output_dir" in ours[0]
        # no process's traceback (torchrun's own report of a failed worker aside)
        for raw in (
            "No space left on device",
            "SafetensorError",
            "CheckpointException",
            "[rank0]:",
            "[rank1]:",
        ):
            assert raw not in proc.stderr, proc.stderr[-6000:]
        status = json.loads((run / "status.json").read_text())
        assert status["status"] == "failed" and status["error"].startswith("DiskFull: no room for checkpoint")
        assert status["input_error"] is False
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == kept  # the torn save gone
        assert all(verify_checkpoint(run / "checkpoints" / name) is None for name in kept)
        assert not list(run.glob(".*.tmp"))  # no torn status.json
