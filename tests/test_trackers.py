"""Experiment trackers (train.report_to): the settings; the fan-out's rules (each logged step once in a tracker
run that a resumed start continues, the records up to the checkpoint for one it opens anew, a failing tracker
left out with one warning, secrets masked) on a stand-in tracker; MLflow against a real tracking server on
localhost (sqlite store); W&B offline, read back from the files it writes; and a 2-process run, crashed, retried,
stopped and resumed, logging to TensorBoard, MLflow and W&B at once, with secrets in its environment."""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

import pytest

from conftest import free_port, launch
from shardtune.config import Config, apply_overrides, check_inputs
from shardtune.errors import ConfigError
from shardtune.observability.metrics import MetricsSink
from shardtune.observability.trackers import (
    MlflowTracker,
    TensorBoardTracker,
    WandbTracker,
    flat_params,
    recall,
    scrub,
    tracked,
)

SECRETS = {
    "HF_TOKEN": "hf_secret123",
    "WANDB_API_KEY": "wandbkey-secret-0123456789abcdef",
    "MLFLOW_TRACKING_USERNAME": "tracker-user",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-pass-secret456",
}


# ------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    ("value", "names"),
    [
        ("[tensorboard,mlflow]", ["tensorboard", "mlflow"]),
        ("wandb", ["wandb"]),
        ("mlflow,wandb", ["mlflow", "wandb"]),
        ("none", []),
        ("[]", []),
        ("null", []),
    ],
)
def test_report_to_takes_a_list_one_name_or_none(value, names):
    assert Config().train.report_to == ["tensorboard"]  # the default
    assert apply_overrides(Config(), {"train.report_to": value}, "the command line").train.report_to == names


def test_an_unknown_tracker_is_refused_with_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), {"train.report_to": "[tensorbord,comet]"}, "the command line")
    assert "unknown tracker 'tensorbord', 'comet' (did you mean tensorboard?)" in str(e.value)
    assert "valid: tensorboard, mlflow, wandb, or none" in str(e.value)


def test_a_tracker_not_installed_is_refused_with_its_pip_command_before_anything_loads(monkeypatch):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else find(n, *a))
    cfg = apply_overrides(Config(), {"train.report_to": "[mlflow,wandb]"}, "the command line")
    with pytest.raises(ConfigError) as e:
        check_inputs(cfg)
    assert "wandb not installed here" in str(e.value) and "pip install 'shardtune[wandb]'" in str(e.value)
    assert "mlflow" not in str(e.value).split("here.")[1]  # mlflow is installed


# ------------------------------------------------------------------------------------- the fan-out
class Recorder:
    """A tracker that keeps what it is given; `continues`: what its start answers; `fail_on`: a method that
    raises."""

    def __init__(self, name="rec", continues=False, every_step=False, overwrites=False, fail_on=None):
        self.name, self.continues, self.every_step, self.overwrites = name, continues, every_step, overwrites
        self.fail_on, self.logged, self.files, self.status, self.config = fail_on, [], [], None, None

    def _maybe_fail(self, method):
        if method == self.fail_on:
            raise ConnectionError(f"server down (token {SECRETS['HF_TOKEN']})")

    def start(self, run_dir, config, resumed_step):
        self._maybe_fail("start")
        self.config = config
        return self.continues

    def log(self, step, metrics):
        self._maybe_fail("log")
        self.logged.append((step, dict(metrics)))

    def artifact(self, path):
        self.files.append(path.name)

    def finish(self, status):
        self.status = status

    def steps(self, key):
        return [s for s, m in self.logged if key in m]


