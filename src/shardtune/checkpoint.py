"""Checkpoints that never lose work: sharded, atomic, verified.

    run_dir/checkpoints/step-00000100/
        __0_0.distcp, __1_0.distcp, .metadata   LoRA weights + AdamW state, one shard per rank (DCP)
        train_state.json                        step, counters, LR scheduler, data position
        rank00000.rng.safetensors / .json       every RNG of every rank (torch CPU/CUDA, NumPy, Python)
        config.yaml, adapter_config.json, model_config.json   what is needed to resume or export alone
        manifest.json                           written last: files, sizes, sha256, config hash, world size

A checkpoint is written into `.tmp-step-N`, fsynced, and renamed only after its manifest is in place, so
a directory named `step-N` is complete by construction. Load verifies sizes and checksums and falls back
to the previous checkpoint, naming the bad file. The frozen 4-bit base is never saved: it is the model
checkpoint the run started from. No file here is unpickled except DCP's own metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import yaml
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import _init_optim_state  # fresh AdamW state to load into

from shardtune import faults
from shardtune.config import ConfigError
from shardtune.distributed import DistInfo, barrier, broadcast_object, side_group
from shardtune.metrics import gpu_peak_gib
from shardtune.parallel import is_engine

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write, fsync and rename, so `path` holds either the old or the new content, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


CHECKPOINT_NAME = re.compile(r"step-(\d+)")  # step-00000100; a copy named step-00000100.bak is not one


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


# --------------------------------------------------------------------------------------------- RNG
def rng_state(device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """Every RNG of this process: tensors (torch) and JSON (Python, NumPy)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(device)
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    return tensors, {
        "python": [version, list(state), gauss],
        "numpy": [
            np_state[0],
            np_state[1].tolist(),
            *[v.item() if hasattr(v, "item") else v for v in np_state[2:]],
        ],
    }


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict, device: torch.device) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["torch_cuda"], device)
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, *rest = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))


