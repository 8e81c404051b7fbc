"""Resume policy: which checkpoint a start continues from, and the checks that make the continuation exact.

A resumed run must equal an uninterrupted one: the settings that shape the model, the data and the order of
the rows (EXACTNESS_KEYS) and the training rows themselves (their fingerprint) must be what they were; other
settings may change (more steps, a new learning rate, eval and save cadence, the number of processes), and
changed optimizer settings are applied after the checkpoint's are loaded. A refused resume deletes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from shardtune.checkpoint.manager import CheckpointManager
from shardtune.checkpoint.store import recover, step_of, verify_checkpoint
from shardtune.config import Config
from shardtune.errors import ConfigError
from shardtune.observability.trackers import IDS_FILE

if TYPE_CHECKING:
    from shardtune.config import OptimConfig
    from shardtune.data.loader import Data

log = logging.getLogger(__name__)

# Settings whose change makes a resumed run differ from an uninterrupted one. Anything else may change
# between a save and a resume: more steps, a new learning rate or schedule, eval, save or log cadence,
# micro-batch size and number of processes (the global batch and the data order stay the same). Not the
# optimizer: its state in the checkpoint is the one optim.name saved it with.
EXACTNESS_KEYS = (
    "model",
    "quant",
    "lora",
    "data",
    "train.seed",
    "train.global_batch_size",
    "parallel.mixed_precision",
    "optim.name",  # the checkpoint holds that optimizer's state (bitsandbytes' 8-bit blocks or AdamW's moments)
    "objective",
)


def _flatten(prefix: str, value) -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(f"{prefix}.{k}", v))
        return out
    return {prefix: value}


def _select(cfg_dict: dict, key: str):
    """The value at `key`; a section a checkpoint saved before it existed has its defaults then."""
    for part in key.split("."):
        if part not in cfg_dict:  # (optim.name before it existed: adamw, the default)
            return _select(Config().model_dump(mode="json"), key)
        cfg_dict = cfg_dict[part]
    return cfg_dict


def _as_now(key: str, value):
    """A section as this version reads it: a setting saved under an older name (quant.load_in_4bit: quant.bits)
    translated, one saved before it existed at its default. Left as it is where it no longer validates."""
    section = Config.model_fields.get(key)
    if section is None or not isinstance(value, dict):
        return value
    try:
        return section.annotation.model_validate(value).model_dump(mode="json")
    except ValueError:
        return value


def exactness_differences(saved: dict, current: dict) -> list[str]:
    """Settings that differ between a checkpoint's config and this run's, among EXACTNESS_KEYS (a setting the
    checkpoint's config lacks counts as its default)."""
    diffs = []
    defaults = Config().model_dump(mode="json")
    for key in EXACTNESS_KEYS:
        a, b = _flatten(key, _as_now(key, _select(saved, key))), _flatten(key, _select(current, key))
        default = _flatten(key, _select(defaults, key))
        diffs += [
            f"{k}: checkpoint {a.get(k, default.get(k))!r} -> now {b.get(k)!r}"
            for k in sorted(set(a) | set(b))
            if a.get(k, default.get(k)) != b.get(k)
        ]
    return diffs


def resume_point(mode: str, manager: CheckpointManager, config_yaml: str) -> Path | None:
    """The checkpoint to start from (train.resume: auto, never or a path), after checking that resuming
    from it continues the run exactly; None to start fresh."""
    if manager.dist.is_main and manager.dir.is_dir():
        recover(manager.dir)
    if mode == "never":
        if manager.checkpoints():
            raise ConfigError(
                f"train.resume=never but {manager.dir} already holds checkpoints; choose another train.run_name, "
                f"or resume with train.resume=auto. (Nothing was deleted.)"
            )
        return None
    if mode == "auto":
        path = manager.latest()
        if path is None and manager.checkpoints():
            problems = [f"{p.name}: {verify_checkpoint(p)}" for p in manager.checkpoints()]
            raise ConfigError(
                f"train.resume=auto: {manager.dir} holds checkpoints but none is intact, so the run would start "
                f"over from step 0:\n  " + "\n  ".join(problems) + "\nMove them out of the way to start over "
                "(or choose another train.run_name); nothing was deleted."
            )
    else:
        path = Path(mode)
        problem = verify_checkpoint(path) if path.is_dir() else "no such directory"
        if problem:
            raise ConfigError(f"train.resume={mode}: {problem}")
    if path is not None:
        diffs = exactness_differences(
            yaml.safe_load((path / "config.yaml").read_text()), yaml.safe_load(config_yaml)
        )
        if diffs:
            raise ConfigError(
                f"cannot resume {path}: these settings changed since it was saved, so the run would not continue "
                f"exactly:\n  "
                + "\n  ".join(diffs)
                + "\nRestore them, or start a new run (train.run_name=...)."
            )
    return path


def set_aside_after(manager: CheckpointManager, step: int) -> None:
    """Move the run's checkpoints newer than `step` (the one it resumes from) into checkpoints/abandoned/: they
    are not on the path the run now takes (it resumes an older one by request, or they failed to verify), so
    the next `train.resume=auto` must not pick them, nor the export at the end, and a save must not count them
    among the ones it keeps. Kept, not deleted. Rank 0 moves them (only rank 0 lists the directory after the
    resume point is chosen), once nothing can refuse the resume any more."""
    newer = [p for p in manager.checkpoints() if step_of(p) > step]
    if not manager.dist.is_main or not newer:
        return
    aside = manager.dir / "abandoned"
    aside.mkdir(exist_ok=True)
    for p in newer:
        target = aside / p.name
        if target.exists():
            target = aside / f"{p.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(p, target)
    log.warning(
        "resuming from step %d: %s set aside in %s (not on this run's path; delete them when no longer needed)",
        step,
        ", ".join(p.name for p in newer),
        aside,
    )


def data_fingerprint(data: Data) -> str:
    """A hash of the training rows as tokenized (ids, trained tokens, row bounds): equal exactly when the run
    would read the same tokens in the same order at every step."""
    h = hashlib.sha256()
    for array in (data.train.ids, data.train.trained, data.train.offsets):
        h.update(array.tobytes())
    return h.hexdigest()[:16]


def check_same_data(checkpoint: Path, fingerprint: str, origin: str) -> None:
    """Refuse to resume onto training data that changed since the checkpoint (an edited file, a dataset that
    moved on): the data position would point into other rows, and the run would go on silently on a
    different order. The settings that shape the data are checked with the rest (checkpoint.EXACTNESS_KEYS)."""
    saved = json.loads((checkpoint / "train_state.json").read_text()).get("data_fingerprint")
    if saved is None:
        log.warning(
            "%s holds no hash of its training data (saved before they were kept): not checked", checkpoint
        )
    elif saved != fingerprint:
        raise ConfigError(
            f"cannot resume {checkpoint}: the training data from {origin} is not what it was trained on (its "
            f"rows or their tokens changed since). Restore the data, or start a new run (train.run_name=...)."
        )


def apply_optimizer_settings(o: OptimConfig, optimizer, scheduler) -> list[str]:
    """A resumed run trains on with this run's optimizer settings, which may differ from the checkpoint's (a
    new learning rate is allowed: they are not among checkpoint.EXACTNESS_KEYS). Loading the optimizer and the
    schedule put the checkpoint's back (its param groups, the scheduler's base rates); this run's are set
    again here, and the rate of the step the schedule is at recomputed from this run's base and schedule.
    Unchanged settings leave everything as loaded (bit-exact resume). Returns the changes, for the log."""
    changed = []
    for key, now in (("betas", tuple(o.betas)), ("eps", o.eps), ("weight_decay", o.weight_decay)):
        before = optimizer.param_groups[0][key]
        if (tuple(before) if key == "betas" else before) != now:
            changed.append(f"optim.{key}={now} (the checkpoint's: {before})")
            for group in optimizer.param_groups:
                group[key] = now
    if any(base != o.lr for base in scheduler.base_lrs):
        changed.append(f"optim.lr={o.lr} (the checkpoint's: {scheduler.base_lrs[0]})")
        scheduler.base_lrs = [o.lr] * len(optimizer.param_groups)
        for group in optimizer.param_groups:
            group["initial_lr"] = o.lr
    # The next step's rate, from this run's base and schedule (a new max_steps or warmup changes the factor):
    # LambdaLR's (every schedule transformers builds) own formula, so unchanged settings give the loaded float
    rates = [
        base * factor(scheduler.last_epoch)
        for factor, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)
    ]
    if rates != [group["lr"] for group in optimizer.param_groups]:
        changed.append(
            f"the rate at step {scheduler.last_epoch + 1} {rates[0]:.3g} (the checkpoint's schedule: "
            f"{optimizer.param_groups[0]['lr']:.3g})"
        )
        for group, rate in zip(optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
        scheduler._last_lr = rates
    return changed


def drop_stale_leftovers(run_dir: Path, cfg_yaml: str) -> None:
    """A fresh start in a run directory that an earlier start left without a checkpoint (it failed or was
    killed before its first save): the tokenizer and random base that start wrote are reused as the run's own
    (the run builds them only where they are missing) only if they were made with the same model, data and LoRA settings; else they go,
    and this start makes its own, and its own tracker runs (trackers.json goes). Nothing else in the directory is
    touched."""
    before = run_dir / "config.yaml"
    if not before.is_file():
        return
    try:
        diffs = exactness_differences(yaml.safe_load(before.read_text()), yaml.safe_load(cfg_yaml))
    except (KeyError, TypeError, yaml.YAMLError):  # written by another version of shardtune: not comparable
        diffs = ["config.yaml of another form"]
    if diffs and (run_dir / IDS_FILE).is_file():  # another run: its own tracker runs, not the earlier start's
        (run_dir / IDS_FILE).unlink()
    stale = [d for d in (run_dir / "tokenizer", run_dir / "base") if d.is_dir()]
    if diffs and stale:
        for d in stale:
            shutil.rmtree(d)
        log.info(
            "%s: made by an earlier start with other settings (%s) and no checkpoint; made again",
            ", ".join(d.name + "/" for d in stale),
            "; ".join(diffs[:3]),
        )
