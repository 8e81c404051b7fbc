"""The checkpoint manager: saves and restores a run's state (the backend's adapters and optimizer state, the
stateful objects registered with it, every process's RNGs) as one atomic, verified checkpoint directory
(store.py), keeps the newest ones and never overwrites the only good one.

A save is a DCP save of the trainable state (one shard per rank where the backend partitions it), each rank's
RNGs, rank 0's train_state.json (the registered objects' state_dicts), the files the run adds (its config,
the adapter's config), then the manifest, then the rename. Load verifies, restores everything in place and
returns the saved train_state.json. The frozen 4-bit base is never saved: it is the model checkpoint the run
started from.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from shardtune import faults
from shardtune.checkpoint.store import (
    commit,
    list_checkpoints,
    newest_intact,
    recover,
    step_of,
    verify_checkpoint,
    write_manifest,
)
from shardtune.errors import DiskFull
from shardtune.files import free_bytes, mib, out_of_space, tree_bytes, write_atomic
from shardtune.observability.memory import gpu_peak_gib
from shardtune.parallel.distributed import DistInfo, barrier, broadcast_object, gather_object, side_group

if TYPE_CHECKING:
    from shardtune.parallel.backend import Backend

log = logging.getLogger(__name__)

# room a save needs beyond the last checkpoint's size (its own size may vary a little; status.json, metrics)
SAVE_SLACK = 1 << 20


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


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


class CheckpointManager:
    """Saves and finds checkpoints of one run; every rank calls save/load/latest together.

    `track` registers what a checkpoint holds: the backend (the adapters and their optimizer state, by name),
    the run's TrainState, whose fields go at the top of train_state.json, and other stateful objects (the
    LR scheduler, the loss scaler), each under its name there.

    Its waits (and DCP's own coordination) run in a separate gloo group whose timeout is
    train.save_timeout_minutes: a slow filesystem delays a save, it cannot trip the training collectives'
    timeout (parallel.timeout_minutes) and kill the job mid-save."""

    def __init__(
        self,
        directory: Path,
        keep_last: int,
        dist: DistInfo,
        timeout_minutes: float = 120.0,
        every_minutes: float | None = None,
    ):
        self.dir = directory
        self.keep_last = keep_last
        self.dist = dist
        self.group = side_group(timeout_minutes)
        self.every_minutes = every_minutes
        self.last_save_time = time.monotonic()
        self.backend: Backend | None = None
        self.train_state: Stateful | None = None
        self.states: dict[str, Stateful | None] = {}
        # the newest checkpoint this run saved or resumed from (every rank), and its size in bytes (rank 0):
        # what the next save needs
        self.last_path: Path | None = None
        self.last_size = 0

    def track(self, backend: Backend, train_state: Stateful, **states: Stateful | None) -> None:
        self.backend, self.train_state, self.states = backend, train_state, states

    def timer_due(self) -> bool:
        """train.save_every_minutes have passed since the last save (or the start)."""
        minutes = self.every_minutes
        return minutes is not None and time.monotonic() - self.last_save_time >= 60 * minutes

    # -------------------------------------------------------------------------------------- save
    def save(self, step: int, files: dict[str, bytes]) -> Path:
        """Write checkpoint `step`: the tracked state, and `files` (extra small files, rank 0's) as they are.
        Refused before anything is written where the last checkpoint's size does not fit in the free space; a
        save that fails on any rank (a full disk) is removed, and every rank raises (DiskFull for a full disk)."""
        t0 = time.perf_counter()
        final = self.dir / f"step-{step:08d}"
        tmp = self.dir / f".tmp-step-{step:08d}"
        self._check_room(step)
        if self.dist.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".tmp-step-*"):  # a save that was killed before its rename
                shutil.rmtree(stale, ignore_errors=True)
            recover(self.dir)
            tmp.mkdir()
        barrier(self.group)
        failure = self._write(tmp, step, files)
        faults.inject("save", self.dist.rank, step)
        self._agree(failure, step, tmp)  # (every rank has written its part)
        if self.dist.is_main:
            try:
                write_manifest(tmp, step, self.dist.world_size)
                commit(tmp, final)
            except Exception as e:
                failure = e
        self._agree(failure, step, tmp)
        if self.dist.is_main:
            self._purge(step)
        self.last_save_time = time.monotonic()
        self.last_path = final
        self.last_size = tree_bytes(final) if self.dist.is_main else 0
        peak = gpu_peak_gib(self.dist.device)
        log.info(
            "checkpoint step %d saved to %s (%.1f MiB) in %.1fs%s",
            step,
            final,
            self.last_size / 2**20,
            time.perf_counter() - t0,
            f" (peak GPU mem so far {peak:.2f} GiB)" if peak else "",
        )
        return final

    def _write(self, tmp: Path, step: int, files: dict[str, bytes]) -> BaseException | None:
        """This rank's part of the checkpoint in `tmp`; the error that stopped it, or None."""
        try:
            msd, osd = self.backend.trainable_state()
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp), process_group=self.group)
            self._save_rng(tmp)
            if self.dist.is_main:
                state = {
                    **self.train_state.state_dict(),
                    **{name: s.state_dict() if s is not None else None for name, s in self.states.items()},
                    "step": step,
                    "world_size": self.dist.world_size,
                    "optimizer_state": bool(osd["state"]),
                }
                write_atomic(tmp / "train_state.json", json.dumps(state, indent=1).encode())
                for name, data in files.items():
                    write_atomic(tmp / name, data)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # (DCP's CheckpointException is a BaseException)
            return e
        return None

    def _agree(self, failure: BaseException | None, step: int, tmp: Path) -> None:
        """Every rank learns whether any failed to save (one gather in the save group, in place of a barrier).
        If one did, rank 0 removes the torn save before anything else is written, and every rank raises:
        DiskFull (one line: where, how much, the fix) when a disk was full, else the error."""
        # out of space: said so, or said otherwise with the disk full (torch.save's zip writer reports a short
        # write as "unexpected pos")
        full = failure is not None and (out_of_space(failure) or free_bytes(self.dir) < SAVE_SLACK)
        report = None if failure is None else (self.dist.rank, full, _one_line(failure))
        failed = [r for r in gather_object(report, group=self.group) if r is not None]
        if not failed:
            return
        written, free = (tree_bytes(tmp), free_bytes(self.dir)) if self.dist.is_main else (0, 0)
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier(self.group)  # removed before any rank goes on to write (status.json: rank 0)
        if any(full for _, full, _ in failed):
            needed = f"it needs more than the {mib(written)} it had written when the disk filled (removed)"
            raise DiskFull(self._no_room(step, needed, free)) from failure
        if failure is not None:
            raise failure
        rank, _, text = failed[0]
        raise RuntimeError(f"checkpoint step {step} not saved: rank {rank} failed ({text})")

    def _check_room(self, step: int) -> None:
        """Refuse a save that cannot fit, before anything is written: the last checkpoint's size against the
        free space, read by rank 0 for every rank. (A run's first save has no size to go by.)"""
        problem = None
        if self.dist.is_main and self.last_size:
            needed, free = self.last_size + SAVE_SLACK, free_bytes(self.dir)
            if free < needed:
                problem = self._no_room(step, f"it needs about {mib(needed)} (the last one's size)", free)
        problem = broadcast_object(problem, group=self.group)
        if problem:
            raise DiskFull(problem)

    def _no_room(self, step: int, needed: str, free: int) -> str:
        resume = (
            f"it continues from {self.last_path}" if self.last_path else "no checkpoint yet: it starts over"
        )
        fewer = (
            f", lower train.keep_last (now {self.keep_last})" if self.last_path and self.keep_last > 1 else ""
        )
        return (
            f"no room for checkpoint step-{step:08d} in {self.dir}: {needed}, {mib(free)} free there. Free space "
            f"on that disk{fewer} or set train.output_dir to a larger disk, then run the same command again "
            f"({resume})"
        )

    def _save_rng(self, tmp: Path) -> None:
        tensors, plain = rng_state(self.dist.device)
        rank_file = tmp / f"rank{self.dist.rank:05d}"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(rank_file) + ".rng.safetensors")
        write_atomic(Path(str(rank_file) + ".rng.json"), json.dumps(plain).encode())
        with open(str(rank_file) + ".rng.safetensors", "rb") as f:
            os.fsync(f.fileno())

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
    def load(self, path: Path) -> dict:
        """Restore the tracked state and this rank's RNGs from `path`; returns its train_state.json."""
        t0 = time.perf_counter()
        saved = json.loads((path / "train_state.json").read_text())
        backend, optimizer = self.backend, self.backend.optimizer
        msd, osd = backend.trainable_state(fresh=True)
        stepped = saved.get("optimizer_state", True)
        if not stepped:  # saved before the optimizer's first step: it starts without state, as it was
            osd = {"param_groups": osd["param_groups"]}
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(path), process_group=self.group)  # tensors: in place
        if not stepped:
            optimizer.state.clear()
        backend.load_trainable_state(state["model"], state["optim"])
        for group, loaded in zip(optimizer.param_groups, state["optim"]["param_groups"], strict=True):
            group.update({k: v for k, v in loaded.items() if k != "params"})  # lr etc.: plain values
        self._load_rng(path, saved["world_size"])
        self.last_path, self.last_size = path, tree_bytes(path) if self.dist.is_main else 0
        self.train_state.load_state_dict(saved)
        for name, s in self.states.items():
            if s is not None:
                s.load_state_dict(saved[name])
        log.info("checkpoint %s loaded in %.1fs", path.name, time.perf_counter() - t0)
        return saved

    def _load_rng(self, path: Path, saved_world_size: int) -> None:
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
                saved_world_size,
            )


def _one_line(e: BaseException) -> str:
    """An error in a line: its type and the first line of its message (DCP's runs to a traceback per rank)."""
    while isinstance(e, BaseException) and hasattr(e, "failures") and e.failures:
        e = next(iter(e.failures.values()))[0]
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
