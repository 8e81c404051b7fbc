"""shardtune beside its peers on one GPU, in one allocation: shardtune (`shardtune bench`), Unsloth (its
FastLanguageModel path) and the TRL + PEFT recipe (SFTTrainer on a BitsAndBytes 4-bit model with a LoRA
peft_config), on the same random checkpoint (bf16 safetensors, NF4 double-quant loaded by each), the same rows
(every row exactly --seq tokens of the built-in tokenizer, loss on every token) and LoRA settings (r 16, alpha 8,
the 7 projections, bf16; dropout 0 and 0.05), each over the same list of settings (micro-batch, activation
checkpointing). Every run is a process of its own; its tokens/s/GPU (the steps after the warm-up, data loading
included) and its whole-run peak GPU memory (torch's max_memory_allocated from the process's start: the load
included) go to runs.jsonl; then, for every memory budget, each tool's fastest run whose peak fits it goes to
peers.jsonl (issue 26's record) and to the table printed last, one per dropout.

    python bench/peers/peers.py --shape llama3-8b --out $OUT                 # shardtune, trl, unsloth
    python bench/peers/peers.py --shape llama3-70b-proxy --tools shardtune,unsloth --dropout 0.05 --out $OUT
    python bench/peers/peers.py --tiny --out /tmp/peers                      # CPU: shardtune and trl, fp32

The runs of one machine in one allocation share an `allocation` id (the machine's boot id unless
SHARDTUNE_ALLOCATION says otherwise), so several calls on a warm machine make one comparison. The 80-layer
llama3-70b has no checkpoint on disk (140 GB): shardtune alone draws it in 4-bit on the GPU (`shardtune bench`).

Unsloth runs from the site folder ../shared/tools/unsloth_site.sh packs (.gpu/site_unsloth.tgz, unpacked into
/tmp/site_u by bench/peers/unsloth_env.sh): its pins (trl<=1.15, datasets<5) differ from ours. The settings a
tool cannot run (an out-of-memory error) are recorded with their error and left out of the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BUDGETS = {"llama3-8b": [8, 12, 16, 24, 48, 80], "llama3-70b-proxy": [16, 24, 48, 80], "llama3-70b": [48, 80]}
# (micro-batch, activation checkpointing), fastest first where memory allows
SETTINGS = [(4, False), (2, False), (4, True), (2, True), (1, True)]
LORA = {"r": 16, "alpha": 8}


# ----------------------------------------------------------------------------------------------- the data
def write_rows(path: Path, rows: int, seq: int) -> Path:
    from shardtune.cli.bench import write_rows as bench_rows

    bench_rows(path, rows, seq, "fixed")  # the rows `shardtune bench --lengths fixed` trains on
    return path


def token_rows(path: Path, seq: int) -> list[list[int]]:
    """The rows as the built-in tokenizer reads them, each cut to exactly `seq` tokens (BOS first)."""
    from shardtune.model.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    rows = [json.loads(x)["text"] for x in path.read_text().splitlines()]
    return [tok(text)["input_ids"][:seq] for text in rows]


def write_checkpoint(shape: str, out: Path, device: str) -> Path:
    """The shape with random weights as a bf16 (tiny: fp32) Hugging Face checkpoint and the built-in tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from shardtune.cli.bench import SHAPES
    from shardtune.config import Config
    from shardtune.model.modeling import model_config
    from shardtune.model.tokenizer import build_tiny_tokenizer

    if (out / "config.json").is_file():
        return out
    name, shape_overrides = SHAPES[shape]
    cfg = Config()
    cfg.model.name_or_path = name
    hf_config = model_config(cfg)
    for key, value in shape_overrides.items():
        setattr(hf_config, key.rsplit(".", 1)[-1], value)
    torch.manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.save_pretrained(out, max_shard_size="5GB")
    build_tiny_tokenizer().save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------- one tool, one run
