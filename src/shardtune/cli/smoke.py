"""`shardtune doctor RECIPE --smoke`: the whole life of a run, in minutes, on the hardware it will run on.

Two short runs of the recipe as given (its data, model and overrides), each a real launch of `torchrun`:
load, 2 steps, a checkpoint; then the same command again, which resumes from that checkpoint and trains 1
step. Each stage is reported pass/fail with what the run said when it failed, so a broken data path, a
model that does not load, a save that cannot be written or a resume that does not continue are found
before the allocation is spent.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from shardtune.cli.spawn import failure, torchrun
from shardtune.observability.metrics import train_steps

# A small slice of the recipe: two global batches, no generation, the eval kept to a row per process.
SMOKE = ["train.save_every=2", "eval.every=0", "eval.samples=0", "eval.questions=[]", "train.log_every=1"]


@dataclass
class Stage:
    name: str
    ok: bool
    detail: str


def _launch(recipe: str, overrides: list[str], procs: int, steps: int, out: Path, timeout_s: float):
    args = [recipe, *overrides, *SMOKE, f"eval.max_rows={procs}", f"train.max_steps={steps}"]
    args += [f"train.output_dir={out}", "train.run_name=smoke"]
    log_path = out / f"smoke-{steps}-steps.log"
    t0 = time.perf_counter()
    rc = torchrun(args, procs, log_path, timeout_s)
    return rc, log_path.read_text(errors="replace"), time.perf_counter() - t0


def _steps(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in train_steps(run)}


def run_smoke(recipe: str, overrides: list[str], procs: int, timeout_s: float = 900) -> list[Stage]:
    stages: list[Stage] = []
    with tempfile.TemporaryDirectory(prefix="shardtune-smoke-") as tmp:
        run = Path(tmp) / "smoke"
        rc, log, took = _launch(recipe, overrides, procs, 2, Path(tmp), timeout_s)
        loaded = next((ln for ln in log.splitlines() if "load:" in ln), None)
        stages.append(Stage("load data and model", loaded is not None, loaded or failure(log)))
        steps = _steps(run)
        trained = [s for s in (1, 2) if s in steps and math.isfinite(steps[s])]
        stages.append(Stage("train 2 steps", trained == [1, 2], f"losses {steps}" if steps else failure(log)))
        saved = (run / "checkpoints" / "step-00000002" / "manifest.json").is_file()
        stages.append(
            Stage(
                "save a checkpoint",
                saved and rc == 0,
                f"{took:.0f}s for load + 2 steps + save" if saved and rc == 0 else failure(log),
            )
        )
        if not saved:
            return stages
        rc, log, took = _launch(recipe, overrides, procs, 3, Path(tmp), timeout_s)
        resumed = next((ln for ln in log.splitlines() if "resumed from" in ln), None)
        stages.append(
            Stage("resume from it", resumed is not None and "step 2" in resumed, resumed or failure(log))
        )
        steps = _steps(run)
        ok = rc == 0 and 3 in steps and math.isfinite(steps[3])
        stages.append(Stage("train 1 more step", ok, f"step 3 loss {steps.get(3)}" if ok else failure(log)))
    return stages


def report(stages: list[Stage]) -> tuple[str, bool]:
    lines = [f"  {'PASS' if s.ok else 'FAIL'}  {s.name}: {s.detail}" for s in stages]
    ok = len(stages) == 5 and all(s.ok for s in stages)
    return "smoke test (load, 2 steps, save, resume, 1 step):\n" + "\n".join(lines), ok
