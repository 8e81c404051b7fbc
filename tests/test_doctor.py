"""`shardtune doctor` and `--doctor`: each finding says what is wrong and what to change."""

import subprocess
import sys

from conftest import ROOT
from shardtune.cli import main as cli
from shardtune.doctor import logged_save_seconds, signal_lead


def test_a_good_setup_passes(capsys, tmp_path):
    assert cli(["doctor", "recipes/tiny.py", f"train.output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    for expected in (
        "torch ",
        "bitsandbytes 4-bit round trip on cpu",
        "FSDP wraps LlamaDecoderLayer",
        "attention: sdpa",
        "disk:",
        "all checks passed",
    ):
        assert expected in out, out


def test_a_wrong_wrap_class_is_named_with_the_fix(capsys, tmp_path):
    assert (
        cli(["doctor", "recipes/tiny.py", "parallel.wrap_class=LlamaLayer", f"train.output_dir={tmp_path}"])
        == 1
    )
    out = capsys.readouterr().out
    assert "parallel.wrap_class=LlamaLayer is not a class" in out
    assert "set parallel.wrap_class to one of: LlamaDecoderLayer" in out


def test_signal_lead_against_step_and_save(tmp_path):
    (short,) = signal_lead(20, step_s=5, save_s=30, measured=True)
    assert (
        short.level == "error" and "save (30 s, measured)" in short.what and "--signal=B:USR1@97" in short.fix
    )
    (enough,) = signal_lead(300, step_s=5, save_s=30, measured=False)
    assert enough.level == "ok"
    assert signal_lead(None, 5, 30, False) == []
    log = tmp_path / "slurm" / "restart-0.log"
    log.parent.mkdir()
    log.write_text(
        "[shardtune] checkpoint step 10 saved to /x/step-10 (3.9 MiB) in 12.5s\n"
        "[shardtune] checkpoint step 20 saved to /x/step-20 (3.9 MiB) in 14.0s\n"
    )
    assert logged_save_seconds(tmp_path) == 14.0


def test_doctor_flag_stops_a_run_before_it_trains(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "recipes/tiny.py",
            "--doctor",
            "parallel.wrap_class=Nope",
            f"train.output_dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "shardtune doctor found errors" in proc.stderr
    assert "not a class" in proc.stderr and not any(tmp_path.iterdir())