def train_metrics(loss):
    return {"loss": loss, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s_per_device": 10.0, "mfu": 0.1}
    # (format_line's keys; the sink passes any others through)


def line_metrics(loss, **extra):
    m = {**train_metrics(loss), "host_peak_gib": 1.0, "gpu_peak_gib": None, "device_kind": "proc"}
    return {**m, "alloc_retries": 0, **extra}


def first_start(run_dir, trackers, steps=5, config=None):
    """Steps 1..`steps` logged, evals at 0 and 3, then stopped as a crash would leave it (no close)."""
    sink = MetricsSink(run_dir, 8, 0, True, trackers, config or {"lora": {"r": 16}})
    sink.eval(0, {"eval_loss": 2.0, "eval_tokens": 100, "eval_rows": 4})
    for step in range(1, steps + 1):
        sink.train_step(step, line_metrics(1.0 / step, **{"rewards/chosen": step}), log_line=True)
        if step == 3:
            sink.eval(3, {"eval_loss": 1.5, "eval_tokens": 100, "eval_rows": 4})
    sink.jsonl.close()
    return sink


def test_records_reach_trackers_named_by_kind_and_new_keys_flow_through(tmp_path):
    rec = Recorder()
    sink = first_start(tmp_path, [rec], steps=3)
    assert rec.logged[0] == (0, {"eval/loss": 2.0, "eval/tokens": 100.0, "eval/rows": 4.0})
    step1 = dict(rec.logged)[1]
    assert (
        step1["train/loss"] == 1.0 and step1["train/rewards/chosen"] == 1.0
    )  # a key the sink never heard of
    assert (
        "train/device_kind" not in step1 and "train/gpu_peak_gib" not in step1
    )  # text and None: not metrics
    sink.artifacts([tmp_path / "missing.png", tmp_path / "metrics.jsonl", None])
    sink.close("complete")
    sink.close("failed")  # once
    assert rec.files == ["metrics.jsonl"] and rec.status == "complete"
    assert tracked({"step": 3, "eval_loss": 1.5}) == {"eval/loss": 1.5}


def test_only_logged_steps_reach_trackers_but_tensorboard_gets_every_step(tmp_path):
    every, logged = Recorder("every", every_step=True), Recorder("logged")
    sink = MetricsSink(tmp_path, 4, 0, True, [every, logged], {})
    for step in (1, 2, 3, 4):
        sink.train_step(step, line_metrics(1.0), log_line=step % 2 == 0)
    assert every.steps("train/loss") == [1, 2, 3, 4] and logged.steps("train/loss") == [2, 4]


def test_a_continued_tracker_run_gets_no_step_twice_and_a_new_one_gets_the_history(tmp_path):
    """Steps 1-5 logged, the checkpoint at 4: the resumed start redoes step 5. A tracker run it continues holds
    step 5 already (its history only grows): not sent again, but the eval due at step 6 and every later step
    are. One opened anew (a tracker added to report_to, or unreachable before) is first given steps up to 4.
    TensorBoard (overwrites) hides the earlier step 5 itself and gets everything."""
    first_start(tmp_path, [Recorder()])
    continued, new, tb = Recorder(continues=True), Recorder("new"), Recorder("tb", True, True, True)
    sink = MetricsSink(tmp_path, 8, 4, True, [continued, new, tb], {})
    for step in (5, 6):
        sink.train_step(step, line_metrics(9.0), log_line=True)
    sink.eval(6, {"eval_loss": 1.0, "eval_tokens": 100, "eval_rows": 4})
    assert continued.steps("train/loss") == [6] and continued.steps("eval/loss") == [6]
    assert new.steps("train/loss") == [1, 2, 3, 4, 5, 6] and new.steps("eval/loss") == [0, 3, 6]
    assert tb.steps("train/loss") == [5, 6] and tb.steps("eval/loss") == [6]
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 3, 4, 5, 6, 6]  # metrics.jsonl: this start's step 5, once


def test_a_failing_tracker_is_warned_about_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", SECRETS["HF_TOKEN"])
    broken, ok, dead = Recorder("broken", fail_on="log"), Recorder("ok"), Recorder("dead", fail_on="start")
    first_start(tmp_path, [broken, ok, dead], steps=4)
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("shardtune")]
    assert len(warnings) == 2, warnings  # one each, not one per step
    assert warnings[0].startswith("dead: start failed (ConnectionError: server down (token ***))")
    assert warnings[1].startswith("broken: log failed") and "training goes on" in warnings[1]
    assert SECRETS["HF_TOKEN"] not in caplog.text
    assert ok.steps("train/loss") == [1, 2, 3, 4] and broken.logged == []
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 6  # the run's own record, whole


