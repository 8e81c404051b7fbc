"""`shardtune bench`: train a random-weight model of a named shape for a few steps and print one JSON line.

    shardtune bench llama3-8b --gpus 2 --seq 3072 --micro-batch 2 [key=value ...] [--out results.jsonl]
    shardtune bench llama3-70b-proxy --gpus 2 --lengths instruct data.packing=true

The model is drawn on the GPUs in 4-bit (no checkpoint on disk), the rows are generated (`--lengths fixed`:
every row exactly --seq tokens; `instruct`: prompt + completion rows whose lengths spread from tens to
thousands of tokens, loss on the completions), and the run is an ordinary shardtune training run of the
recipe below, launched with torchrun, so that what is measured is what users run. The JSON line has the
steps after the warm-up averaged: tokens/s/GPU (real tokens, no padding), step time, MFU (4N + 3A per token
over the GPU's measured bf16 matmul rate), HFU (with recomputation), peak GPU memory per rank, peak host
RAM, and the settings. Overrides (key=value) change the recipe as on a training command line.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import tempfile
from pathlib import Path

import yaml

from shardtune.cli.args import command_overrides
from shardtune.cli.spawn import failure, torchrun
from shardtune.config import Config

# Named shapes: built-in architectures, plus the 70B-layer proxy (Llama-3-70B widths, 20 layers).
SHAPES = {
    "tiny": ("tiny", {}),
    "llama3-8b": ("llama3-8b", {}),
    "llama3-70b": ("llama3-70b", {}),
    "llama3-70b-proxy": ("llama3-70b", {"model.shape.num_hidden_layers": 20}),
}


def config() -> Config:
    """The benchmark recipe: the published FSDP + QLoRA recipe's settings (NF4 with bf16 storage, bf16
    compute, LoRA r=16 alpha 8 dropout 0.05 on every linear layer, activation checkpointing), random weights."""
    cfg = Config()
    cfg.model.init = "random"
    cfg.lora.r = 16
    cfg.lora.alpha = 8
    cfg.lora.dropout = 0.05
    cfg.optim.lr = 2e-4
    cfg.optim.warmup_steps = 0
    cfg.optim.scheduler = "constant"
    cfg.parallel.mixed_precision = "bf16"
    cfg.parallel.activation_checkpointing = True
    cfg.train.log_every = 1
    cfg.train.save_every = 0
    cfg.eval.every = 0
    cfg.eval.samples = 0
    cfg.eval.batch_size = 1
    return cfg


def write_rows(path: Path, n: int, seq: int, lengths: str, seed: int = 0) -> str:
    """Rows for the built-in tokenizer (one token per letter): 'fixed' text rows that fill
    `seq` tokens, or 'instruct' prompt/completion rows of log-normally spread lengths. Returns the format."""
    rng = random.Random(seed)

    def words(k: int) -> str:  # k tokens
        return " ".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(max(1, k)))

    with path.open("w") as f:
        for _ in range(n):
            if lengths == "fixed":
                row = {"text": words(seq + 8)}  # truncated to seq
            else:  # median ~100-token prompts and ~250-token completions, from ~10 to a few thousand tokens
                prompt = min(seq // 2, max(8, int(rng.lognormvariate(4.6, 1.0))))
                answer = min(seq - prompt, max(8, int(rng.lognormvariate(5.5, 1.0))))
                row = {"prompt": words(prompt), "completion": words(answer)}
            f.write(json.dumps(row) + "\n")
    return "text" if lengths == "fixed" else "prompt_completion"


def run(
    shape: str,
    overrides: list[str],
    gpus: int,
    seq: int,
    micro_batch: int,
    warmup: int,
    steps: int,
    lengths: str,
    workdir: Path | None = None,
    timeout_s: float = 1800,
) -> dict:
    """Launch one benchmark run; its JSON record (with "error" and the log's tail when it failed)."""
    name, shape_overrides = SHAPES[shape]
    work = Path(workdir or tempfile.mkdtemp(prefix="shardtune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    global_batch = micro_batch * gpus
    rows = work / f"rows-{lengths}-{seq}.jsonl"
    fmt = write_rows(rows, (warmup + steps) * global_batch + gpus, seq, lengths)
    run_name = f"{shape}-{gpus}gpu-{seq}-mb{micro_batch}-{os.getpid()}"
    args = [
        f"model.name_or_path={name}",
        *(f"{k}={v}" for k, v in shape_overrides.items()),
        f"data.source={rows}",
        f"data.format={fmt}",
        f"data.max_len={seq}",
        f"data.test_size={gpus}",
        f"train.global_batch_size={global_batch}",
        f"train.micro_batch_size={micro_batch}",
        f"train.max_steps={warmup + steps}",
        f"eval.max_rows={gpus}",
        f"train.output_dir={work}",
        f"train.run_name={run_name}",
        *overrides,
    ]
    log_path = work / f"{run_name}.log"
    rc = torchrun(["-m", "shardtune.cli.bench", *args], gpus, log_path, timeout_s)
    record = {
        "shape": shape,
        "gpus": gpus,
        "seq": seq,
        "micro_batch": micro_batch,
        "lengths": lengths,
        "overrides": overrides,
    }
    run_dir = work / run_name
    if rc != 0 or not (run_dir / "summary.json").is_file():
        log = log_path.read_text(errors="replace")
        error = rc if isinstance(rc, str) else f"exit {rc}"
        return {
            **record,
            "error": f"{error}: {failure(log)}",
            "log": str(log_path),
            "log_tail": log.splitlines()[-25:],
        }
    return {**record, **summarize(run_dir, warmup)}


def summarize(run_dir: Path, warmup: int) -> dict:
    """The measured steps of a finished run (those after `warmup`), averaged, and the settings used. Rates are
    over the measured steps together (all their tokens over all their time): a plain mean of per-step rates
    would count a short step as much as a long one, which overstated padded variable-length runs by 26-49%."""
    from shardtune.observability.metrics import (
        train_steps,  # torch: not for every `shardtune` command's start
    )

    metrics = train_steps(run_dir)
    measured = metrics[warmup:] or metrics
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    mean = statistics.mean
    seconds = sum(m["step_time_s"] for m in measured)

    def overall(rate: str) -> float:  # a per-step rate (per second) weighted by its step's time
        return sum(m[rate] * m["step_time_s"] for m in measured) / seconds

    return {
        "tokens_per_s_per_gpu": round(overall("tokens_per_s_per_device"), 1),
        "step_s": round(mean(m["step_time_s"] for m in measured), 4),
        "tokens_per_step": round(mean(m["tokens"] for m in measured)),
        "mfu": round(overall("mfu"), 4),
        "hfu": round(overall("hfu"), 4),
        "gpu_peak_gib_per_rank": summary.get("gpu_peak_gib_per_rank"),
        "host_peak_gib_per_rank": summary.get("host_peak_gib_per_rank"),
        "load_s": summary.get("load_s"),
        "alloc_retries": metrics[-1].get("alloc_retries"),  # the CUDA allocator's cache flushes, whole run
        "step_s_each": [round(m["step_time_s"], 4) for m in measured],
        "loss_first_last": [metrics[0]["loss"], metrics[-1]["loss"]],
        "measured_steps": len(measured),
        "settings": {
            "attention": summary.get("attention"),
            "activation_checkpointing": summary.get("activation_checkpointing"),
            "checkpoint_every": summary.get("recompute_every"),
            "offloaded_gib_per_micro_batch": summary.get("offloaded_gib_per_micro_batch"),
            "sharding_strategy": summary.get("sharding_strategy"),  # as resolved ('auto' -> a choice)
            "cpu_offload": cfg["parallel"]["cpu_offload"],
            "packing": cfg["data"]["packing"],
            "fused_kernels": summary.get("fused_kernels"),
            "lora": {
                k: cfg["lora"][k]
                for k in ("r", "alpha", "dropout", "target_modules", "compute_dtype", "fused")
            },
            "mixed_precision": cfg["parallel"]["mixed_precision"],
            "global_batch_size": cfg["train"]["global_batch_size"],
        },
        "device": summary.get("device_name"),
    }


if __name__ == "__main__":  # a rank of a benchmark run (started by `run` above through torchrun)
    from shardtune.cli.recipe import main

    main(config)


def command(args, rest: list[str]) -> int:
    """`shardtune bench`: one benchmark run, its JSON line printed (and appended to --out)."""
    import json

    from shardtune.cli.args import resolve_config

    overrides = command_overrides("bench", rest)
    resolve_config(config(), overrides, env={})  # a typo fails here, before anything starts
    record = run(
        args.shape,
        overrides,
        args.gpus,
        args.seq,
        args.micro_batch,
        args.warmup,
        args.steps,
        args.lengths,
        Path(args.workdir) if args.workdir else None,
        args.timeout,
    )
    line = json.dumps(record)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 1 if "error" in record else 0
