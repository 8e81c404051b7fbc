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

from shardtune.config import Config, apply_overrides
from shardtune.distributed import DistInfo


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
        out.append((assignment, apply_overrides(cfg, assignment, f"sweep {slug(assignment)}")))
    return out


def run_grid(cfg: Config, grid: dict[str, list], dist: DistInfo, name: str, stop=None) -> list[dict]:
    from shardtune.run import train

    base_name = cfg.train.run_name or name
    results = []
    for assignment, sub in expand(cfg, grid):
        sub = apply_overrides(sub, {"train.run_name": f"{base_name}/sweep/{slug(assignment)}"}, "sweep")
        summary = train(sub, dist, name, stop)
        gc.collect()  # this run's model is held in reference cycles: freed now, before the next one is built
        results.append({**{k: sub_value(v) for k, v in assignment.items()}, **summary})
        if summary["status"] == "interrupted":  # the same command resumes this run, then the rest of the grid
            return results
    if dist.is_main:
        table = format_table(grid, results)
        out = Path(cfg.train.output_dir) / base_name / "sweep"
        (out / "summary.md").write_text(table + "\n")
        (out / "summary.json").write_text(json.dumps(results, indent=1))
        print(f"\nsweep over {', '.join(grid)} ({len(results)} runs):\n{table}\nwritten to {out}/summary.md")
    return results


def sub_value(v):
    return list(v) if isinstance(v, tuple) else v


def format_table(grid: dict[str, list], results: list[dict]) -> str:
    """Markdown table: the swept settings, trainable parameters, eval loss before and after."""
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
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    return "\n".join(
        [
            fmt.format(*head),
            "|" + "|".join("-" * (w + 2) for w in widths) + "|",
            *(fmt.format(*row) for row in rows),
        ]
    )
