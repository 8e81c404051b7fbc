"""Where a step's time goes: torch.profiler over a few training steps, switched on from the environment.

    SHARDTUNE_PROFILE="4:5:/tmp/prof"   profile steps 4 and 5 (1-based, after warm-up) into /tmp/prof

Each rank writes rank<R>.json (a Chrome/Perfetto trace) and rank<R>.txt (the ops by total device time, then
by CPU time: collectives, kernels, Python-side hook overhead). Unset in normal runs; costs nothing then.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class StepProfiler:
    def __init__(self, rank: int):
        spec = os.environ.get("SHARDTUNE_PROFILE")
        self.rank, self.prof = rank, None
        if not spec:
            self.first = self.last = -1
            return
        first, last, out = spec.split(":", 2)
        self.first, self.last, self.out = int(first), int(last), Path(out)

    def before(self, step: int) -> None:
        """`step` is 1-based: the step about to run."""
        if step != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities, record_shapes=False, with_stack=False)
        self.prof.__enter__()

    def after(self, step: int) -> None:
        if self.prof is None or step != self.last:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.out / f"rank{self.rank}.json"))
        events = self.prof.key_averages()
        device = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        text = (
            events.table(sort_by=device, row_limit=40)
            + "\n"
            + events.table(sort_by="cpu_time_total", row_limit=40)
        )
        (self.out / f"rank{self.rank}.txt").write_text(text)
        log.info("profile of steps %d-%d written to %s", self.first, self.last, self.out)
        self.prof = None


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
