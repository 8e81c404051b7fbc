"""A checkpoint directory on disk: what makes one complete (its manifest, written last), how it is verified, and
which are there.

    run_dir/checkpoints/step-00000100/
        __0_0.distcp, __1_0.distcp, .metadata   LoRA weights + optimizer state (DCP)
        train_state.json                        step, counters, LR scheduler, loss scaler
        rank00000.rng.safetensors / .json       every RNG of every rank (torch CPU/CUDA, NumPy, Python)
        config.yaml, adapter_config.json, model_config.json   what is needed to resume or export alone
        manifest.json                           written last: format, step, world size, files with sizes and sha256

A checkpoint is written into `.tmp-step-N`, fsynced, and renamed only after its manifest is in place, so a
directory named `step-N` is complete by construction (manager.py writes it). No file here is unpickled except
DCP's own metadata.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from shardtune.files import fsync_dir, sha256, write_atomic

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # raised when a checkpoint's layout changes so that an older shardtune cannot read it


CHECKPOINT_NAME = re.compile(r"step-(\d+)")  # step-00000100; a copy named step-00000100.bak is not one


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


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
    if manifest.get("format", 1) > FORMAT_VERSION:
        return (
            f"written by a newer shardtune (checkpoint format {manifest['format']}; this one reads up to "
            f"{FORMAT_VERSION}): upgrade shardtune to resume it"
        )
    for name, meta in manifest["files"].items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["size"]:
            return f"{name} is {f.stat().st_size} bytes, the manifest says {meta['size']} (truncated?)"
        if checksums and sha256(f) != meta["sha256"]:
            return f"{name} does not match its checksum (corrupted)"
    return None


def write_manifest(tmp: Path, step: int, world_size: int) -> None:
    """The manifest of the files in `tmp`, written last (the checkpoint counts from here on)."""
    manifest = {
        "format": FORMAT_VERSION,
        "step": step,
        "world_size": world_size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": {
            p.name: {"size": p.stat().st_size, "sha256": sha256(p)}
            for p in sorted(tmp.iterdir())
            if p.is_file() and not p.name.startswith(".tmp")
        },
    }
    write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    fsync_dir(tmp)


def commit(tmp: Path, final: Path) -> None:
    """Rename the finished `tmp` into place; a checkpoint of the same step is set aside until the new one is
    there (recover() finishes a replacement killed between the two renames)."""
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover(directory: Path) -> None:
    """Finish a replacement of a checkpoint that was killed between its two renames (rank 0): the old one goes
    back under its name where the new one is not in place, else it goes."""
    for old in directory.glob(".old-step-*"):
        back = directory / old.name.removeprefix(".old-")
        if back.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, back)
