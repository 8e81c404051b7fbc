"""The end of a run, for the user: generated samples for held-out rows and eval.questions (generations.jsonl),
scored by a metric that fits the answers (exact match for short ones, ROUGE-L for free text), and the summary
printed at the end (samples, the score, the loss before and after, where everything was written)."""

from __future__ import annotations

import re
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Prompts:
    """What is generated for: the first eval.samples held-out rows (their prompts, the answers they hold, a
    preference row's rejected response) and eval.questions."""

    prompts: list[str]
    references: list[str]
    rejected: list[str | None]
    questions: list[str]  # as written
    question_prompts: list[str]  # in the data's template

    @classmethod
    def of(cls, ecfg: EvalConfig, data: Data) -> Prompts:
        fmt = data.formatter
        rows = data.eval_rows[: ecfg.samples] if fmt.fmt != "text" else []
        return cls(
            [fmt.prompt(r, i) for i, r in enumerate(rows)],
            [fmt.reference(r, i) for i, r in enumerate(rows)],
            [fmt.rejected(r, i) for i, r in enumerate(rows)],
            list(ecfg.questions),
            [fmt.question_prompt(q) for q in ecfg.questions],
        )


def samples(ecfg: EvalConfig, generate, data: Data) -> dict:
    """Generate completions for held-out rows (scored by eval.metric) and for eval.questions."""
    p = Prompts.of(ecfg, data)
    outputs = generate(p.prompts + p.question_prompts, ecfg.max_new_tokens, ecfg.batch_size)
    return scored(ecfg, p, outputs)


def scored(ecfg: EvalConfig, p: Prompts, outputs: list[str]) -> dict:
    """The records of `outputs` (one per held-out row, then per question if there are as many outputs), each
    row's scored by eval.metric, and their tally."""
    metric = metric_for(ecfg.metric, p.references)
    records = [
        {"prompt": q, "reference": r, "generated": g, "exact": g.strip() == r.strip()}
        | ({"rejected": x, "as_rejected": g.strip() == x.strip()} if x is not None else {})
        for q, r, x, g in zip(p.prompts, p.references, p.rejected, outputs[: len(p.prompts)], strict=True)
    ]
    if metric == "rouge_l":
        for rec in records:
            rec["rouge_l"] = rouge_l(rec["generated"], rec["reference"])
    answers = outputs[len(p.prompts) :]
    if answers:
        records += [{"question": q, "generated": g} for q, g in zip(p.questions, answers, strict=True)]
    return tally(records, metric)


def tally(records: list[dict], metric: str | None) -> dict:
    """`records` (as `scored` makes them) with the mean of `metric` over the held-out rows' (None for the other
    metric, and for both without one), the exact matches and the rows' count."""
    rows = [rec for rec in records if "reference" in rec]
    scores = {
        "exact_match": [float(rec["exact"]) for rec in rows],
        "rouge_l": [rec.get("rouge_l", 0.0) for rec in rows],
    }
    return {
        "records": records,
        "metric": metric,
        **{name: sum(v) / len(v) if name == metric and v else None for name, v in scores.items()},
        "hits": sum(rec["exact"] for rec in rows),
        "n": len(rows),
    }


def sample_score(summary: dict, whose: str = "") -> tuple[str | None, float | None]:
    """(metric, score) of a run's summary (summaries written before eval.metric have exact_match alone); `whose`
    'base_': the base model's score (None in summaries written before it was generated)."""
    metric = summary.get("sample_metric")
    if metric is None and summary.get("exact_match") is not None:
        metric = "exact_match"
    return metric, summary.get(whose + metric) if metric else None


def score_text(metric: str, score: float) -> str:
    return f"{100 * score:.1f}%" if metric == "exact_match" else f"{score:.3f}"


