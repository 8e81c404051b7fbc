"""The end of a run, for the user: generated samples for held-out rows and eval.questions (generations.jsonl),
scored by a metric that fits the answers (exact match for short ones, ROUGE-L for free text), and the summary
printed at the end (samples, the score, the loss before and after, where everything was written)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from shardtune.observability.memory import gpu_peak_gib, host_peak_gib
from shardtune.observability.metrics import MetricsSink
from shardtune.parallel.distributed import DistInfo, gather_object

if TYPE_CHECKING:
    from shardtune.config import Config, EvalConfig
    from shardtune.data.loader import Data
    from shardtune.train.build import Built

# eval.metric=auto scores by exact match where every reference has at most this many words (labels, numbers,
# names, the letter tasks' strings), else by ROUGE-L: a sentence is rarely generated word for word
SHORT_ANSWER_WORDS = 5
METRIC_NAMES = {"exact_match": "exact match", "rouge_l": "ROUGE-L"}


def metric_for(metric: str, references: list[str]) -> str | None:
    """The metric eval.metric names for these references: 'exact_match', 'rouge_l' or None."""
    if not references or metric == "none":
        return None
    if metric != "auto":
        return metric
    short = all(len(r.split()) <= SHORT_ANSWER_WORDS for r in references)
    return "exact_match" if short else "rouge_l"


def _words(text: str) -> str:
    """ROUGE's normalization (lowercase, words of letters and digits) for any script, not ASCII only."""
    return re.sub(r"[\W_]+", " ", text.lower())


def rouge_l(generated: str, reference: str) -> float:
    """ROUGE-L F1 of one answer: the longest common subsequence of words, against both lengths (torchmetrics,
    no stemming; 1 when the words are the reference's in its order, 0 when none is shared)."""
    from torchmetrics.functional.text.rouge import rouge_score

    score = rouge_score(generated, reference, rouge_keys="rougeL", normalizer=_words)
    return float(score["rougeL_fmeasure"])


def samples(ecfg: EvalConfig, generate, data: Data) -> dict:
    """Generate completions for held-out rows (scored by eval.metric) and for eval.questions."""
    fmt = data.formatter
    rows = data.eval_rows[: ecfg.samples] if fmt.fmt != "text" else []
    prompts = [fmt.prompt(r, i) for i, r in enumerate(rows)]
    refs = [fmt.reference(r, i) for i, r in enumerate(rows)]
    rejected = [fmt.rejected(r, i) for i, r in enumerate(rows)]  # preference rows: the response not preferred
    questions = [fmt.question_prompt(q) for q in ecfg.questions]
    outputs = generate(prompts + questions, ecfg.max_new_tokens, ecfg.batch_size)
    metric = metric_for(ecfg.metric, refs)
    records = [
        {"prompt": p, "reference": r, "generated": g, "exact": g.strip() == r.strip()}
        | ({"rejected": x, "as_rejected": g.strip() == x.strip()} if x is not None else {})
        for p, r, x, g in zip(prompts, refs, rejected, outputs[: len(prompts)], strict=True)
    ]
    if metric == "rouge_l":
        for rec in records:
            rec["rouge_l"] = rouge_l(rec["generated"], rec["reference"])
    scores = {
        "exact_match": [float(rec["exact"]) for rec in records],
        "rouge_l": [rec.get("rouge_l", 0.0) for rec in records],
    }
    hits = sum(rec["exact"] for rec in records)
    records += [
        {"question": q, "generated": g} for q, g in zip(ecfg.questions, outputs[len(prompts) :], strict=True)
    ]
    return {
        "records": records,
        "metric": metric,
        # the mean over the rows of the metric used; None for the other (and for both without a metric)
        **{name: sum(v) / len(v) if name == metric else None for name, v in scores.items()},
        "hits": hits,
        "n": len(rows),
    }


def sample_score(summary: dict) -> tuple[str | None, float | None]:
    """(metric, score) of a run's summary (summaries written before eval.metric have exact_match alone)."""
    metric = summary.get("sample_metric")
    if metric is None and summary.get("exact_match") is not None:
        metric = "exact_match"
    return metric, summary.get(metric) if metric else None


def score_text(metric: str, score: float) -> str:
    return f"{100 * score:.1f}%" if metric == "exact_match" else f"{score:.3f}"


