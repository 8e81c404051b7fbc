"""DPO speed and memory, shardtune against TRL's DPOTrainer + PEFT, on one GPU: the 8B DPO recipe's shape with
random weights (recipes/llama3_8b_dpo.py with model.init=random model.name_or_path=llama3-8b, no starting
adapter), NF4 4-bit base + LoRA on both sides, the same pairs of random tokens, the same settings (beta, max
length, micro-batch, accumulation, bf16, activation/gradient checkpointing, LoRA r/alpha/dropout on every linear
layer, learning rate). Prints one JSON line per system: tokens/s (both sequences of every pair, prompt
included, over the steps after the first) and peak GPU memory (torch's max_memory_allocated) over the
whole run, the load included (TRL's from its 4-bit load on: the random bf16 checkpoint it loads is written
before).

    python bench/dpo_vs_trl.py                         # llama3-8b, 10 steps, both systems, one GPU
    python bench/dpo_vs_trl.py --steps 20 --global-batch 16 --only trl
    python bench/dpo_vs_trl.py --tiny                  # the tiny shape on the CPU, fp32, in about a minute

Each system runs in a process of its own (`--worker NAME`), so that neither's memory is the other's. TRL's
model is written as a random bf16 checkpoint first and loaded 4-bit through transformers' BitsAndBytesConfig
(its QLoRA path); shardtune draws its random weights on the device layer by layer (model.init=random). The
weights differ, which changes neither speed nor memory. TRL 1.16 pads (it has no padding-free DPO); every pair
here has the same length, so nothing is padding on either side. Needs trl (the dev extra) and, without --tiny,
a CUDA GPU with bitsandbytes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LETTERS = "abcdefghijklmnopqrstuvwxyz"  # one token each (space-separated) with the built-in tokenizer


def write_pairs(path: Path, n: int, prompt_len: int, response_len: int, seed: int) -> Path:
    """`n` preference rows of random letters: a prompt of `prompt_len` tokens, two responses of `response_len`."""
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(LETTERS) for _ in range(k))

    with path.open("w") as f:
        for _ in range(n):
            row = {
                "prompt": text(prompt_len - 1) + "\n",
                "chosen": text(response_len),
                "rejected": text(response_len),
            }
            f.write(json.dumps(row) + "\n")
    return path


def overrides(a: argparse.Namespace, work: Path) -> list[str]:
    """The recipe's settings for this benchmark (the shape, random weights, the rows, the steps)."""
    tiny = ["parallel.mixed_precision=no", "parallel.device=cpu"] if a.tiny else ["parallel.device=cuda"]
    return [
        f"model.name_or_path={a.shape}",
        "model.init=random",
        "model.adapter=null",
        f"data.source={work / 'pairs.jsonl'}",
        f"data.eval_source={work / 'eval.jsonl'}",
        "data.pad_token=null",  # the built-in tokenizer's own
        f"data.max_len={a.prompt_len + a.response_len + 1}",
        f"train.max_steps={a.steps}",
        f"train.global_batch_size={a.global_batch}",
        f"train.micro_batch_size={a.micro_batch}",
        "train.log_every=1",
        "train.save_every=0",
        "optim.warmup_steps=0",
        "optim.scheduler=constant",
        "eval.every=0",
        "eval.max_rows=2",
        "eval.samples=0",
        f"train.output_dir={work / 'runs'}",
        "train.run_name=shardtune",
        *tiny,
    ]


def config(a: argparse.Namespace, work: Path):
    from shardtune.cli.args import load_recipe, resolve_config

    return resolve_config(
        load_recipe(ROOT / "recipes" / "llama3_8b_dpo.py").config(), overrides(a, work), env={}
    )


def pair_tokens(cfg) -> int:
    """Tokens of one pair (prompt + chosen + EOS, prompt + rejected + EOS), as both systems tokenize it."""
    from shardtune.model.tokenizer import tokenizer_for

    tok = tokenizer_for(cfg.model, cfg.data, Path(cfg.train.output_dir))
    row = json.loads(Path(cfg.data.source).read_text().splitlines()[0])
    return sum(len(tok(row["prompt"] + row[k])["input_ids"]) + 1 for k in ("chosen", "rejected"))


def result(a, system: str, tokens_per_step: int, times: list[float], peak, losses: list[float]) -> dict:
    timed = times[1:] or times  # the first step warms up (allocator, kernels)
    return {
        "system": system,
        "shape": a.shape,
        "steps": len(times),
        "pairs_per_step": a.global_batch,
        "micro_batch_pairs": a.micro_batch,
        "tokens_per_pair": tokens_per_step // a.global_batch,
        "tokens_per_s": tokens_per_step * len(timed) / sum(timed),
        "step_s": sum(timed) / len(timed),
        "peak_gpu_gib": peak,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "device": _device_name(a),
    }


