"""Process-group setup and teardown, and the few collectives the loop needs.

One pair, `init_distributed()` / `teardown()`. Under `torchrun` or `accelerate launch` the environment
(RANK, WORLD_SIZE, MASTER_ADDR, ...) describes the group; a plain `python recipe.py` gets a group of one,
so that a single process runs the same FSDP code path as many.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from shardtune.errors import ConfigError


def launcher_restarts() -> int:
    """How many times the launcher may start the processes again after one fails (`torchrun --max-restarts`,
    `accelerate launch --max_restarts`); 0 outside them."""
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))


def machine_count(world_size: int, per_machine: list[int]) -> int:
    """Machines in a job of `world_size` processes, from each machine's process count (LOCAL_WORLD_SIZE);
    machines of unequal sizes are counted as one (planning then never shards within a machine only)."""
    sizes = set(per_machine)
    return world_size // sizes.pop() if len(sizes) == 1 else 1


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @classmethod
    def alone(cls, device: torch.device) -> DistInfo:
        """One process on `device`, with nothing to shard (a reference model beside a sharded one, tests)."""
        return cls(rank=0, world_size=1, local_rank=0, local_world_size=1, device=device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_expandable_segments() -> None:
    """Let the CUDA caching allocator grow segments in place, unless the user configured it
    (PYTORCH_CUDA_ALLOC_CONF). With fixed-size segments, a run near the memory limit (a 70B layer's
    activations for one row are a few GiB of odd sizes) fragments them; the allocator then stalls a step to
    free its whole cache and retry (`alloc_retries` in the step metrics). Set before the first allocation, and
    in the environment too so that processes this one starts inherit it."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        # (torch >= 2.9; before, torch.cuda.memory's, deprecated since)
        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
        (setter or torch.cuda.memory._set_allocator_settings)("expandable_segments:True")


def init_distributed(
    device: str = "auto", timeout_minutes: float = 30.0, gpu_memory_limit_gib: float | None = None
) -> DistInfo:
    """Join (or create) the default process group and pick this process's device (optionally capping how
    much GPU memory this process may allocate)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("parallel.device=cuda but CUDA is not available on this machine")
        use_expandable_segments()
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        if gpu_memory_limit_gib is not None:
            total = torch.cuda.get_device_properties(dev).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_memory_limit_gib * 2**30 / total), dev)
    else:
        dev = torch.device("cpu")
    info = DistInfo(rank, world, local_rank, local_world, dev)
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # a plain `python recipe.py`: a group of one
            os.environ.update(
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1"
            )
        timeout = datetime.timedelta(minutes=timeout_minutes)
        store = _restart_store(world, timeout)
        dist.init_process_group(
            backend=info.backend,
            timeout=timeout,
            device_id=dev if use_cuda else None,
            **({} if store is None else {"store": store, "rank": rank, "world_size": world}),
        )
    return info


def _restart_store(world: int, timeout: datetime.timedelta) -> dist.Store | None:
    """The store for a group restarted by torchrun (`--max-restarts`), or None to let torch make its own.
    torchrun's workers share the launcher's store, and torch (2.11 to 2.13) reuses it across restarts under the
    same keys: a restarted worker reads the dead workers' addresses from the first attempt and fails to connect
    (gloo "connectFullMesh ... Connection refused"; NCCL the same, pytorch/pytorch#167288), so a crash could
    never be retried. On one machine each restart keeps its keys apart under its own prefix. Across machines
    the launchers' restart counts differ (one whose own workers did not fail restarts them without counting),
    so no prefix can agree: there the launchers must give every attempt a store of its own, which the c10d
    rendezvous does with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launch/node.sh sets it); without it, refused
    at the start rather than at the first crash."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1:
        if launcher_restarts() > 0:
            raise ConfigError(
                "torchrun --max-restarts across machines: the restarted workers would reuse the first attempt's "
                "store and fail to connect. Launch every machine's torchrun with --rdzv-backend c10d and "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment (launch/node.sh does), or with "
                "--max-restarts 0."
            )
        return None
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart == 0:
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"shardtune/restart-{restart}", store)


def teardown(failed: bool = False) -> None:
    """Leave the process group. After a failure on one rank (an out-of-memory error, a bad batch) the others
    are still waiting inside a collective for it; NCCL's graceful destroy would wait for them in turn, and both
    would hang until the collective timeout (30 min). So a failed NCCL rank aborts its communicators and
    exits at once; the launcher then stops the others."""
    if not dist.is_initialized():
        return
    if failed and dist.get_backend() == "nccl":
        with contextlib.suppress(Exception):  # a private API: whatever it does, the exit must not block
            dist.distributed_c10d._abort_process_group()
        return
    dist.destroy_process_group()


def exit_process(code: object) -> NoReturn:
    """End this process (a launcher's worker, its process group torn down) with `code` as sys.exit would (None:
    0; a message: printed, 1), without Python's finalization. The gloo backend's worker threads outlive
    destroy_process_group (torch's FSDP and checkpoint modules, imported once a group exists, keep references to
    it), and one that frees a finished collective's tensors while the interpreter finalizes takes the GIL there
    and aborts the process: 'terminate called without an active exception', SIGABRT, a finished run reported
    as crashed (1 in 20-40 two-process runs on a loaded 2-core CPU; pytorch/pytorch#179291). What the run
    writes is closed before this; the log handlers and the standard streams are flushed here."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0 if code is None else int(code))  # type: ignore[arg-type]


def barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars across ranks in one collective (float64, so token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def gather_object(obj, group=None) -> list:
    """Every rank's `obj`, in rank order, on every rank (of `group`, by default all)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [obj]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, src: int = 0, group=None):
    """rank `src`'s Python object, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=group)
    return holder[0]


def side_group(timeout_minutes: float):
    """A gloo group over all ranks with its own timeout, for waits that may legitimately be long (saving to
    slow storage) without loosening the timeout that catches a hung training collective."""
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