def print_summary(
    sink: MetricsSink, summary: dict, run_dir: Path, plot: Path | None, samples: dict, show: int
) -> None:
    with (run_dir / "generations.jsonl").open("w") as f:
        for rec in samples["records"]:
            f.write(json.dumps(rec) + "\n")
    shown = [r for r in samples["records"] if "reference" in r][:show]
    lines = ["", "samples (held-out rows, greedy):"] if shown else [""]
    for r in shown:
        # the prompt's last line of content (the instruction), without template boilerplate
        content = [ln for ln in r["prompt"].splitlines() if ln.strip() and not ln.startswith("###")]
        verdict = "ok" if r["exact"] else "expected " + repr(r["reference"].strip()[:40])
        if "rouge_l" in r:
            verdict = f"ROUGE-L {r['rouge_l']:.2f}"
        lines.append(
            f"  {content[-1][:60] if content else '':<60} -> {r['generated'].strip()[:40]!r:<14} {verdict}"
        )
    for r in samples["records"]:
        if "question" in r:
            lines.append(f"  Q: {r['question']}\n  A: {r['generated'].strip()}")
    n = samples["n"]
    if samples["metric"] == "exact_match":
        lines.append(
            f"  exact match on {n} held-out rows: {samples['hits']}/{n} ({100 * samples['exact_match']:.1f}%)"
        )
    elif samples["metric"] == "rouge_l":
        lines.append(
            f"  ROUGE-L on {n} held-out rows: {samples['rouge_l']:.3f} (mean F1 of the longest common word "
            f"sequence with the reference: answers of many words; eval.metric chooses)"
        )
    first, last = summary["first_eval_loss"], summary["final_eval_loss"]
    if first:
        lines.append(f"\neval loss {first:.4f} -> {last:.4f} ({last / first:.3f}x its starting value)")
    before, after = summary.get("first_eval") or {}, summary.get("final_eval") or {}
    if "eval_rewards/accuracies" in after:
        lines.append(
            f"held-out pairs: reward accuracy {before.get('eval_rewards/accuracies', float('nan')):.3f} -> "
            f"{after['eval_rewards/accuracies']:.3f}, margin {before.get('eval_rewards/margins', float('nan')):.3f} "
            f"-> {after['eval_rewards/margins']:.3f} (the chosen response's reward above the rejected one's)"
        )
    lines += [
        f"\nrun directory: {run_dir}",
        f"  adapter (PEFT):  {summary['adapter']}   PeftModel.from_pretrained(base, this)",
        f"  base model:      {summary['base'] or 'random weights drawn on the devices (not saved)'}",
        f"  checkpoint:      {summary['last_checkpoint']}",
        f"  loss curve:      {plot}",
        f"  tensorboard:     {run_dir / 'tensorboard'}   (tensorboard --logdir {run_dir / 'tensorboard'})",
        f"  metrics, samples: {run_dir / 'metrics.jsonl'}, {run_dir / 'generations.jsonl'}",
    ]
    sink.write("\n".join(lines))


def setup_fields(cfg: Config, dist: DistInfo, built: Built) -> dict:
    """What ran, for summary.json: the model's size and load, the hardware and the settings as resolved ('auto'
    decided), memory peaks per rank. Every rank takes part (a gather)."""
    peaks = gather_object({"host_peak_gib": host_peak_gib(), "gpu_peak_gib": gpu_peak_gib(dist.device)})
    return {
        "trainable_params": built.report.trainable,
        "total_params": built.report.total,
        "load_s": built.report.load_s,
        "load_host_peak_gib": built.host_load_gib,
        "host_peak_gib_per_rank": [p["host_peak_gib"] for p in peaks],
        "gpu_peak_gib_per_rank": [p["gpu_peak_gib"] for p in peaks],
        "world_size": dist.world_size,
        "device_name": torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else "cpu",
        "attention": built.attention,
        "activation_checkpointing": cfg.parallel.activation_checkpointing,  # as resolved (auto -> a choice)
        "sharding_strategy": cfg.parallel.sharding_strategy,  # as resolved
        "recompute_every": cfg.parallel.checkpoint_every,  # with activation checkpointing: every k-th layer
        "fused_kernels": cfg.model.fused_kernels,  # as resolved
        "rank0_holds": built.rank0_holds,  # fraction of the flat parameters on rank 0
        "base": built.base,
    }