def run_shardtune(a, micro_batch: int, checkpointing: bool) -> dict:
    """`shardtune bench` (its own rows, the same generator) loading the same checkpoint, one process."""
    cmd = [sys.executable, "-m", "shardtune.cli", "bench", a.shape, "--gpus", "1", "--seq", str(a.seq)]
    cmd += ["--micro-batch", str(micro_batch), "--warmup", str(a.warmup), "--steps", str(a.steps)]
    cmd += ["--workdir", str(a.work / "shardtune"), "--out", str(a.work / "shardtune.jsonl")]
    cmd += [f"parallel.activation_checkpointing={str(checkpointing).lower()}"]
    cmd += [f"lora.{k}={v}" for k, v in LORA.items()] + [f"lora.dropout={a.dropout}"]
    if a.checkpoint.is_dir():  # the others' checkpoint (none for the 80-layer 70B: drawn on the GPU)
        cmd += [f"model.name_or_path={a.checkpoint}", "model.init=pretrained"]
    cmd += ["parallel.device=cpu", "parallel.mixed_precision=no"] if a.tiny else []
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
    record = json.loads(lines[-1])
    if "error" in record:
        return {"error": record["error"]}
    peaks = record.get("gpu_peak_gib_per_rank") or [None]
    return {"tokens_per_s_per_gpu": record["tokens_per_s_per_gpu"], "peak_gib": peaks[0], "detail": record}


def train_hf(a, model, tokenizer, micro_batch: int, checkpointing: bool, trainer_cls, config_cls) -> dict:
    """SFTTrainer on the pre-tokenized rows: the steps' times (after the warm-up) and the peak memory."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available() and not a.tiny
    ends: list[float] = []  # when each step ended: between two, everything a step takes (its data included)

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    rows = token_rows(a.rows, a.seq)[: (a.warmup + a.steps) * micro_batch]
    args = config_cls(
        output_dir=str(a.work / "hf"),
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=1,
        max_steps=a.warmup + a.steps,
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        warmup_steps=0,
        bf16=not a.tiny,
        use_cpu=a.tiny,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        max_length=a.seq,
        packing=False,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": rows}),
        processing_class=tokenizer,
        callbacks=[Timer()],
    )
    trainer.train()
    measured = ends[a.warmup - 1 :] if a.warmup else ends
    tokens = micro_batch * a.seq * (len(measured) - 1)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {"tokens_per_s_per_gpu": round(tokens / (measured[-1] - measured[0]), 1), "peak_gib": peak}


def run_trl(a, micro_batch: int, checkpointing: bool) -> dict:
    """The TRL + PEFT QLoRA recipe: transformers' BitsAndBytesConfig NF4 double-quant, PEFT's LoRA."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    dtype = torch.float32 if a.tiny else torch.bfloat16
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )
    device = "cpu" if a.tiny else "cuda:0"
    model = AutoModelForCausalLM.from_pretrained(
        a.checkpoint,
        quantization_config=quant,
        dtype=dtype,
        device_map={"": device},
        attn_implementation="sdpa",
    )
    lora = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=a.dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )

    class Trainer(SFTTrainer):
        def __init__(self, **kw):
            super().__init__(peft_config=lora, **kw)

    tok = AutoTokenizer.from_pretrained(a.checkpoint)
    return train_hf(a, model, tok, micro_batch, checkpointing, Trainer, SFTConfig)


def run_unsloth(a, micro_batch: int, checkpointing: bool) -> dict:
    """Unsloth's path: FastLanguageModel.from_pretrained(load_in_4bit) + get_peft_model, TRL's SFTTrainer."""
    import unsloth  # noqa: F401  (first: it patches transformers and TRL)
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(
        str(a.checkpoint), max_seq_length=a.seq, load_in_4bit=True, local_files_only=True, dtype=None
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=a.dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing="unsloth" if checkpointing else False,
        random_state=0,
    )
    return train_hf(a, model, tok, micro_batch, False, SFTTrainer, SFTConfig)  # its own checkpointing