def test_secrets_never_reach_a_tracker(tmp_path, monkeypatch):
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    rec = Recorder()
    config = {"data": {"source": f"https://user:{SECRETS['HF_TOKEN']}@host/x.jsonl"}, "hub": {"token": "abc"}}
    MetricsSink(tmp_path, 4, 0, True, [rec], config)
    assert rec.config == {"data": {"source": "https://***@host/x.jsonl"}, "hub": {"token": "***"}}
    assert scrub("at http://me:pw@h:5000/api failed", []) == "at http://***@h:5000/api failed"
    assert scrub([SECRETS["WANDB_API_KEY"]], list(SECRETS.values())) == ["***"]
    assert flat_params({"a": {"b": [1, 2], "c": None, "d": {}}, "e": "x"}) == {
        "a.b": "[1, 2]",
        "a.c": "null",
        "a.d": "{}",
        "e": "x",
    }


def test_tensorboard_events_hold_every_numeric_key_and_a_resume_hides_redone_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first_start(tmp_path, [TensorBoardTracker()]).trackers.finish("failed")
    sink = MetricsSink(tmp_path, 8, 4, True, [TensorBoardTracker()], {})
    sink.train_step(5, line_metrics(0.25), log_line=False)
    sink.close("complete")
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert {"train/loss", "train/rewards/chosen", "eval/loss", "eval/tokens"} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("train/loss")][-2:] == [(4, 0.25), (5, 0.25)]


# -------------------------------------------------------------------------------------------- MLflow
@pytest.fixture
def mlflow_env(mlflow_server, monkeypatch):
    url, root = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    from mlflow import MlflowClient

    return MlflowClient(url), root


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.slow  # starts a real MLflow server (6 s): make test, not make test-fast
def test_mlflow_run_continues_on_resume_with_each_step_once(tmp_path, mlflow_env):
    """Against a real tracking server: a first start logs steps 1-5 (checkpoint at 4) and crashes; the resumed
    start continues the same MLflow run (its id from trackers.json), logs step 5 not again and 6 on, a changed
    setting as a tag (MLflow keeps a param's first value), and the files at the end."""
    client, root = mlflow_env
    config = {"lora": {"r": 16}, "optim": {"lr": 0.001}}
    first_start(tmp_path, [MlflowTracker("trackers-resume")], config=config)
    run_id = recall(tmp_path, "mlflow")["run_id"]
    assert client.get_run(run_id).info.status == "RUNNING"  # a crash ends nothing
    config["optim"]["lr"] = 0.002
    sink = MetricsSink(tmp_path, 8, 4, True, [MlflowTracker("trackers-resume")], config)
    for step in (5, 6):
        sink.train_step(step, line_metrics(0.1), log_line=True)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    sink.artifacts([tmp_path / "metrics.jsonl", tmp_path / "adapter"])
    sink.close("complete")
    assert recall(tmp_path, "mlflow")["run_id"] == run_id
    exp = client.get_experiment_by_name("trackers-resume")
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [run_id]  # one run
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == tmp_path.name
    assert history(client, run_id, "train/loss") == [
        (1, 1.0),
        (2, 0.5),
        (3, 1 / 3),
        (4, 0.25),
        (5, 0.2),
        (6, 0.1),
    ]
    assert history(client, run_id, "eval/loss") == [(0, 2.0), (3, 1.5)]
    assert run.data.params == {"lora.r": "16", "optim.lr": "0.001"}
    assert run.data.tags["shardtune.changed_at_step_4"] == "optim.lr: 0.001 -> 0.002"
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["adapter", "metrics.jsonl"]
    assert [a.path for a in client.list_artifacts(run_id, "adapter")] == ["adapter/adapter_config.json"]
    stored = [p for p in root.rglob("*") if p.is_file()]
    assert not [p for p in stored for s in SECRETS.values() if s.encode() in p.read_bytes()]


