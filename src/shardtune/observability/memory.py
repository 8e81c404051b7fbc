"""Memory: the machine's host RAM, peak and current host RAM of this process, peak GPU memory, the CUDA allocator's retries, and a
phase-by-phase trace of one step (SHARDTUNE_MEMORY_TRACE)."""

from __future__ import annotations

import os
import resource
import sys

import torch


def host_peak_gib() -> float:
    """Peak resident memory of this process (GiB)."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def host_rss_gib() -> float:
    """Resident memory of this process now (GiB); Linux /proc, else the peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**30
    except OSError:
        return host_peak_gib()


def host_total_bytes() -> int:
    """The machine's physical memory (what offloaded activations' pinned memory is weighed against)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gpu_peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def alloc_retries(device: torch.device) -> int:
    """How many times so far the CUDA caching allocator found no free block, emptied its cache and retried:
    each one stalls the step (memory is near the limit or fragmented)."""
    return torch.cuda.memory_stats(device).get("num_alloc_retries", 0) if device.type == "cuda" else 0


class MemoryTrace:
    """SHARDTUNE_MEMORY_TRACE=STEP (1-based): GPU memory of that step phase by phase (allocated at the end
    of each phase, and the phase's own peak), logged by every rank, to check `shardtune plan`'s parts.
    Resets CUDA's peak counter between phases, so the run's reported peak starts over after that step."""

    def __init__(self, rank: int, device: torch.device):
        spec = os.environ.get("SHARDTUNE_MEMORY_TRACE")
        self.step = int(spec) if spec and device.type == "cuda" else -1
        self.rank, self.device, self.rows = rank, device, []

    def mark(self, step: int, phase: str) -> None:
        """Close `phase` of 0-based `step`."""
        if step + 1 != self.step:
            return
        torch.cuda.synchronize(self.device)
        now = torch.cuda.memory_allocated(self.device) / 2**30
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.rows.append(f"{phase} {now:.2f}/{peak:.2f}")
        torch.cuda.reset_peak_memory_stats(self.device)
        if phase == "optimizer":
            print(
                f"[shardtune rank {self.rank}] memory GiB now/peak by phase: {', '.join(self.rows)}",
                flush=True,
            )
