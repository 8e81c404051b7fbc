"""Where a run's metrics go: a progress bar (on a terminal), log lines, metrics.jsonl, loss.png, and the experiment
trackers of train.report_to (trackers.py: TensorBoard, MLflow, W&B)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from shardtune.observability.trackers import TensorBoardTracker, Tracker, Trackers

log = logging.getLogger(__name__)


def train_steps(run_dir: Path) -> list[dict]:
    """The training-step records of a run's metrics.jsonl, in order (eval and note records left out)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if '"tokens_per_s_per_device"' in x]


# how the log line names an objective's metrics (objectives.py's `shown`)
SHORT_NAMES = {
    "rewards/accuracies": "reward acc",
    "rewards/margins": "margin",
    "rewards/chosen": "reward chosen",
    "rewards/rejected": "rejected",
    "nll_loss": "nll",
    "log_odds_ratio": "log odds ratio",
}


def format_extra(m: dict, shown: tuple[str, ...], prefix: str = "") -> str:
    """The objective's own metrics for a log line: ' | reward acc 0.750 | margin 0.312 ...'."""
    return "".join(f" | {SHORT_NAMES.get(k, k)} {m[prefix + k]:.3f}" for k in shown if prefix + k in m)


def format_line(
    step: int, total: int, m: dict, eta_s: float | None = None, shown: tuple[str, ...] = ()
) -> str:
    gpu = f"{m['gpu_peak_gib']:.2f} GiB" if m.get("gpu_peak_gib") is not None else "n/a (CPU)"
    eta = f", ETA {int(eta_s) // 60}m{int(eta_s) % 60:02d}s" if eta_s is not None else ""
    return (
        f"step {step}/{total} ({100 * step / total:.0f}%{eta}) | loss {m['loss']:.4f}{format_extra(m, shown)} | lr {m['lr']:.2e} | grad norm {m['grad_norm']:.3f} | "
        f"{m['tokens_per_s_per_device']:,.0f} tok/s/{m['device_kind']} | MFU {100 * m['mfu']:.2f}% | "
        f"peak GPU mem {gpu} | peak host RAM {m['host_peak_gib']:.2f} GiB"
    )