WORKERS = {"shardtune": run_shardtune, "trl": run_trl, "unsloth": run_unsloth}


# ------------------------------------------------------------------------------------------------- the driver
def worker_command(
    a, tool: str, micro_batch: int, checkpointing: bool, dropout: float
) -> tuple[list[str], dict]:
    cmd = [sys.executable, __file__, "--worker", tool, "--micro-batch", str(micro_batch)]
    cmd += ["--checkpointing"] if checkpointing else []
    cmd += ["--shape", a.shape, "--seq", str(a.seq), "--warmup", str(a.warmup), "--steps", str(a.steps)]
    cmd += ["--work", str(a.work), "--checkpoint", str(a.checkpoint), "--rows", str(a.rows)]
    cmd += ["--dropout", str(dropout)] + (["--tiny"] if a.tiny else [])
    path = [str(ROOT / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(":"))]
    if (
        tool == "unsloth"
    ):  # its own site folder first (bench/peers/unsloth_env.sh unpacks it): its pins differ
        path.insert(0, "/tmp/site_u")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=":".join(path))
    return cmd, env


def measure(a, tool: str, micro_batch: int, checkpointing: bool, dropout: float) -> dict:
    cmd, env = worker_command(a, tool, micro_batch, checkpointing, dropout)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"took more than --timeout {a.timeout} s"}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode or not lines:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)[-600:]}"}
    return json.loads(lines[-1])


def best_under(runs: list[dict], tool: str, dropout: float, budget: float) -> dict | None:
    """The tool's fastest run at this dropout whose whole-run peak fits the budget."""
    fits = [
        r
        for r in runs
        if r["tool"] == tool
        and r["settings"]["dropout"] == dropout
        and "error" not in r
        and (r["peak_gib"] or 0) <= budget
    ]
    return max(fits, key=lambda r: r["tokens_per_s_per_gpu"], default=None)


def table(records: list[dict], tools: list[str]) -> str:
    """One table per dropout: budget x tool -> tokens/s/GPU, peak GiB and the settings that made it."""
    out = []
    for dropout in sorted({r["settings"]["dropout"] for r in records}):
        out.append(f"LoRA dropout {dropout}")
        out.append(f"| {'budget':>7} | " + " | ".join(f"{t:>24}" for t in tools) + " |")
        for budget in sorted({r["budget_gib"] for r in records}):
            cells = []
            for tool in tools:
                r = next(
                    (
                        x
                        for x in records
                        if (x["tool"], x["budget_gib"], x["settings"]["dropout"]) == (tool, budget, dropout)
                    ),
                    None,
                )
                s = r and r["settings"]
                peak = f"{r['peak_gib']:5.1f}G" if r and r["peak_gib"] is not None else "    -"
                ckpt = "+ckpt" if s and s["checkpointing"] else "     "
                cells.append(
                    f"{r['tokens_per_s_per_gpu']:>7,.0f} {peak} mb{s['micro_batch']}{ckpt}"
                    if r
                    else "does not fit"
                )
            out.append(f"| {budget:>5} G | " + " | ".join(f"{c:>24}" for c in cells) + " |")
    return "\n".join(out)


def allocation_id() -> str:
    """An id the runs of one machine in one allocation share: SHARDTUNE_ALLOCATION, else the boot id."""
    if os.environ.get("SHARDTUNE_ALLOCATION"):
        return os.environ["SHARDTUNE_ALLOCATION"]
    boot = Path("/proc/sys/kernel/random/boot_id")
    return boot.read_text().strip()[:13] if boot.is_file() else uuid.uuid4().hex[:12]


def machine_name(tiny: bool) -> str:
    if tiny:
        return "cpu"
    smi = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]
    return subprocess.run(smi, capture_output=True, text=True).stdout.strip().splitlines()[0]