# ----------------------------------------------------------------------------------- model state
def fqn(name: str) -> str:
    """A parameter's name without the FSDP and checkpoint wrappers (what get_state_dict would call it)."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def _trainable_state(model, optimizer, fresh: bool = False):
    """The adapters and their AdamW state, as the very tensors training uses, by name: DCP saves from them and
    loads into them in place.

    The adapters are whole and equal on every rank (parallel.py), so DCP writes them once, and no FSDP
    state-dict machinery is involved: FSDP1's sharded state dict unshards every unit and copies each rank's
    slice of every frozen 4-bit weight before `ignore_frozen_params` drops them (measured: +5 GiB per GPU for
    a moment at every save of the 80-layer 70B, enough to fail a save on 24 GB GPUs)."""
    if is_engine(model):  # partitioned: assembled whole (zero3.py)
        from shardtune import zero3

        return zero3.trainable_state(model, optimizer, fresh=fresh)
    if fresh and not optimizer.state:  # a fresh optimizer (a resume): give DCP state tensors to load into
        _init_optim_state(optimizer)
    # (not when saving: an optimizer that has not stepped yet, as fp16's loss scaler skips the steps whose
    # gradients overflow, is saved without state; initializing it would count a step AdamW never took)
    names = {p: fqn(n) for n, p in model.named_parameters() if p.requires_grad}
    msd = {names[p]: p.detach() for p in names}
    osd = {
        "state": {names[p]: state for p, state in optimizer.state.items()},
        "param_groups": [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [names[p] for p in g["params"]]}
            for g in optimizer.param_groups
        ],
    }
    return msd, osd


class CheckpointManager:
    """Saves and finds checkpoints of one run; every rank calls save/load/latest together.

    Its waits (and DCP's own coordination) run in a separate gloo group whose timeout is
    train.save_timeout_minutes: a slow filesystem delays a save, it cannot trip the training collectives'
    timeout (parallel.timeout_minutes) and kill the job mid-save."""

    def __init__(self, directory: Path, keep_last: int, dist: DistInfo, timeout_minutes: float = 120.0):
        self.dir = directory
        self.keep_last = keep_last
        self.dist = dist
        self.group = side_group(timeout_minutes)

    # -------------------------------------------------------------------------------------- save
    def save(self, step: int, model, optimizer, train_state: dict, files: dict[str, bytes]) -> Path:
        """Write checkpoint `step`. `train_state` (rank 0's) and `files` (extra small files) go in as-is."""
        t0 = time.perf_counter()
        final = self.dir / f"step-{step:08d}"
        tmp = self.dir / f".tmp-step-{step:08d}"
        if self.dist.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".tmp-step-*"):  # a save that was killed before its rename
                shutil.rmtree(stale, ignore_errors=True)
            self.recover()
            tmp.mkdir()
        barrier(self.group)
        msd, osd = _trainable_state(model, optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp), process_group=self.group)
        tensors, plain = rng_state(self.dist.device)
        rank_file = tmp / f"rank{self.dist.rank:05d}"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(rank_file) + ".rng.safetensors")
        write_atomic(Path(str(rank_file) + ".rng.json"), json.dumps(plain).encode())
        with open(str(rank_file) + ".rng.safetensors", "rb") as f:
            os.fsync(f.fileno())
        if self.dist.is_main:
            state = {
                **train_state,
                "step": step,
                "world_size": self.dist.world_size,
                "format": FORMAT_VERSION,
                "optimizer_state": bool(osd["state"]),
            }
            write_atomic(tmp / "train_state.json", json.dumps(state, indent=1).encode())
            for name, data in files.items():
                write_atomic(tmp / name, data)
        faults.inject("save", self.dist.rank, step)
        barrier(self.group)
        if self.dist.is_main:
            manifest = {
                "format": FORMAT_VERSION,
                "step": step,
                "world_size": self.dist.world_size,
                "config_hash": train_state.get("config_hash"),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "files": {
                    p.name: {"size": p.stat().st_size, "sha256": sha256(p)}
                    for p in sorted(tmp.iterdir())
                    if p.is_file() and not p.name.startswith(".tmp")
                },
            }
            write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
            _fsync_dir(tmp)
            old = self.dir / f".old-{final.name}"
            if final.exists():  # re-saving a step: the old one is set aside until the new one is in place
                os.rename(final, old)
            os.rename(tmp, final)
            _fsync_dir(self.dir)
            shutil.rmtree(old, ignore_errors=True)
            self._purge(step)
        barrier(self.group)
        size = sum(p.stat().st_size for p in final.iterdir()) / 2**20 if self.dist.is_main else 0.0
        peak = gpu_peak_gib(self.dist.device)
        log.info(
            "checkpoint step %d saved to %s (%.1f MiB) in %.1fs%s",
            step,
            final,
            size,
            time.perf_counter() - t0,
            f" (peak GPU mem so far {peak:.2f} GiB)" if peak else "",
        )
        return final

    def recover(self) -> None:
        """Finish a replacement of a checkpoint that was killed between its two renames (rank 0): the old one
        goes back under its name where the new one is not in place, else it goes."""
        for old in self.dir.glob(".old-step-*"):
            back = self.dir / old.name.removeprefix(".old-")
            if back.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(old, back)

    def _purge(self, step: int) -> None:
        """Keep the checkpoint just written (`step`) and the keep_last - 1 newest intact ones before it; delete
        the older ones. Newer ones are not this run's path (resume_point sets them aside) and stay."""
        older = [p for p in self.checkpoints() if step_of(p) < step]
        intact = [p for p in older if verify_checkpoint(p, checksums=False) is None]
        kept = set(intact[len(intact) - (self.keep_last - 1) :]) if self.keep_last > 1 else set()
        for old in older:
            if old not in kept:
                shutil.rmtree(old, ignore_errors=True)

    # -------------------------------------------------------------------------------------- find
    def checkpoints(self) -> list[Path]:
        """step-* directories, oldest first."""
        return list_checkpoints(self.dir)

    def latest(self, verify: bool = True) -> Path | None:
        """The newest checkpoint that verifies (decided on rank 0, agreed by all); broken ones are reported."""
        chosen = newest_intact(self.dir, verify) if self.dist.is_main else None
        chosen = broadcast_object(str(chosen) if chosen else None, group=self.group)
        return Path(chosen) if chosen else None

    # -------------------------------------------------------------------------------------- load
    def load(self, path: Path, model, optimizer) -> dict:
        """Restore weights, optimizer and this rank's RNGs from `path`; returns the train state."""
        t0 = time.perf_counter()
        train_state = json.loads((path / "train_state.json").read_text())
        msd, osd = _trainable_state(model, optimizer, fresh=True)
        stepped = train_state.get("optimizer_state", True)
        if not stepped:  # saved before the optimizer's first step: it starts without state, as it was
            osd = {"param_groups": osd["param_groups"]}
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(path), process_group=self.group)  # tensors: in place
        if not stepped:
            optimizer.state.clear()
        if is_engine(model):
            from shardtune import zero3

            zero3.load_trainable_state(model, state["model"], state["optim"])
        for group, loaded in zip(optimizer.param_groups, state["optim"]["param_groups"], strict=True):
            group.update({k: v for k, v in loaded.items() if k != "params"})  # lr etc.: plain values
        rank_file = path / f"rank{self.dist.rank:05d}"
        if Path(str(rank_file) + ".rng.json").is_file():
            set_rng_state(
                load_file(str(rank_file) + ".rng.safetensors"),
                json.loads(Path(str(rank_file) + ".rng.json").read_text()),
                self.dist.device,
            )
        else:  # resumed onto more processes than saved it: new ranks start their RNGs from the seed
            log.warning(
                "no RNG state for rank %d in %s (saved by %d processes)",
                self.dist.rank,
                path,
                train_state["world_size"],
            )
        log.info("checkpoint %s loaded in %.1fs", path.name, time.perf_counter() - t0)
        return train_state


