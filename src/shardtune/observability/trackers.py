"""Experiment trackers (train.report_to): TensorBoard, MLflow and W&B behind one small protocol (Tracker), and
Trackers, the fan-out rank 0's MetricsSink feeds.

Each tracker gets the configuration (flattened for MLflow's params; secrets never: values of the environment's
token, key and password variables are masked), the records metrics.jsonl gets, as train/<key> and eval/<key>
(eval_loss -> eval/loss; whatever numeric keys a record carries), TensorBoard every training step, and at the end
loss.png, summary.json, config.yaml and the adapter directory.

A resumed or requeued start continues the tracker run of the start before it: the run's id is kept in the run
directory's trackers.json. MLflow's and W&B's histories only grow, so what an earlier start logged past the
checkpoint this one resumes from (the steps redone after a crash) is not logged again: those steps keep the
earlier start's values, which an exact resume reproduces anyway (metrics.jsonl holds this start's). TensorBoard
hides them instead (purge_step). A tracker that fails (a server down) is warned about once and left out for the
rest of the start: training goes on, and the run directory's own files stay the record.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from shardtune.files import write_atomic

log = logging.getLogger(__name__)

IDS_FILE = "trackers.json"
# Environment variables whose values are secrets, and config keys that would hold one
_SECRET_VAR = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
_SECRET_KEY = re.compile(r"(^|[._])(token|secret|password|passwd|api_key|credentials?)$", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(\w+://)[^/@\s:]+:[^/@\s]+@")  # https://user:password@host
_PARAM_LENGTH = 500  # MLflow takes up to 6000 characters; some of its backends fewer


class Tracker(Protocol):
    """One experiment tracker, driven by Trackers on rank 0."""

    name: str
    every_step: bool  # fed every training step (TensorBoard); otherwise the records metrics.jsonl gets
    overwrites: bool  # a resumed start's records replace what an earlier start logged past the checkpoint

    def start(self, run_dir: Path, config: dict[str, Any], resumed_step: int) -> bool:
        """Open the tracker's run: the earlier start's where trackers.json names one (True), else a new one."""
        ...

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def artifact(self, path: Path) -> None:
        """A file, or a directory with what is in it."""
        ...

    def finish(self, status: str) -> None:
        """status: complete, interrupted (to be resumed) or failed."""
        ...


# ------------------------------------------------------------------------------------- what is logged
def secret_values(environ: dict[str, str] | os._Environ = os.environ) -> list[str]:
    """The values of the environment's secret variables (HF_TOKEN, WANDB_API_KEY, MLFLOW_TRACKING_PASSWORD...),
    longest first."""
    values = {v for k, v in environ.items() if _SECRET_VAR.search(k) and len(v) >= 6}
    return sorted(values, key=len, reverse=True)


def scrub(value: Any, secrets: list[str]) -> Any:
    """`value` (text, or a config's dicts and lists of them) with every secret masked: the secret variables'
    values, a URL's user and password, the values of secret-named keys."""
    if isinstance(value, dict):
        return {k: "***" if _SECRET_KEY.search(str(k)) else scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, secrets) for v in value]
    if isinstance(value, str):
        value = _URL_PASSWORD.sub(r"\1***@", value)
        for secret in secrets:
            value = value.replace(secret, "***")
    return value


def flat_params(config: dict[str, Any]) -> dict[str, str]:
    """{'lora.r': '16', 'lora.target_modules': '"all-linear"'...}: a config's leaves as text (MLflow params)."""
    out = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and (value or not prefix):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
            return
        text = value if isinstance(value, str) else json.dumps(value)
        out[prefix] = text if len(text) <= _PARAM_LENGTH else text[: _PARAM_LENGTH - 3] + "..."

    walk("", config)
    return out