def print_summary(
    sink: MetricsSink, summary: dict, run_dir: Path, plot: Path | None, samples: dict, show: int
) -> None:
    """The summary printed at the end: held-out samples (`samples`; beside the base model's where
    samples["base"] holds them), their score, the loss before and after, where everything was written."""
    lines = sample_lines(samples, show)
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


def instruction(prompt: str) -> str:
    """The prompt's last line of content (the instruction), without template boilerplate."""
    content = [ln for ln in prompt.splitlines() if ln.strip() and not ln.startswith("###")]
    return content[-1] if content else ""


def _verdict(r: dict) -> str:
    if "rouge_l" in r:
        return f"ROUGE-L {r['rouge_l']:.2f}"
    return "ok" if r["exact"] else "expected " + repr(r["reference"].strip()[:40])


def tally_text(t: dict) -> str:
    """'12/64 (18.8%)' or '0.231': a tally's score in its metric."""
    if t["metric"] == "exact_match":
        return f"{t['hits']}/{t['n']} ({100 * t['exact_match']:.1f}%)"
    return f"{t['rouge_l']:.3f}"


def sample_lines(samples: dict, show: int) -> list[str]:
    """The first `show` held-out rows' samples (the base model's above the tuned one's, where samples["base"]
    holds them), the answers to eval.questions, and the score."""
    base = samples.get("base") or {"records": []}
    before = {r["prompt"]: r for r in base["records"] if "reference" in r}
    asked = {r["question"]: r for r in base["records"] if "question" in r}
    shown = [r for r in samples["records"] if "reference" in r][:show]
    lines = [""]
    if shown:
        lines.append("samples (held-out rows, greedy" + ("; base: the adapters off):" if before else "):"))
    for r in shown:
        if r["prompt"] in before:
            b = before[r["prompt"]]
            lines.append(f"  {instruction(r['prompt'])[:100]}")
            lines.append(f"    base : {b['generated'].strip()[:60]!r:<64} {_verdict(b)}")
            lines.append(f"    tuned: {r['generated'].strip()[:60]!r:<64} {_verdict(r)}")
        else:
            lines.append(
                f"  {instruction(r['prompt'])[:60]:<60} -> {r['generated'].strip()[:40]!r:<14} {_verdict(r)}"
            )
    for r in samples["records"]:
        if "question" in r:
            lines.append(f"  Q: {r['question']}")
            if r["question"] in asked:
                lines.append(f"  base : {asked[r['question']]['generated'].strip()}")
            lines.append(f"  {'tuned' if r['question'] in asked else 'A'}: {r['generated'].strip()}")
    n, of_base = samples["n"], f"; the base model {tally_text(base)}" if base.get("metric") else ""
    if samples["metric"] == "exact_match":
        lines.append(f"  exact match on {n} held-out rows: {tally_text(samples)}{of_base}")
    elif samples["metric"] == "rouge_l":
        lines.append(
            f"  ROUGE-L on {n} held-out rows: {tally_text(samples)}{of_base} (mean F1 of the longest common word "
            f"sequence with the reference: answers of many words; eval.metric chooses)"
        )
    return lines


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
        "micro_batch_size": cfg.train.micro_batch_size,  # as resolved (auto -> rows)
        "activation_checkpointing": cfg.parallel.activation_checkpointing,  # as resolved (auto -> a choice)
        "sharding_strategy": cfg.parallel.sharding_strategy,  # as resolved
        # every k-th layer recomputed (true) or offloaded; None for none or a pattern, which says it itself
        "recompute_every": cfg.parallel.checkpoint_every
        if cfg.parallel.activation_checkpointing in (True, "offload")
        else None,
        # what the last training forward sent to host memory (activation offloading), per micro-batch
        "offloaded_gib_per_micro_batch": built.offloader.bytes_offloaded / 2**30 if built.offloader else None,
        "fused_kernels": cfg.model.fused_kernels,  # as resolved
        "rank0_holds": built.rank0_holds,  # fraction of the flat parameters on rank 0
        "base": built.base,
    }
