"""`shardtune submit`'s checks that run before anything reaches Slurm (the jobs themselves are tested
against a real cluster in tests/slurm)."""

import json

import pytest

from shardtune.cli import main as cli
from shardtune.config import ConfigError
from shardtune.submit import Resources, Submission, submit, time_minutes


@pytest.mark.parametrize(
    "text,minutes",
    [("90", 90), ("1:30", 2), ("04:00:00", 240), ("1-12", 2160), ("1-00:00:01", 1441), ("0:10", 1)],
)
def test_slurm_time_formats(text, minutes):
    assert time_minutes(text) == minutes


def test_bad_time_and_lead_are_refused_before_submitting(tmp_path):
    with pytest.raises(ConfigError, match="--time '4h'"):
        time_minutes("4h")
    with pytest.raises(ConfigError, match="lower --signal-lead or raise --time"):
        submit("recipes/tiny.py", [], None, Resources(time="5", signal_lead_s=300), tmp_path)
    with pytest.raises(ConfigError, match=r"train\.max_stepz"):
        submit("recipes/tiny.py", ["train.max_stepz=3"], None, Resources(), tmp_path)
    assert not (tmp_path / "submitit").exists()


def test_unknown_job_names_the_known_ones(tmp_path, capsys):
    Submission("41", "recipes/tiny.py", [], str(tmp_path / "submitit/%j"), []).save(tmp_path)
    assert cli(["status", "7", f"--runs-dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "no job 7" in err and "known jobs: 41" in err
    assert json.loads((tmp_path / "submitit/41.json").read_text())["job_id"] == "41"
