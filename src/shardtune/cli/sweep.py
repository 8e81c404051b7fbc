"""A grid of configurations trained one after another in one launch, summarized in one table.

    recipes/product_descriptions.py --sweep                      # the recipe's own grid
    recipes/tiny.py --sweep lora.r=8,16 optim.lr=1e-3,3e-3       # any grid from the command line

Each combination is its own run directory under <run>/sweep/, so it resumes and exports like any run.
"""

from __future__ import annotations

import gc
import itertools
import json
import re
from pathlib import Path
from typing import Any

from shardtune.config import Config, apply_overrides, check_names, run_directory
from shardtune.errors import ConfigError
from shardtune.parallel.distributed import DistInfo
from shardtune.train.report import METRIC_NAMES, sample_score, score_text
from shardtune.train.stopping import STOP_FILE


def slug(assignment: dict[str, Any]) -> str:
    """A directory name for one combination, e.g. 'lora.r=8,lora.target_modules=q_proj+v_proj'."""

    def text(v):
        return "+".join(map(str, v)) if isinstance(v, list | tuple) else str(v)

    return ",".join(f"{k}={re.sub(r'[^A-Za-z0-9_.+-]', '_', text(v))}" for k, v in assignment.items())


def expand(cfg: Config, grid: dict[str, list]) -> list[tuple[dict[str, Any], Config]]:
    """Every combination of the grid's values as (assignment, validated Config)."""
    keys = list(grid)
    out = []
    for values in itertools.product(*(grid[k] for k in keys)):
        assignment = dict(zip(keys, values, strict=True))
        point = apply_overrides(cfg, assignment, f"sweep {slug(assignment)}")
        try:
            check_names(point)  # a swept lora.target_modules, model.shape
        except ConfigError as e:
            raise ConfigError(f"sweep {slug(assignment)}: {e}") from None
        out.append((assignment, point))
    return out


def run_grid(cfg: Config, grid: dict[str, list], dist: DistInfo, name: str, stop=None) -> list[dict]:
    """Train every combination in turn. The sweep's directory is what a launcher sees as the run: its STOP
    file stops whichever run is training, and its status.json says where the sweep is (slurm/train.sh reads
    both there, and requeues an interrupted sweep: the same command resumes that run, then the rest)."""
    from shardtune.train.run import train, write_status

    base = run_directory(cfg.train, name)
    results = []
    try:
        for assignment, sub in expand(cfg, grid):
            point = slug(assignment)
            done = _finished(base / "sweep" / point)
            if done is not None:  # an earlier start of the sweep trained it (then stopped in a later run)
                results.append({**{k: sub_value(v) for k, v in assignment.items()}, **done})
                continue
            if dist.is_main:
                base.mkdir(parents=True, exist_ok=True)
                write_status(base, "running", sweep_run=point, done=len(results))
            summary = train(sub, dist, name, stop, stop_file=base / STOP_FILE, sub=f"sweep/{point}")
            gc.collect()  # this run's model is held in reference cycles: freed now, before the next one is built
            results.append({**{k: sub_value(v) for k, v in assignment.items()}, **summary})
            if summary["status"] == "interrupted":
                if dist.is_main:
                    write_status(
                        base,
                        "interrupted",
                        sweep_run=point,
                        step=summary["step"],
                        checkpoint=summary["checkpoint"],
                        next="run the same command again: it resumes this run, then trains the rest",
                    )
                return results
    except BaseException as e:
        if dist.is_main and base.is_dir():
            write_status(base, "failed", error=f"{type(e).__name__}: {e}", done=len(results))
        raise
    if dist.is_main:
        table = format_table(grid, results)
        out = base / "sweep"
        (out / "summary.md").write_text(table + "\n")
        (out / "summary.json").write_text(json.dumps(results, indent=1))
        (base / STOP_FILE).unlink(missing_ok=True)  # a stop asked after the last run is moot
        write_status(base, "complete", runs=len(results), summary=str(out / "summary.json"))
        print(f"\nsweep over {', '.join(grid)} ({len(results)} runs):\n{table}\nwritten to {out}/summary.md")
    return results


def _finished(run_dir: Path) -> dict | None:
    """The summary of a sweep's run that completed, or None (every rank reads the same files)."""
    try:
        if json.loads((run_dir / "status.json").read_text())["status"] == "complete":
            return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError, KeyError):
        pass
    return None


def sub_value(v):
    return list(v) if isinstance(v, tuple) else v


def format_table(grid: dict[str, list], results: list[dict]) -> str:
    """Markdown table: the swept settings, trainable parameters, eval loss before and after, and the held-out
    samples' score where they were scored (exact match or ROUGE-L, as each run's eval.metric chose), the base
    model's (the adapters off) beside the tuned model's."""
    head = [*grid, "trainable params", "eval loss start", "eval loss end"]
    rows = [
        [
            *(str(r[k]) for k in grid),
            f"{r['trainable_params']:,}",
            f"{r['first_eval_loss']:.4f}",
            f"{r['final_eval_loss']:.4f}",
        ]
        for r in results
    ]
    scores = [sample_score(r) for r in results]
    metrics = {m for m, _ in scores if m}
    if metrics:
        one = len(metrics) == 1
        name = METRIC_NAMES[next(iter(metrics))] if one else "samples score"
        # the base model's samples (the adapters off) beside the tuned one's, where the runs generated them
        base = [sample_score(r, "base_") for r in results]
        columns = ([(f"base {name}", base)] if any(s is not None for _, s in base) else []) + [(name, scores)]
        for title, column in columns:
            head.append(title)
            for row, (metric, score) in zip(rows, column, strict=True):
                text = score_text(metric, score) if metric and score is not None else "-"
                row.append(text if one or not metric else f"{METRIC_NAMES[metric]} {text}")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    return "\n".join(
        [
            fmt.format(*head),
            "|" + "|".join("-" * (w + 2) for w in widths) + "|",
            *(fmt.format(*row) for row in rows),
        ]
    )
