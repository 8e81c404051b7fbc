"""Bar chart of `shardtune bench` lines (tokens/s/GPU, MFU on each bar), for BENCHMARKS.md:
python bench/plot_speed.py bench/results/2026-11-23-2xh200-c/speed.jsonl bench/results/2026-11-23-2xh200-c/speed.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SHORT = {
    "parallel.activation_checkpointing=false": "no recompute",
    "parallel.activation_checkpointing=auto": "recompute: auto",
    "model.fused_kernels=true": "Liger",
    "lora.compute_dtype=float32": "fp32 adapters",
    "data.packing=true": "packed",
    "lora.dropout=0": "dropout 0",
}
PUBLISHED = {"llama3-8b": 3753, "llama3-70b-proxy": 3487}  # TRL SFTTrainer + accelerate FSDP, same machine

with open(sys.argv[1]) as f:
    rows = [json.loads(x) for x in f if '"error"' not in x]
rows = [r for r in rows if r["lengths"] == "fixed"]
labels, values, colors = [], [], []
for shape in ("llama3-8b", "llama3-70b-proxy", "llama3-70b"):
    if shape in PUBLISHED:
        labels.append(f"{shape}\npublished recipe")
        values.append((PUBLISHED[shape], None))
        colors.append("#999999")
    for r in (r for r in rows if r["shape"] == shape and r["gpus"] == 2):
        what = [SHORT.get(o, o) for o in r["overrides"]]
        if not any(o.startswith("parallel.activation_checkpointing") for o in r["overrides"]):
            what.append("recompute all")  # the recipe's checkpointing
        what = ", ".join(what)
        labels.append(f"{shape} mb{r['micro_batch']}\n{what}")
        values.append((r["tokens_per_s_per_gpu"], r["mfu"]))
        colors.append({"llama3-8b": "#4c72b0", "llama3-70b-proxy": "#dd8452", "llama3-70b": "#55a868"}[shape])
fig, ax = plt.subplots(figsize=(9, 0.42 * len(labels) + 1))
y = range(len(labels))[::-1]
ax.barh(list(y), [v for v, _ in values], color=colors)
for yi, (v, mfu) in zip(y, values, strict=True):
    ax.text(v, yi, f" {v:,.0f}" + (f" (MFU {mfu:.0%})" if mfu else ""), va="center", fontsize=8)
ax.set_yticks(list(y), labels, fontsize=7)
ax.set_xlabel("tokens/s per GPU, 2x H200, seq 3072, NF4 + LoRA r=16 (random weights)")
ax.set_xlim(0, max(v for v, _ in values) * 1.3)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