@pytest.mark.slow  # starts a real MLflow server (6 s): make test, not make test-fast
def test_an_mlflow_server_going_down_mid_run_leaves_training_going(tmp_path, mlflow_env, caplog):
    from mlflow import MlflowClient

    tracker = MlflowTracker("trackers-down")
    sink = MetricsSink(tmp_path, 8, 0, True, [tracker], {})
    sink.train_step(1, line_metrics(1.0), log_line=True)
    tracker.client = MlflowClient(f"http://127.0.0.1:{free_port()}")  # the server is gone
    for step in (2, 3, 4):
        sink.train_step(step, line_metrics(1.0), log_line=True)
    sink.close("complete")
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("shardtune")]
    assert len(warnings) == 1 and warnings[0].startswith("mlflow: log failed"), warnings
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4
    assert history(mlflow_env[0], recall(tmp_path, "mlflow")["run_id"], "train/loss") == [(1, 1.0)]


# ----------------------------------------------------------------------------------------------- W&B
def wandb_records(path: Path):
    """The records of a .wandb file (W&B 0.31: a 7-byte header, then LevelDB-log framing in 32 KiB blocks of
    wandb_internal_pb2.Record protos)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    if len(data) < 7:  # not written yet
        return
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def wandb_run(run_dir: Path, timeout: float = 30) -> dict:
    """What the offline directories of a run's W&B run hold, oldest first: their run ids, config, the history
    (one row per logged step), artifacts, files. (W&B's service may still be writing a file when run.finish
    returns: each is read once it holds its exit record.)"""
    out = {"ids": [], "config": {}, "history": [], "artifacts": [], "files": []}
    for d in sorted((run_dir / "wandb").glob("offline-run-*")):
        path, deadline = next(d.glob("run-*.wandb")), time.monotonic() + timeout
        while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path)):
            assert time.monotonic() < deadline, f"{path}: no exit record"
            time.sleep(0.2)
        for r in wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                out["ids"].append(r.run.run_id)
                out["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
            elif kind == "history":
                items = r.history.item  # a key with a '/' comes as nested_key
                out["history"].append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                )
            elif kind == "artifact":
                out["artifacts"].append((r.artifact.name, r.artifact.type))
            elif kind == "files":
                out["files"] += [f.path for f in r.files.files]
    return out


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install -e '.[dev]' installs it)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var))
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)


def test_wandb_offline_continues_the_run_id_with_each_step_once(tmp_path, wandb_offline):
    """Offline, W&B writes each start's records to a directory of its own (offline-run-<time>-<id>), the same
    run id in both; together they hold every step once, the config, the adapter as a 'model' artifact and
    loss.png; nothing of the machine or its secrets."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first_start(run_dir, [WandbTracker("trackers")], config={"lora": {"r": 16}}).trackers.finish("failed")
    time.sleep(1.1)  # W&B names an offline directory by the second it starts in: a start a second later
    sink = MetricsSink(run_dir, 8, 4, True, [WandbTracker("trackers")], {"lora": {"r": 16}})
    for step in (5, 6):
        sink.train_step(step, line_metrics(0.1), log_line=True)
    (run_dir / "adapter").mkdir()
    (run_dir / "adapter" / "adapter_config.json").write_text("{}")
    (run_dir / "loss.png").write_bytes(b"png")
    sink.artifacts([run_dir / "loss.png", run_dir / "adapter"])
    sink.close("complete")
    run = wandb_run(run_dir)
    run_id = recall(run_dir, "wandb")["run_id"]
    assert run["ids"] == [run_id, run_id]
    assert run["config"]["lora"] == {"r": 16}
    losses = [(h["_step"], h["train/loss"]) for h in run["history"] if "train/loss" in h]
    assert losses == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25), (5, 0.2), (6, 0.1)]
    assert [h["_step"] for h in run["history"] if "eval/loss" in h] == [0, 3]
    assert run["artifacts"] == [(f"{run_dir.name}-adapter", "model")] and "loss.png" in run["files"]
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in written for s in SECRETS.values() if s.encode() in p.read_bytes()]


