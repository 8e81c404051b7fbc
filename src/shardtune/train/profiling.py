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