def _device_name(a) -> str:
    import torch

    return "cpu" if a.tiny else torch.cuda.get_device_name(0)


# ------------------------------------------------------------------------------------------------ shardtune
def run_shardtune(a: argparse.Namespace, work: Path) -> dict:
    """The recipe itself, one process: `python recipes/llama3_8b_dpo.py key=value ...`."""
    cmd = [sys.executable, str(ROOT / "recipes" / "llama3_8b_dpo.py"), *overrides(a, work)]
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"shardtune failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    run = work / "runs" / "shardtune"
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"step_time_s"' in x]
    summary = json.loads((run / "summary.json").read_text())
    tokens = steps[0]["tokens"]
    assert all(s["tokens"] == tokens for s in steps), "every step has the same pairs' length"
    peak = summary["gpu_peak_gib_per_rank"][0]
    return result(a, "shardtune", tokens, [s["step_time_s"] for s in steps], peak, [s["loss"] for s in steps])


# ------------------------------------------------------------------------------------------------------ TRL
def trl_model(cfg, work: Path, device: str):
    """The shape with random weights, written as a checkpoint and loaded back 4-bit as TRL's QLoRA users do."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from shardtune.model.modeling import DTYPES, model_config

    dtype = DTYPES[cfg.param_dtype]
    checkpoint = work / "trl-base"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(cfg), dtype=dtype)
    model.save_pretrained(checkpoint, max_shard_size="5GB")
    del model
    if device != "cpu":  # the peak from here on: TRL's whole run, its 4-bit load included (as shardtune's is)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant.quant_type,
        bnb_4bit_use_double_quant=cfg.quant.double_quant,
        bnb_4bit_compute_dtype=dtype,
    )
    attn = "sdpa"
    return AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=quant, dtype=dtype, device_map={"": device}, attn_implementation=attn
    )


def run_trl(a: argparse.Namespace, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from shardtune.model.tokenizer import tokenizer_for

    cfg = config(a, work)
    device = "cpu" if a.tiny else "cuda:0"
    tok = tokenizer_for(cfg.model, cfg.data, work)
    model = trl_model(cfg, work, device)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if device != "cpu":
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    args = DPOConfig(
        output_dir=str(work / "trl"),
        beta=cfg.objective.beta,
        loss_type=["sigmoid"],
        max_length=cfg.data.max_len,
        per_device_train_batch_size=a.micro_batch,
        gradient_accumulation_steps=a.global_batch // a.micro_batch,
        max_steps=a.steps,
        learning_rate=cfg.optim.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=cfg.train.max_grad_norm or 0.0,
        bf16=cfg.param_dtype == "bfloat16",
        use_cpu=device == "cpu",
        gradient_checkpointing=bool(cfg.parallel.activation_checkpointing),
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=cfg.train.seed,
    )
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    rows = [json.loads(x) for x in Path(cfg.data.source).read_text().splitlines()]
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=lora,
        callbacks=[Timer()],
    )
    trainer.train()
    peak = None if device == "cpu" else torch.cuda.max_memory_allocated() / 2**30
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return result(a, "trl", pair_tokens(cfg) * a.global_batch, times, peak, losses)


# --------------------------------------------------------------------------------------------------- driver
def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny shape on the CPU, fp32, a few short steps")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 10; --tiny: 3)")
    p.add_argument("--global-batch", type=int, default=None, help="pairs per step (default 8; --tiny: 4)")
    p.add_argument("--micro-batch", type=int, default=2, help="pairs per forward (the recipe's 2)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 511; --tiny: 24)")
    p.add_argument(
        "--response-len", type=int, default=None, help="tokens per response (default 512; --tiny: 12)"
    )
    p.add_argument("--only", choices=["shardtune", "trl"], help="run one system")
    p.add_argument("--worker", choices=["shardtune", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    small = a.tiny
    a.shape = "tiny" if small else "llama3-8b"
    a.steps = a.steps or (3 if small else 10)
    a.global_batch = a.global_batch or (4 if small else 8)
    a.prompt_len = a.prompt_len or (24 if small else 511)
    a.response_len = a.response_len or (12 if small else 512)
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    if a.worker:
        work = Path(a.work)
        line = run_shardtune(a, work) if a.worker == "shardtune" else run_trl(a, work)
        print(json.dumps(line), flush=True)
        return 0
    with tempfile.TemporaryDirectory(prefix="dpo_vs_trl-") as tmp:
        work = Path(tmp)
        write_pairs(work / "pairs.jsonl", a.steps * a.global_batch + 8, a.prompt_len, a.response_len, seed=0)
        write_pairs(work / "eval.jsonl", 4, a.prompt_len, a.response_len, seed=1)
        for system in [a.only] if a.only else ["shardtune", "trl"]:
            cmd = [sys.executable, __file__, *argv, "--worker", system, "--work", str(work)]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-6000:], file=sys.stderr)
                return proc.returncode
            print(proc.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