def list_checkpoints(directory: Path) -> list[Path]:
    """The step-* directories in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = (p for p in directory.glob("step-*") if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name))
    return sorted(found, key=step_of)


def newest_intact(directory: Path, checksums: bool = True) -> Path | None:
    """The newest checkpoint in `directory` that verifies; the broken ones skipped are logged with why."""
    for path in reversed(list_checkpoints(directory)):
        problem = verify_checkpoint(path, checksums=checksums)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def checkpoint_step(path: Path) -> int:
    """The step a (verified) checkpoint was saved at, from its manifest (its directory may have been renamed)."""
    return json.loads((path / MANIFEST).read_text())["step"]


def verify_checkpoint(path: Path, checksums: bool = True) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong (naming the file)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        return f"manifest.json is not valid JSON ({e})"
    for name, meta in manifest["files"].items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["size"]:
            return f"{name} is {f.stat().st_size} bytes, the manifest says {meta['size']} (truncated?)"
        if checksums and sha256(f) != meta["sha256"]:
            return f"{name} does not match its checksum (corrupted)"
    return None


# ------------------------------------------------------------------------------------------- resume policy
# Settings whose change makes a resumed run differ from an uninterrupted one. Anything else may change
# between a save and a resume: more steps, a new learning rate or schedule, eval, save or log cadence,
# micro-batch size and number of processes (the global batch and the data order stay the same).
EXACTNESS_KEYS = (
    "model",
    "quant",
    "lora",
    "data",
    "train.seed",
    "train.global_batch_size",
    "parallel.mixed_precision",
)


def _flatten(prefix: str, value) -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(f"{prefix}.{k}", v))
        return out
    return {prefix: value}


def _select(cfg_dict: dict, key: str):
    for part in key.split("."):
        cfg_dict = cfg_dict[part]
    return cfg_dict


def exactness_differences(saved: dict, current: dict) -> list[str]:
    """Settings that differ between a checkpoint's config and this run's, among EXACTNESS_KEYS."""
    diffs = []
    for key in EXACTNESS_KEYS:
        a, b = _flatten(key, _select(saved, key)), _flatten(key, _select(current, key))
        diffs += [
            f"{k}: checkpoint {a.get(k)!r} -> now {b.get(k)!r}"
            for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)
        ]
    return diffs


def resume_point(mode: str, manager: CheckpointManager, config_yaml: str) -> Path | None:
    """The checkpoint to start from (train.resume: auto, never or a path), after checking that resuming
    from it continues the run exactly; None to start fresh."""
    if manager.dist.is_main and manager.dir.is_dir():
        manager.recover()
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
