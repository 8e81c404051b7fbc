"""The end of a run, for the user: generated samples for held-out rows and eval.questions (generations.jsonl), and
the summary printed at the end (samples, the loss before and after, where everything was written)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from shardtune.observability.metrics import MetricsSink

if TYPE_CHECKING:
    from shardtune.config import EvalConfig
    from shardtune.data.loader import Data


def samples(ecfg: EvalConfig, generate, data: Data) -> dict:
    """Generate completions for held-out rows (scored by exact match) and for eval.questions."""
    fmt = data.formatter
    rows = data.eval_rows[: ecfg.samples] if fmt.fmt != "text" else []
    prompts = [fmt.prompt(r, i) for i, r in enumerate(rows)]
    refs = [fmt.reference(r, i) for i, r in enumerate(rows)]
    rejected = [fmt.rejected(r, i) for i, r in enumerate(rows)]  # preference rows: the response not preferred
    questions = [fmt.question_prompt(q) for q in ecfg.questions]
    outputs = generate(prompts + questions, ecfg.max_new_tokens, ecfg.batch_size)
    records = [
        {"prompt": p, "reference": r, "generated": g, "exact": g.strip() == r.strip()}
        | ({"rejected": x, "as_rejected": g.strip() == x.strip()} if x is not None else {})
        for p, r, x, g in zip(prompts, refs, rejected, outputs[: len(prompts)], strict=True)
    ]
    records += [
        {"question": q, "generated": g} for q, g in zip(ecfg.questions, outputs[len(prompts) :], strict=True)
    ]
    hits = sum(r.get("exact", False) for r in records)
    return {
        "records": records,
        "exact_match": (hits / len(rows)) if rows else None,
        "hits": hits,
        "n": len(rows),
    }


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
        lines.append(
            f"  {content[-1][:60] if content else '':<60} -> {r['generated'].strip()[:40]!r:<14} "
            f"{'ok' if r['exact'] else 'expected ' + repr(r['reference'].strip()[:40])}"
        )
    for r in samples["records"]:
        if "question" in r:
            lines.append(f"  Q: {r['question']}\n  A: {r['generated'].strip()}")
    if samples["n"]:
        lines.append(
            f"  exact match on {samples['n']} held-out rows: {samples['hits']}/{samples['n']} "
            f"({100 * samples['exact_match']:.1f}%)"
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
