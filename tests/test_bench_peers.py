"""bench/peers/peers.py's CPU-runnable path (--tiny): shardtune and the TRL + PEFT recipe train the same checkpoint
and rows, one process per run, and the records issue 26 asks for come out (runs.jsonl, peers.jsonl, the table).
The comparison itself (with Unsloth, at memory budgets) needs a GPU: `bash bench/speed.sh peers`."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, run_env

pytest.importorskip("trl")
pytestmark = pytest.mark.slow  # two trainings in subprocesses: about half a minute


def test_the_tiny_peers_run_trains_both_tools_on_one_checkpoint_and_records_them(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--tiny", "--settings", "2:0", "--dropout", "0.05", "--warmup", "1", "--steps", "2"]
    proc = subprocess.run(
        [sys.executable, "bench/peers/peers.py", *argv, "--out", str(out), "--work", str(work)],
        cwd=ROOT,
        env={**run_env(), "OMP_NUM_THREADS": "2", "SHARDTUNE_ALLOCATION": "test-1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["tool"] for r in runs] == ["shardtune", "trl"], runs
    for r in runs:
        assert "error" not in r and r["tokens_per_s_per_gpu"] > 0, r
        assert r["settings"] == {
            "micro_batch": 2,
            "checkpointing": False,
            "r": 16,
            "alpha": 8,
            "dropout": 0.05,
            "seq": 64,
        }
    # shardtune loaded the checkpoint the others loaded, with the same LoRA settings
    overrides = runs[0]["detail"]["overrides"]
    assert f"model.name_or_path={work / 'checkpoint'}" in overrides and "lora.dropout=0.05" in overrides
    assert (work / "checkpoint" / "config.json").is_file()
    records = [json.loads(x) for x in (out / "peers.jsonl").read_text().splitlines()]
    assert [r["tool"] for r in records] == ["shardtune", "trl"]
    for r in records:
        assert r.keys() >= {
            "tool",
            "shape",
            "budget_gib",
            "tokens_per_s_per_gpu",
            "peak_gib",
            "settings",
            "machine",
        }
        assert (r["shape"], r["machine"], r["allocation"]) == ("tiny", "cpu", "test-1")
    _, head, row = proc.stdout[proc.stdout.index("LoRA dropout 0.05") :].splitlines()[:3]
    assert head.split("|")[2:4] == [f"{'shardtune':>25} ", f"{'trl':>25} "], head
    assert row.split("|")[1].strip() == "1000 G" and row.count("mb2") == 2, row