# ------------------------------------------------------------------------------------- a whole run
@pytest.mark.slow
def test_a_crashed_stopped_and_resumed_run_keeps_one_tracker_run_and_no_secret(tmp_path, mlflow_server):
    """2 CPU processes logging to TensorBoard, MLflow (the server above) and W&B (offline), with secrets in their
    environment. The first launch: rank 1 is killed mid step 6 and torchrun starts the processes again (resumed
    from step 4: step 5 redone), then a SIGTERM during step 8 stops the run (saved at 8); the second launch
    finishes it. The server holds ONE MLflow run, FINISHED: every logged step's metrics once, equal to
    metrics.jsonl's, the params, the adapter, loss.png; the W&B directories (one per start) the same run id and
    every step once; no secret in the MLflow store, the W&B files, the run directory or the log."""
    pytest.importorskip("wandb", reason="wandb is not installed (pip install -e '.[dev]' installs it)")
    from mlflow import MlflowClient

    url, root = mlflow_server
    out, home = tmp_path / "runs", tmp_path / "wandb-home"
    env = {
        **SECRETS,
        "MLFLOW_TRACKING_URI": url,
        "MLFLOW_EXPERIMENT_NAME": "two-processes",
        "WANDB_MODE": "offline",
    }
    env |= {var: str(home / var) for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR")}
    args = [
        "recipes/tiny.py",
        "data.generated.rows=200",
        "data.test_size=10",
        "train.max_steps=10",
        "train.global_batch_size=32",
        "train.micro_batch_size=8",  # 2 micro-batches per process per step
        "train.save_every=2",
        "train.log_every=1",
        "eval.every=3",
        "eval.samples=0",
        "train.report_to=[tensorboard,mlflow,wandb]",
        f"train.output_dir={out}",
        "train.run_name=run",
    ]
    faults = (
        f"rank=1,step=5,micro=1,action=kill,once={tmp_path / 'fired'};rank=0,step=7,micro=1,action=sigterm"
    )
    first = launch(args, env={**env, "SHARDTUNE_FAULT": faults}, restarts=1, check=False)
    assert "(step 4, saved by 2 processes)" in first.stderr, first.stderr[-3000:]
    run_dir = out / "run"
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"
    second = launch(args, env=env)
    assert "(step 8, saved by 2 processes)" in second.stderr

    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    assert [s for s, _ in losses] == list(range(1, 11)) and [s for s, _ in evals] == [0, 3, 6, 9, 10]

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("two-processes")
    (run,) = client.search_runs([experiment.experiment_id])  # one run for the three starts
    run_id = run.info.run_id
    assert recall(run_dir, "mlflow")["run_id"] == run_id and run.info.status == "FINISHED"
    assert history(client, run_id, "train/loss") == losses and history(client, run_id, "eval/loss") == evals
    assert [s for s, _ in history(client, run_id, "train/grad_norm")] == list(range(1, 11))
    params = run.data.params
    assert params["train.max_steps"] == "10" and params["lora.r"] == "16" and params["model.init"] == "random"
    assert params["train.report_to"] == '["tensorboard", "mlflow", "wandb"]'
    assert {"adapter", "loss.png", "summary.json", "config.yaml"} <= {
        a.path for a in client.list_artifacts(run_id)
    }
    adapter = {a.path for a in client.list_artifacts(run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= adapter

    wandb = wandb_run(run_dir)
    assert len(wandb["ids"]) == 3 and set(wandb["ids"]) == {recall(run_dir, "wandb")["run_id"]}
    assert sorted(h["_step"] for h in wandb["history"] if "train/loss" in h) == list(range(1, 11))
    assert sorted(h["_step"] for h in wandb["history"] if "eval/loss" in h) == [0, 3, 6, 9, 10]
    assert wandb["artifacts"] == [("run-adapter", "model")] and "loss.png" in wandb["files"]

    stored = [p for d in (root, out, home) for p in d.rglob("*") if p.is_file() and not p.is_symlink()]
    leaks = [p for p in stored for s in SECRETS.values() if s.encode() in p.read_bytes()]
    logs = first.stdout + first.stderr + second.stdout + second.stderr
    assert not leaks and not [s for s in SECRETS.values() if s in logs]