def tracked(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as a tracker's metrics: an eval record's keys as eval/<key> (eval_loss ->
    eval/loss), any other record's as train/<key>; numbers only (not the step itself, booleans or text)."""
    evaluation = any(k.startswith("eval_") for k in record)
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = f"eval/{key.removeprefix('eval_')}" if evaluation else f"train/{key}"
        out[re.sub(r"[^\w./\- :]", "_", name)] = float(value)
    return out


def recall(run_dir: Path, name: str) -> dict[str, Any]:
    """What trackers.json keeps for tracker `name` (its run's id...); {} when nothing."""
    try:
        return json.loads((run_dir / IDS_FILE).read_text()).get(name) or {}
    except (OSError, ValueError, AttributeError):
        return {}


def remember(run_dir: Path, name: str, info: dict[str, Any]) -> None:
    """Keep `info` for tracker `name` in trackers.json (written atomically)."""
    path = run_dir / IDS_FILE
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        kept = {}
    write_atomic(path, (json.dumps({**kept, name: info}, indent=1) + "\n").encode())


def _without_credentials(uri: str) -> str:
    """A tracking URI without the user and password it may carry (https://user:pw@host -> https://host)."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


# ----------------------------------------------------------------------------------------- trackers
class TensorBoardTracker:
    """Event files in the run directory's tensorboard/, every training step; a resumed start hides what an
    earlier one wrote past the checkpoint (purge_step). The config and files are in the run directory already."""

    name, every_step, overwrites = "tensorboard", True, True

    def start(self, run_dir: Path, config: dict[str, Any], resumed_step: int) -> bool:
        from torch.utils.tensorboard import SummaryWriter

        purge = resumed_step + 1 if resumed_step else 0
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
        return True

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def artifact(self, path: Path) -> None:
        pass

    def finish(self, status: str) -> None:
        self.writer.close()


class MlflowTracker:
    """One MLflow run per training run, on MLFLOW_TRACKING_URI's server or store (MLflow's default without it):
    params (the flattened config), metrics by step, the files at the end. A resumed start sets the same run
    RUNNING again; settings it changed are listed in a tag (MLflow keeps a param's first value). The client's
    HTTP retries are bounded (unless MLFLOW_HTTP_REQUEST_* say otherwise), so that a server that is down stalls
    training seconds, not minutes, before the tracker is left out."""

    name, every_step, overwrites = "mlflow", False, False

    def __init__(self, experiment: str | None = None):
        self.experiment = experiment

    def start(self, run_dir: Path, config: dict[str, Any], resumed_step: int) -> bool:
        for var, value in (("MAX_RETRIES", "2"), ("BACKOFF_FACTOR", "1"), ("TIMEOUT", "30")):
            os.environ.setdefault(f"MLFLOW_HTTP_REQUEST_{var}", value)
        import mlflow
        from mlflow import MlflowClient

        self.client = MlflowClient()
        uri = _without_credentials(mlflow.get_tracking_uri())
        run = self._earlier_run(recall(run_dir, self.name), uri)
        if run is None:
            tags = {"shardtune.run_dir": str(run_dir.resolve())}
            created = self.client.create_run(self._experiment_id(), run_name=run_dir.name, tags=tags)
            self.run_id = created.info.run_id
            info = {"run_id": self.run_id, "experiment_id": created.info.experiment_id, "tracking_uri": uri}
            remember(run_dir, self.name, info)
        else:
            self.run_id = run.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        self._log_params(flat_params(config), run.data.params if run else {}, resumed_step)
        return run is not None

    def _earlier_run(self, earlier: dict[str, Any], uri: str):
        """The MLflow run an earlier start of this run logged to, if it is there to continue."""
        from mlflow.exceptions import MlflowException

        if not earlier:
            return None
        if earlier.get("tracking_uri") != uri:
            log.warning(
                "mlflow: this run's earlier starts logged to %s, this one to %s: a new MLflow run there",
                earlier.get("tracking_uri"),
                uri,
            )
            return None
        try:
            run = self.client.get_run(earlier["run_id"])
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            run = None
        if run is None or run.info.lifecycle_stage != "active":
            log.warning("mlflow: run %s (an earlier start's) is gone; a new MLflow run", earlier["run_id"])
            return None
        return run

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        if not name:
            return os.environ.get("MLFLOW_EXPERIMENT_ID") or "0"  # MLflow's Default experiment
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another run created it meanwhile
            return self.client.get_experiment_by_name(name).experiment_id

    def _log_params(self, params: dict[str, str], earlier: dict[str, str], step: int) -> None:
        from mlflow.entities import Param, RunTag

        new = [Param(k, v) for k, v in params.items() if k not in earlier]
        changed = [f"{k}: {earlier[k]} -> {v}" for k, v in params.items() if k in earlier and earlier[k] != v]
        tags = [RunTag(f"shardtune.changed_at_step_{step}", "; ".join(changed)[:5000])] if changed else []
        if new or tags:
            self.client.log_batch(self.run_id, params=new, tags=tags)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def artifact(self, path: Path) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
        else:
            self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str) -> None:
        statuses = {"complete": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}
        self.client.set_terminated(self.run_id, status=statuses[status])


class WandbTracker:
    """A W&B run (online, or WANDB_MODE=offline: files under the run directory's wandb/, or WANDB_DIR's) with
    the config, metrics by step, the files (the adapter as a 'model' artifact). Nothing of the machine is
    captured: no environment, git state, code, package list, console output or system stats. A resumed start
    continues the same run id; offline, W&B writes each start's records to a directory of its own
    (offline-run-<time>-<id>), which `wandb sync` uploads to that one run."""

    name, every_step, overwrites = "wandb", False, False

    def __init__(self, project: str | None = None):
        self.project = project

    def start(self, run_dir: Path, config: dict[str, Any], resumed_step: int) -> bool:
        import wandb

        project = self.project or os.environ.get("WANDB_PROJECT") or "shardtune"
        earlier = recall(run_dir, self.name)
        continued = bool(earlier) and earlier.get("project") == project
        run_id = earlier["run_id"] if continued else uuid.uuid4().hex[:8]
        settings = wandb.Settings(
            x_disable_meta=True,
            x_disable_stats=True,
            x_disable_machine_info=True,
            disable_git=True,
            disable_code=True,
            save_code=False,
            x_save_requirements=False,
            console="off",
            quiet=True,
        )
        self.run = wandb.init(
            project=project,
            id=run_id,
            resume="allow",
            name=run_dir.name,
            dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
            config=config,
            allow_val_change=True,
            settings=settings,
        )
        if not continued:
            remember(run_dir, self.name, {"run_id": run_id, "project": project})
        return continued

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def artifact(self, path: Path) -> None:
        import wandb

        if path.is_dir():
            name = re.sub(r"[^\w.\-]", "_", f"{self.run.name}-{path.name}")
            art = wandb.Artifact(name, type="model")
            art.add_dir(str(path))
            self.run.log_artifact(art)
        else:
            self.run.save(str(path), base_path=str(path.parent), policy="now")

    def finish(self, status: str) -> None:
        if status == "interrupted":
            self.run.mark_preempting()
        self.run.finish(exit_code=1 if status == "failed" else 0)


def make_trackers(
    names: list[str], mlflow_experiment: str | None, wandb_project: str | None
) -> list[Tracker]:
    """The trackers train.report_to names (nothing is imported until one starts)."""
    made = {
        "tensorboard": TensorBoardTracker,
        "mlflow": lambda: MlflowTracker(mlflow_experiment),
        "wandb": lambda: WandbTracker(wandb_project),
    }
    return [made[name]() for name in names]


# ------------------------------------------------------------------------------------------ fan-out
class Trackers:
    """Rank 0's trackers, fed what MetricsSink logs. Each tracker that continues an earlier start's run is not
    given again what that start logged past this one's checkpoint (`dropped`: the records metrics.jsonl lost);
    one that opens a new run on a resumed start is first given the records up to the checkpoint (`kept`). One
    that fails is warned about once and left out for the rest of this start."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers, self.active = list(trackers), []
        self.skip: dict[str, dict[str, int]] = {}  # tracker -> metric -> the last step already there
        self.secrets = secret_values()

    def start(
        self, run_dir: Path, config: dict[str, Any], resumed_step: int, kept: list[dict], dropped: list[dict]
    ) -> None:
        config = scrub(config, self.secrets)
        redone: dict[str, int] = {}
        for rec in dropped:
            for key in tracked(rec):
                redone[key] = max(redone.get(key, -1), rec.get("step", -1))
        for tracker in self.trackers:
            continued = self._call(tracker, "start", run_dir, config, resumed_step)
            if continued is None:
                continue
            self.active.append(tracker)
            self.skip[tracker.name] = redone if continued and not tracker.overwrites else {}
            if not continued and not tracker.overwrites:
                for rec in kept:
                    self.send(tracker, rec.get("step", 0), tracked(rec))

    def send(self, tracker: Tracker, step: int, metrics: dict[str, float]) -> None:
        skip = self.skip.get(tracker.name, {})
        metrics = {k: v for k, v in metrics.items() if step > skip.get(k, -1)}
        if metrics:
            self._call(tracker, "log", step, metrics)

    def train_step(self, step: int, metrics: dict[str, Any], logged: bool) -> None:
        """A training step's metrics: to every tracker if the step is logged, else to those fed every step."""
        values = tracked(metrics)
        for tracker in list(self.active):
            if logged or tracker.every_step:
                self.send(tracker, step, values)

    def record(self, rec: dict[str, Any]) -> None:
        """A metrics.jsonl record other than a training step's (an eval)."""
        values = tracked(rec)
        for tracker in list(self.active):
            self.send(tracker, rec.get("step", 0), values)

    def artifacts(self, paths: list[Path | None]) -> None:
        for tracker in list(self.active):
            for path in paths:
                if path is not None and path.exists():
                    self._call(tracker, "artifact", path)

    def finish(self, status: str) -> None:
        for tracker in list(self.active):
            self._call(tracker, "finish", status)
        self.active = []

    def _call(self, tracker: Tracker, method: str, *args):
        """tracker.method(*args); None, the tracker warned about and left out, if it raises."""
        if method != "start" and tracker not in self.active:
            return None
        try:
            return getattr(tracker, method)(*args)
        except Exception as e:
            if tracker in self.active:
                self.active.remove(tracker)
            text = scrub(f"{type(e).__name__}: {e}", self.secrets)
            log.warning(
                "%s: %s failed (%s); training goes on without it for the rest of this start (the run "
                "directory's metrics.jsonl keeps every record)",
                tracker.name,
                method,
                text[:600],
            )
            return None