class MetricsSink:
    """Rank 0's outputs: a progress bar (on a terminal), log lines, metrics.jsonl, loss.png, and the trackers
    (TensorBoard unless told otherwise), which get the config at the start and the files at the end.
    `shown`: the objective's metrics beyond the loss (rewards/accuracies, ...), logged and plotted beside it
    (the trackers get every metric); `loss_label`: what the loss is a mean over."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        start_step: int,
        enabled: bool,
        trackers: list[Tracker] | None = None,
        config: dict[str, Any] | None = None,
        shown: tuple[str, ...] = (),
        loss_label: str = "loss (per response token)",
    ):
        self.enabled = enabled
        self.run_dir = run_dir
        self.total = total_steps
        self.start_step, self.started = start_step, time.perf_counter()
        self.train_points: list[tuple[int, float]] = []
        self.eval_points: list[tuple[int, float]] = []
        self.shown, self.loss_label = shown, loss_label
        # the objective's metrics by name, per step: (step, value) for training and for evals
        self.extra_points: dict[str, list[tuple[int, float]]] = {}
        self.bar = self.jsonl = None
        self.trackers = Trackers([])
        self.warned_retries = self.closed = False
        if not enabled:
            return
        from tqdm.auto import tqdm

        # A resumed run's records go on from its checkpoint's: what an earlier start logged past it (steps this
        # one redoes, after a crash; all of it when no checkpoint was left) is dropped from metrics.jsonl, hidden
        # in TensorBoard (purge_step), and not logged again to a tracker run that holds it already
        kept, dropped = self._records_up_to(run_dir / "metrics.jsonl", start_step)
        self.trackers = Trackers([TensorBoardTracker()] if trackers is None else trackers)
        self.trackers.start(run_dir, config or {}, start_step, kept, dropped)
        self.jsonl = (run_dir / "metrics.jsonl").open("a")
        # A bar redraws in place on a terminal; in a log file (CI, SLURM) the log lines carry progress and ETA.
        self.bar = (
            tqdm(
                total=total_steps,
                initial=start_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                leave=False,
            )
            if sys.stderr.isatty()
            else None
        )
        # A resumed run keeps drawing its whole curve.
        for rec in kept:
            if "loss" in rec:
                self.train_points.append((rec["step"], rec["loss"]))
            if "eval_loss" in rec:
                self.eval_points.append((rec["step"], rec["eval_loss"]))
            self._keep_extra(rec["step"], rec)

    @staticmethod
    def _records_up_to(path: Path, step: int) -> tuple[list[dict], list[dict]]:
        """(the records of metrics.jsonl up to checkpoint `step`, the ones past it), none kept for a fresh start;
        the file rewritten without the ones past it, and without a line cut short by a crash mid-write."""
        if not path.is_file():
            return [], []
        lines = path.read_text().splitlines()
        kept, dropped = [], []
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            (kept if step and rec.get("step", -1) <= step else dropped).append(rec)
        if len(kept) < len(lines):
            from shardtune.files import write_atomic

            write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
            log.info(
                "metrics.jsonl: %d record(s) past step %d or cut short dropped", len(lines) - len(kept), step
            )
        return kept, dropped

    def _keep_extra(self, step: int, m: dict) -> None:
        for key in self.shown:
            for name in (key, f"eval_{key}"):
                if name in m:
                    self.extra_points.setdefault(name, []).append((step, m[name]))

    def write(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def _record(self, rec: dict) -> None:
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()

    def train_step(self, step: int, m: dict, log_line: bool) -> None:
        if not self.enabled:
            return
        self.train_points.append((step, m["loss"]))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{m['loss']:.4f}",
                lr=f"{m['lr']:.1e}",
                tok_s=f"{m['tokens_per_s_per_device']:,.0f}",
                refresh=False,
            )
        self.trackers.train_step(step, m, logged=log_line)
        if m.get("alloc_retries") and not self.warned_retries:
            self.warned_retries = True
            self.write(
                f"[shardtune] warning: by step {step} the CUDA allocator emptied its cache and retried "
                f"{m['alloc_retries']} time(s), stalling those steps: GPU memory is at its limit. A smaller "
                "train.micro_batch_size, or recomputing some layers (parallel.activation_checkpointing=auto), "
                "may train faster here."
            )
        if log_line:
            done = step - self.start_step
            eta = (time.perf_counter() - self.started) / done * (self.total - step) if done else None
            self.write(format_line(step, self.total, m, eta, self.shown))
            self._record({"step": step, **m})
            self._keep_extra(step, m)

    def eval(self, step: int, m: dict) -> None:
        if not self.enabled:
            return
        self.eval_points.append((step, m["eval_loss"]))
        self._record({"step": step, **m})
        self.trackers.record({"step": step, **m})
        self._keep_extra(step, m)
        peak = f" (peak GPU mem so far {m['gpu_peak_gib']:.2f} GiB)" if m.get("gpu_peak_gib") else ""
        over = f"{m['eval_tokens']:,} tokens" if "eval_tokens" in m else f"{m.get('eval_pairs', 0):,} pairs"
        extra = format_extra(m, self.shown, "eval_")
        self.write(f"eval @ step {step}: loss {m['eval_loss']:.4f} over {over}{extra}{peak}")

    def note(self, rec: dict) -> None:
        if self.enabled:
            self._record(rec)
            self.trackers.record(rec)

    def plot(self) -> Path | None:
        """loss.png: training loss per step and eval loss per evaluation."""
        if not self.enabled or not self.train_points:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = 2 if self.extra_points else 1
        fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4), squeeze=False)
        ax = axes[0][0]
        ax.plot(*zip(*self.train_points, strict=True), lw=1, label="train loss")
        if self.eval_points:
            ax.plot(*zip(*self.eval_points, strict=True), "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel(self.loss_label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(self.run_dir.name)
        if self.extra_points:  # the objective's own metrics (reward accuracy, margins, ...)
            ax = axes[0][1]
            for name, points in self.extra_points.items():
                style = "o-" if name.startswith("eval_") else "-"
                ax.plot(*zip(*points, strict=True), style, lw=1, label=name.replace("eval_", "eval "))
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            ax.set_title(f"{self.run_dir.name}: {', '.join(self.shown[:2])}")
        fig.tight_layout()
        path = self.run_dir / "loss.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def artifacts(self, paths: list[Path | None]) -> None:
        """Files and directories (loss.png, the adapter...) for the trackers to keep, at the end of the run."""
        self.trackers.artifacts(paths)

    def close(self, status: str = "complete") -> None:
        """The trackers' runs ended as `status` (complete, interrupted or failed); the files closed. Once."""
        if not self.enabled or self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        self.trackers.finish(status)
        self.jsonl.close()
