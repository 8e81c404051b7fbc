"""One training run, start to finish: the flow of DESIGN.md in one readable function.

config -> run directory -> tokenizer -> data (fails fast) -> base model (4-bit) -> LoRA -> FSDP
-> optimizer, schedule -> resume? -> loop (eval, checkpoints) -> final checkpoint -> adapter export
-> generated samples -> loss.png, summary.json
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import torch
import yaml
from transformers import get_scheduler

from shardtune import loading, modeling, parallel
from shardtune.checkpoint import CheckpointManager
from shardtune.config import Config, ConfigError, to_yaml
from shardtune.data.loader import GlobalBatchSampler, build_data
from shardtune.distributed import DistInfo, all_reduce_max, barrier, broadcast_object, gather_object
from shardtune.export import export_adapter
from shardtune.metrics import MetricsSink, device_peak_flops, gpu_peak_gib, host_peak_gib, host_rss_gib
from shardtune.tokenizer import build_tiny_tokenizer, load_tokenizer, prepare_tokenizer
from shardtune.trainer import FlopModel, Trainer

log = logging.getLogger("shardtune")

# Settings whose change makes a resumed run differ from an uninterrupted one; anything else (more steps,
# a new learning rate, eval or save cadence, logging) may change between a save and a resume.
EXACTNESS_KEYS = (
    "model",
    "quant",
    "lora",
    "data",
    "train.seed",
    "train.global_batch_size",
    "parallel.mixed_precision",
)


def _select(cfg_dict: dict, key: str):
    node = cfg_dict
    for part in key.split("."):
        node = node[part]
    return node


def _flatten(prefix: str, value) -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(f"{prefix}.{k}", v))
        return out
    return {prefix: value}


def exactness_differences(saved: dict, current: dict) -> list[str]:
    """Settings that differ between a checkpoint's config and this run's, among EXACTNESS_KEYS."""
    diffs = []
    for key in EXACTNESS_KEYS:
        a, b = _flatten(key, _select(saved, key)), _flatten(key, _select(current, key))
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                diffs.append(f"{k}: checkpoint {a.get(k)!r} -> now {b.get(k)!r}")
    return diffs


def _tokenizer(cfg: Config, run_dir: Path):
    saved = run_dir / "tokenizer"
    if saved.is_dir():  # a resumed run uses exactly the tokenizer it started with
        tok = load_tokenizer(str(saved))
    elif cfg.model.tokenizer:
        tok = load_tokenizer(cfg.model.tokenizer, trust_remote_code=cfg.model.trust_remote_code)
    elif cfg.model.name_or_path in modeling.BUILTIN_SHAPES:
        tok = build_tiny_tokenizer()
    else:
        tok = load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    return prepare_tokenizer(tok, cfg.data.pad_token, cfg.data.chat_template)


def _resume_point(cfg: Config, ckpts: CheckpointManager) -> Path | None:
    mode = cfg.train.resume
    if mode == "never":
        if ckpts.checkpoints():
            raise ConfigError(
                f"train.resume=never but {ckpts.dir} already holds checkpoints; choose another train.run_name, "
                f"or resume with train.resume=auto. (Nothing was deleted.)"
            )
        return None
    if mode == "auto":
        return ckpts.latest()
    path = Path(mode)
    from shardtune.checkpoint import verify_checkpoint

    problem = verify_checkpoint(path) if path.is_dir() else "no such directory"
    if problem:
        raise ConfigError(f"train.resume={mode}: {problem}")
    return path


def train(cfg: Config, dist: DistInfo, name: str) -> dict:
    """Run training as configured; returns the run's summary (also written to summary.json)."""
    run_dir = Path(cfg.train.output_dir) / (cfg.train.run_name or name)
    ckpts = CheckpointManager(run_dir / "checkpoints", cfg.train.keep_last, dist)
    resume_from = _resume_point(cfg, ckpts)
    cfg_yaml = to_yaml(cfg)
    if resume_from is not None:
        saved = yaml.safe_load((resume_from / "config.yaml").read_text())
        diffs = exactness_differences(saved, yaml.safe_load(cfg_yaml))
        if diffs:
            raise ConfigError(
                f"cannot resume {resume_from}: these settings changed since it was saved, so the run would not "
                f"continue exactly:\n  " + "\n  ".join(diffs) + "\nRestore them, or start a new run "
                "(train.run_name=...)."
            )
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg_yaml)
    barrier()

    # ---- tokenizer and data first: bad data fails here, before any model is loaded
    tokenizer = _tokenizer(cfg, run_dir)
    data = build_data(cfg.data, tokenizer, cfg.train.seed)
    if dist.is_main:
        if not (run_dir / "tokenizer").is_dir():
            tokenizer.save_pretrained(run_dir / "tokenizer")
        lengths = data.train.lengths()
        log.info(
            "data: %s, format %s: %d train rows, %d eval rows; tokens per row mean %.0f, max %d",
            data.origin,
            data.formatter.fmt,
            len(data.train),
            len(data.eval),
            lengths.mean(),
            lengths.max(),
        )
        if data.train.truncated or data.train.dropped:
            log.warning(
                "data: %d rows truncated to data.max_len=%d; %d dropped (no response token left)",
                data.train.truncated,
                cfg.data.max_len,
                data.train.dropped,
            )

    # ---- the base: streamed in layer by layer and sharded as it arrives (a small random one is first
    # written as a checkpoint, so that the adapter can be reloaded onto it; a large one is drawn on the devices)
    conf = modeling.model_config(cfg)
    base = cfg.model.name_or_path
    if cfg.model.init == "random":
        base_dir = run_dir / "base"
        if modeling.base_on_disk(cfg, conf):
            if dist.is_main and not base_dir.is_dir():
                modeling.write_random_base(cfg, tokenizer, base_dir)
            barrier()
            base = str(base_dir.resolve())
        else:
            base = None
    attn = modeling.attention_implementation(cfg.model.attn_implementation, dist.device)
    sharder = parallel.Sharder(cfg.parallel, cfg.param_dtype, dist.device, dist.world_size)
    host_before = host_rss_gib()
    model, built = loading.build_model(cfg, conf, base, attn, sharder, dist.device)
    peft_config = parallel.unwrap(model).peft_config["default"]
    peft_config.base_model_name_or_path = base or f"{cfg.model.name_or_path} (random, seed {cfg.train.seed})"
    sharding = parallel.sharding_report(model)
    host_load, gpu_load = all_reduce_max(
        [host_peak_gib() - host_before, gpu_peak_gib(dist.device) or 0.0], dist.device
    )
    if dist.is_main:
        log.info(
            "model: %s (%s), %s params, %s trainable (LoRA r=%d on %s), %s, attention %s, %s on %d %s(s)",
            cfg.model.name_or_path,
            cfg.model.init,
            f"{built.total:,}",
            f"{built.trainable:,}",
            cfg.lora.r,
            cfg.lora.target_modules,
            f"NF4 4-bit storage {cfg.storage_dtype}" if cfg.quant.load_in_4bit else "not quantized",
            attn,
            f"FSDP {cfg.parallel.sharding_strategy} compute {cfg.param_dtype}",
            dist.world_size,
            dist.device.type.upper() if dist.device.type == "cuda" else "CPU process",
        )
        log.info(
            "load: %.1fs from %s (%.1f GiB on disk); host RAM peak +%.2f GiB over start per process, "
            "GPU peak %.2f GiB per process",
            built.load_s,
            base or "random weights",
            built.source_bytes / 2**30,
            host_load,
            gpu_load,
        )

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    sampler = GlobalBatchSampler(
        len(data.train),
        cfg.train.global_batch_size,
        cfg.train.micro_batch_size,
        dist.world_size,
        dist.rank,
        cfg.train.seed,
    )
    total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * sampler.steps_per_epoch)
    scheduler = get_scheduler(
        cfg.optim.scheduler if cfg.optim.scheduler != "constant" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=cfg.optim.warmup_steps,
        num_training_steps=total_steps,
    )

    start_step, state = 0, {}
    torch.manual_seed(cfg.train.seed * 7919 + dist.rank)  # dropout differs per rank, reproducibly
    if resume_from is not None:
        state = ckpts.load(resume_from, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        start_step = state["step"]
        if dist.is_main:
            log.info(
                "resumed from %s (step %d, saved by %d processes)",
                resume_from,
                start_step,
                state["world_size"],
            )

    peak, peak_how = device_peak_flops(dist.device, modeling.DTYPES[cfg.param_dtype])
    flops = FlopModel(
        modeling.matmul_parameters(conf),
        conf.num_hidden_layers,
        conf.hidden_size,
        peak,
        cfg.parallel.activation_checkpointing,
    )
    trainer = Trainer(
        model, optimizer, scheduler, data, sampler, tokenizer, dist, flops, cfg.train.max_grad_norm
    )
    trainer.tokens_seen = state.get("tokens_seen", 0)
    sink = MetricsSink(run_dir, total_steps, start_step, dist.is_main)
    sink.write(
        f"training {total_steps} steps of {cfg.train.global_batch_size} rows "
        f"({sampler.grad_accum} x {cfg.train.micro_batch_size} rows per process per step), "
        f"{sampler.steps_per_epoch} steps per epoch; MFU against {peak / 1e12:.2f} TFLOP/s ({peak_how})"
    )

    with tempfile.TemporaryDirectory() as tmp:
        peft_config.save_pretrained(tmp)
        adapter_config = (Path(tmp) / "adapter_config.json").read_bytes()
    model_config = conf.to_json_string().encode()

    first_eval = state.get("first_eval")
    if start_step == 0:
        first_eval = trainer.evaluate(cfg.eval.batch_size, cfg.eval.max_rows)
        sink.eval(0, first_eval)

    def save(step: int) -> Path:
        return ckpts.save(
            step,
            model,
            optimizer,
            {
                "scheduler": scheduler.state_dict(),
                "tokens_seen": trainer.tokens_seen,
                "epoch_position": list(sampler.position(step)),
                "first_eval": first_eval,
                "config_hash": hashlib.sha256(cfg_yaml.encode()).hexdigest()[:16],
            },
            {
                "config.yaml": cfg_yaml.encode(),
                "adapter_config.json": adapter_config,
                "model_config.json": model_config,
            },
        )

    last_saved, last_save_time = start_step if resume_from else -1, time.monotonic()
    train_start = time.perf_counter()
    for step in range(start_step, total_steps):
        metrics = trainer.train_step(step)
        done = step + 1
        sink.train_step(done, metrics, log_line=done % cfg.train.log_every == 0 or done == total_steps)
        if cfg.eval.every and done % cfg.eval.every == 0 and done != total_steps:
            sink.eval(done, trainer.evaluate(cfg.eval.batch_size, cfg.eval.max_rows))
        timed = cfg.train.save_every_minutes is not None and broadcast_object(
            time.monotonic() - last_save_time >= 60 * cfg.train.save_every_minutes
        )
        if (cfg.train.save_every and done % cfg.train.save_every == 0) or timed:
            save(done)
            last_saved, last_save_time = done, time.monotonic()
    train_time = time.perf_counter() - train_start

    final_eval = trainer.evaluate(cfg.eval.batch_size, cfg.eval.max_rows)
    sink.eval(total_steps, final_eval)
    if last_saved != total_steps:
        save(total_steps)
    final_ckpt = ckpts.latest(verify=False)
    adapter_dir = run_dir / "adapter"
    if dist.is_main:
        export_adapter(final_ckpt, adapter_dir)
    barrier()

    samples = _samples(cfg, trainer, data)
    peaks = gather_object({"host_peak_gib": host_peak_gib(), "gpu_peak_gib": gpu_peak_gib(dist.device)})
    summary = {
        "run_dir": str(run_dir),
        "steps": total_steps,
        "first_eval_loss": first_eval["eval_loss"] if first_eval else None,
        "final_eval_loss": final_eval["eval_loss"],
        "trainable_params": built.trainable,
        "total_params": built.total,
        "load_s": built.load_s,
        "load_host_peak_gib": host_load,
        "host_peak_gib_per_rank": [p["host_peak_gib"] for p in peaks],
        "gpu_peak_gib_per_rank": [p["gpu_peak_gib"] for p in peaks],
        "world_size": dist.world_size,
        "rank0_holds": sharding["local"] / sharding["total"],  # fraction of the flat parameters on rank 0
        "train_time_s": train_time,
        "tokens_seen": trainer.tokens_seen,
        "exact_match": samples["exact_match"],
        "adapter": str(adapter_dir),
        "base": base,
        "checkpoint": str(final_ckpt),
    }
    if dist.is_main:
        plot = sink.plot()
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        _print_summary(sink, summary, run_dir, plot, samples, cfg.eval.show)
    sink.close()
    return summary


def _samples(cfg: Config, trainer: Trainer, data) -> dict:
    """Generate completions for held-out rows (scored by exact match) and for eval.questions."""
    fmt = data.formatter
    rows = data.eval_rows[: cfg.eval.samples] if fmt.fmt != "text" else []
    prompts = [fmt.prompt(r, i) for i, r in enumerate(rows)]
    refs = [fmt.reference(r, i) for i, r in enumerate(rows)]
    questions = [fmt.question_prompt(q) for q in cfg.eval.questions]
    outputs = trainer.generate(prompts + questions, cfg.eval.max_new_tokens, cfg.eval.batch_size)
    records = [
        {"prompt": p, "reference": r, "generated": g, "exact": g.strip() == r.strip()}
        for p, r, g in zip(prompts, refs, outputs[: len(prompts)], strict=True)
    ]
    records += [
        {"question": q, "generated": g}
        for q, g in zip(cfg.eval.questions, outputs[len(prompts) :], strict=True)
    ]
    hits = sum(r.get("exact", False) for r in records)
    return {
        "records": records,
        "exact_match": (hits / len(rows)) if rows else None,
        "hits": hits,
        "n": len(rows),
    }


def _print_summary(
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
    lines += [
        f"\nrun directory: {run_dir}",
        f"  adapter (PEFT):  {summary['adapter']}   PeftModel.from_pretrained(base, this)",
        f"  base model:      {summary['base'] or 'random weights drawn on the devices (not saved)'}",
        f"  checkpoint:      {summary['checkpoint']}",
        f"  loss curve:      {plot}",
        f"  tensorboard:     {run_dir / 'tensorboard'}   (tensorboard --logdir {run_dir / 'tensorboard'})",
        f"  metrics, samples: {run_dir / 'metrics.jsonl'}, {run_dir / 'generations.jsonl'}",
    ]
    sink.write("\n".join(lines))