def run_all(a, tools: list[str], machine: str, allocation: str, out: Path) -> list[dict]:
    """Every tool at every dropout and setting, one process each; each run appended to runs.jsonl."""
    runs = []
    for dropout in a.dropouts:
        for tool in tools:
            for micro_batch, checkpointing in a.settings:
                t0 = time.time()
                result = measure(a, tool, micro_batch, checkpointing, dropout)
                settings = {"micro_batch": micro_batch, "checkpointing": checkpointing, **LORA}
                run = {
                    "tool": tool,
                    "shape": a.shape,
                    "settings": {**settings, "dropout": dropout, "seq": a.seq},
                    "machine": machine,
                    "allocation": allocation,
                    "wall_s": round(time.time() - t0),
                    **result,
                }
                runs.append(run)
                with (out / "runs.jsonl").open("a") as f:
                    f.write(json.dumps(run) + "\n")
                print(json.dumps({k: v for k, v in run.items() if k != "detail"}), flush=True)
    return runs


def drive(a) -> int:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tools = a.tools.split(",")
    temporary = not a.work  # removed at the end: an 8B checkpoint is 16 GB, the 70B proxy's 37 GB
    a.work = Path(a.work or tempfile.mkdtemp(prefix="peers-"))
    a.work.mkdir(parents=True, exist_ok=True)
    a.rows = write_rows(a.work / "rows.jsonl", (a.warmup + a.steps) * 4 + 4, a.seq)
    a.checkpoint = a.work / "checkpoint"
    if a.shape != "llama3-70b":
        write_checkpoint(a.shape, a.checkpoint, "cpu" if a.tiny else "cuda")
    elif set(tools) - {"shardtune"}:
        raise SystemExit("llama3-70b: shardtune only (no checkpoint on disk); use --tools shardtune")
    runs = run_all(a, tools, machine_name(a.tiny), allocation_id(), out)
    keep = ("tool", "shape", "tokens_per_s_per_gpu", "peak_gib", "settings", "machine", "allocation")
    records = [
        {"budget_gib": budget, **{k: best[k] for k in keep}}
        for dropout in a.dropouts
        for budget in (BUDGETS[a.shape] if not a.tiny else [1000])
        for tool in tools
        if (best := best_under(runs, tool, dropout, budget))
    ]
    with (out / "peers.jsonl").open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    print(table(records, tools))
    if temporary:
        shutil.rmtree(a.work, ignore_errors=True)
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", choices=[*sorted(BUDGETS), "tiny"])
    p.add_argument("--tools", default="shardtune,trl,unsloth")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default 3072; --tiny: 64)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--tiny", action="store_true", help="the tiny shape on the CPU (shardtune and trl)")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/peers"))
    p.add_argument("--dropout", default="0,0.05", help="LoRA dropouts, comma-separated (each a table)")
    p.add_argument(
        "--settings", help="micro-batch:checkpointing pairs, e.g. 4:0,1:1 (default: all of SETTINGS)"
    )
    p.add_argument("--timeout", type=int, default=900, help="seconds a run may take")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--micro-batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.tiny:
        a.shape, a.tools = "tiny", a.tools.replace(",unsloth", "")
    a.seq = a.seq or (64 if a.tiny else 3072)
    a.dropouts = [float(x) for x in str(a.dropout).split(",")]
    a.dropout = a.dropouts[0]  # a worker's one value
    pairs = [x.split(":") for x in a.settings.split(",")] if a.settings else SETTINGS
    a.settings = [(int(mb), bool(int(ckpt))) for mb, ckpt in pairs]
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(sys.argv[1:] if argv is None else argv)
    if not a.worker:
        return drive(a)
    a.work, a.checkpoint, a.rows = Path(a.work), Path(a.checkpoint), Path(a.rows)
    print(json.dumps(WORKERS[a.worker](a, a.micro_batch, a.checkpointing)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
