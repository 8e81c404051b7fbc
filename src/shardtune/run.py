"""One training run, start to finish: the flow of DESIGN.md.

    run directory, resume point -> tokenizer -> data (fails fast) -> model, built layer by layer and sharded
    -> optimizer, schedule, restored state -> loop (eval, checkpoints, stop signals)
    -> final eval and checkpoint -> adapter export -> generated samples -> loss.png, summary.json

`status.json` in the run directory says where the run is (running, interrupted, complete, failed), for
launchers and schedulers that cannot see the processes' exit codes.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import get_scheduler

from shardtune import loading, modeling, parallel
from shardtune.checkpoint import (
    CheckpointManager,
    checkpoint_step,
    exactness_differences,
    resume_point,
    set_aside_after,
    write_atomic,
)
from shardtune.config import Config, ConfigError, apply_overrides, to_yaml
from shardtune.data.formats import DataError
from shardtune.data.loader import Data, GlobalBatchSampler, build_data, padding_advice
from shardtune.distributed import DistInfo, all_reduce_max, barrier, gather_object
from shardtune.export import export_adapter
from shardtune.metrics import MetricsSink, device_peak_flops, gpu_peak_gib, host_peak_gib, host_rss_gib
from shardtune.profiling import StepProfiler
from shardtune.stopping import STOP_FILE, StopRequest, launcher_restarts
from shardtune.tokenizer import build_tiny_tokenizer, load_tokenizer, prepare_tokenizer
from shardtune.trainer import FlopModel, Trainer

log = logging.getLogger("shardtune")


def write_status(run_dir: Path, status: str, **fields) -> None:
    """status.json: running | interrupted | complete | failed, with the step and what to do next."""
    record = {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(), **fields}
    write_atomic(run_dir / "status.json", json.dumps(record, indent=1).encode())


def train(
    cfg: Config, dist: DistInfo, name: str, stop: StopRequest | None = None, stop_file: Path | None = None
) -> dict:
    """Run training as configured; returns the run's summary ("status" interrupted or complete). `stop` is
    the entry point's signal record (installed before the slow imports); one is installed here otherwise.
    `stop_file`: the file whose appearance stops the run (slurm/train.sh writes it), when it is not the run
    directory's own STOP (a sweep's runs share the sweep's, which the sweep removes).
    The loop runs with the objects alive before it frozen out of the garbage collector's sight (see _train);
    on the way out everything frozen in this process is unfrozen, a caller's own `gc.freeze()` included."""
    run_dir = Path(cfg.train.output_dir) / (cfg.train.run_name or name)
    ckpts = CheckpointManager(
        run_dir / "checkpoints", cfg.train.keep_last, dist, cfg.train.save_timeout_minutes
    )
    cfg_yaml = to_yaml(cfg)
    try:
        stopped = _stop_recorded_by_this_launch(run_dir, dist)
        if stopped is not None:
            return stopped
        resume_from = resume_point(cfg.train.resume, ckpts, cfg_yaml)
        if dist.is_main:
            if resume_from is None:
                _drop_stale_leftovers(run_dir, cfg_yaml)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(cfg_yaml)
            write_status(run_dir, "running", world_size=dist.world_size, resumed_from=str(resume_from or ""))
        barrier()
        if stop is not None:
            return _train(cfg, dist, run_dir, ckpts, resume_from, cfg_yaml, stop, stop_file)
        with StopRequest() as own:
            return _train(cfg, dist, run_dir, ckpts, resume_from, cfg_yaml, own, stop_file)
    except BaseException as e:
        # (a refused resume too: the status an earlier start left must not stand for this one)
        if dist.is_main and run_dir.is_dir():
            write_status(
                run_dir,
                "failed",
                error=f"{type(e).__name__}: {e}",
                # a configuration or data error fails again however often the run starts: not retried
                input_error=isinstance(e, (ConfigError, DataError)),
                traceback=traceback.format_exc()[-4000:],
            )
        raise
    finally:
        gc.unfreeze()  # what was frozen (imports, then the run's objects in _train) is collectable again


def _stop_recorded_by_this_launch(run_dir: Path, dist: DistInfo) -> dict | None:
    """The summary of a stop that an earlier attempt of this same launch saved and recorded, when the launcher
    has started the processes again since (`torchrun --max-restarts`); else None. A stopped run exits 0 from
    every process, so no restart should follow it; but one that fails on its way out (a crash in NCCL's
    teardown) makes the launcher start the run again with its STOP file gone, and it would train on past the
    stop (under Slurm into the time limit, unsaved). "This launch": status.json says interrupted and was written
    after the launcher started. Every rank takes rank 0's answer."""
    if launcher_restarts() == 0:
        return None
    record = None
    if dist.is_main:
        path, started = run_dir / "status.json", _launcher_started()
        try:
            if started is not None and path.stat().st_mtime > started:
                record = json.loads(path.read_text())
        except (OSError, ValueError):
            pass
        if record is not None and record.get("status") != "interrupted":
            record = None
    if not all_reduce_max([float(record is not None)], dist.device)[0]:
        return None
    if dist.is_main:
        log.warning(
            "this launch stopped on request after step %s and saved (%s); the launcher started it again after "
            "a process failed on its way out: not training on past the stop",
            record.get("step"),
            record.get("checkpoint"),
        )
    record = record or {}
    return {
        "status": "interrupted",
        "run_dir": str(run_dir),
        "step": record.get("step"),
        "checkpoint": record.get("checkpoint"),
    }


def _launcher_started() -> float | None:
    """When the process that started this one (torchrun, accelerate launch) started, in seconds since the epoch,
    from /proc (Linux); None where that cannot be read."""
    try:
        fields = Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        ticks = int(fields[19])  # field 22 of stat, starttime: clock ticks from boot to the process's start
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _resolve_auto(cfg: Config, conf, dist: DistInfo) -> Config:
    """The settings left to the run, decided here: model.fused_kernels=auto (where Liger can run), and
    parallel.activation_checkpointing / parallel.sharding_strategy=auto (the least recomputation, then the least
    sharding, that `shardtune plan` says fits this GPU; none and FULL_SHARD on the CPU, where memory is the
    host's)."""
    fused = modeling.fused_kernels(cfg, conf, dist.device.type)  # `true` where it cannot run: refused here
    cfg = apply_overrides(cfg, {"model.fused_kernels": fused}, "model.fused_kernels")
    from shardtune import plan

    # NOTE: every rank decides alone, so each decides from the same facts: the least GPU memory of any process,
    # the machines counted from every machine's process count (ranks that chose different sharding would wait
    # in each other's collectives until the timeout)
    facts = gather_object((dist.local_world_size, plan.device_memory(cfg, dist.device)))
    per_machine = sorted({n for n, _ in facts})
    memories = [m for _, m in facts if m is not None]
    gpu_mem = min(memories) if memories else None
    if len(per_machine) > 1 and cfg.parallel.sharding_strategy == "HYBRID_SHARD":
        raise ConfigError(
            f"parallel.sharding_strategy=HYBRID_SHARD needs the same number of processes on every machine; this "
            f"run's machines have {per_machine} (LOCAL_WORLD_SIZE). Start as many on each, or use FULL_SHARD."
        )
    # machines of unequal sizes are planned as one (auto then never picks HYBRID_SHARD)
    nodes = dist.world_size // per_machine[0] if len(per_machine) == 1 else 1
    resolved, est = plan.resolve_auto(cfg, conf, dist.world_size, gpu_mem, nodes)
    if dist.is_main and resolved is not cfg:
        log.info(
            "auto: %s%s",
            plan.describe_auto(cfg, resolved),
            f", planned peak {est.gpu_peak / 2**30:.1f} of {gpu_mem / 2**30:.0f} GiB" if est else " (CPU)",
        )
    return resolved


def _drop_stale_leftovers(run_dir: Path, cfg_yaml: str) -> None:
    """A fresh start in a run directory that an earlier start left without a checkpoint (it failed or was
    killed before its first save): the tokenizer and random base that start wrote are reused as the run's own
    (tokenizer_for, _model) only if they were made with the same model, data and LoRA settings; else they go,
    and this start makes its own. Nothing else in the directory is touched."""
    before = run_dir / "config.yaml"
    if not before.is_file():
        return
    try:
        diffs = exactness_differences(yaml.safe_load(before.read_text()), yaml.safe_load(cfg_yaml))
    except (KeyError, TypeError, yaml.YAMLError):  # written by another version of shardtune: not comparable
        diffs = ["config.yaml of another form"]
    stale = [d for d in (run_dir / "tokenizer", run_dir / "base") if d.is_dir()]
    if diffs and stale:
        for d in stale:
            shutil.rmtree(d)
        log.info(
            "%s: made by an earlier start with other settings (%s) and no checkpoint; made again",
            ", ".join(d.name + "/" for d in stale),
            "; ".join(diffs[:3]),
        )


def _fingerprint(data: Data) -> str:
    """A hash of the training rows as tokenized (ids, trained tokens, row bounds): equal exactly when the run
    would read the same tokens in the same order at every step."""
    h = hashlib.sha256()
    for array in (data.train.ids, data.train.trained, data.train.offsets):
        h.update(array.tobytes())
    return h.hexdigest()[:16]


def _check_same_data(checkpoint: Path, fingerprint: str, origin: str) -> None:
    """Refuse to resume onto training data that changed since the checkpoint (an edited file, a dataset that
    moved on): the data position would point into other rows, and the run would go on silently on a
    different order. The settings that shape the data are checked with the rest (checkpoint.EXACTNESS_KEYS)."""
    saved = json.loads((checkpoint / "train_state.json").read_text()).get("data_fingerprint")
    if saved is None:
        log.warning(
            "%s holds no hash of its training data (saved before they were kept): not checked", checkpoint
        )
    elif saved != fingerprint:
        raise ConfigError(
            f"cannot resume {checkpoint}: the training data from {origin} is not what it was trained on (its "
            f"rows or their tokens changed since). Restore the data, or start a new run (train.run_name=...)."
        )


def _optimizer_settings(cfg: Config, optimizer, scheduler) -> list[str]:
    """A resumed run trains on with this run's optimizer settings, which may differ from the checkpoint's (a
    new learning rate is allowed: they are not among checkpoint.EXACTNESS_KEYS). Loading the optimizer and the
    schedule put the checkpoint's back (its param groups, the scheduler's base rates); this run's are set
    again here, and the rate of the step the schedule is at recomputed from this run's base and schedule.
    Unchanged settings leave everything as loaded (bit-exact resume). Returns the changes, for the log."""
    o, changed = cfg.optim, []
    for key, now in (("betas", tuple(o.betas)), ("eps", o.eps), ("weight_decay", o.weight_decay)):
        before = optimizer.param_groups[0][key]
        if (tuple(before) if key == "betas" else before) != now:
            changed.append(f"optim.{key}={now} (the checkpoint's: {before})")
            for group in optimizer.param_groups:
                group[key] = now
    if any(base != o.lr for base in scheduler.base_lrs):
        changed.append(f"optim.lr={o.lr} (the checkpoint's: {scheduler.base_lrs[0]})")
        scheduler.base_lrs = [o.lr] * len(optimizer.param_groups)
        for group in optimizer.param_groups:
            group["initial_lr"] = o.lr
    # The next step's rate, from this run's base and schedule (a new max_steps or warmup changes the factor):
    # LambdaLR's (every schedule transformers builds) own formula, so unchanged settings give the loaded float
    rates = [
        base * factor(scheduler.last_epoch)
        for factor, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)
    ]
    if rates != [group["lr"] for group in optimizer.param_groups]:
        changed.append(
            f"the rate at step {scheduler.last_epoch + 1} {rates[0]:.3g} (the checkpoint's schedule: "
            f"{optimizer.param_groups[0]['lr']:.3g})"
        )
        for group, rate in zip(optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
        scheduler._last_lr = rates
    return changed


def tokenizer_for(cfg: Config, run_dir: Path):
    """The tokenizer the run trains with: the run directory's own when resuming, else the model's (or the
    built-in one for the built-in shapes), with the configured pad token and chat template."""
    saved = run_dir / "tokenizer"
    if saved.is_dir():  # a resumed run uses exactly the tokenizer it started with
        tok = load_tokenizer(str(saved))
    elif cfg.model.tokenizer:
        tok = load_tokenizer(cfg.model.tokenizer, trust_remote_code=cfg.model.trust_remote_code)
    elif cfg.model.name_or_path in modeling.BUILTIN_SHAPES:
        tok = build_tiny_tokenizer()
    else:
        tok = load_tokenizer(
            cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code, "model.name_or_path"
        )
    return prepare_tokenizer(tok, cfg.data.pad_token, cfg.data.chat_template)


def _data(cfg: Config, dist: DistInfo, run_dir: Path, tokenizer) -> Data:
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
        advice = padding_advice(lengths, cfg)
        if advice:
            log.warning("data: %s", advice)
        if data.train.truncated or data.train.dropped:
            log.warning(
                "data: %d rows truncated to data.max_len=%d; %d dropped (no response token left)",
                data.train.truncated,
                cfg.data.max_len,
                data.train.dropped,
            )
        if data.train.empty or data.eval.empty:
            log.warning(
                "data: %d training and %d eval rows left out: their response is empty (the first: %s)",
                len(data.train.empty),
                len(data.eval.empty),
                data.train.empty_example or data.eval.empty_example,
            )
    return data


@dataclass
class Model:
    module: torch.nn.Module
    conf: object
    base: str | None  # checkpoint the 4-bit base came from; None when drawn at random on the devices
    build: loading.BuildReport
    rank0_holds: float
    host_load_gib: float
    attention: str
    deepspeed_config: dict | None = None  # parallel.backend=deepspeed: the engine is made with the optimizer


def sharder_for(cfg: Config, dist: DistInfo):
    """What shards the model as it is built: FSDP (parallel.py) or DeepSpeed ZeRO-3 (zero3.py)."""
    if cfg.parallel.backend == "deepspeed":
        import importlib.util

        from shardtune import zero3

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                "parallel.backend=deepspeed needs DeepSpeed: pip install 'shardtune[deepspeed]'"
            )

        config = zero3.ds_config(
            cfg.parallel, dist.device, cfg.train.micro_batch_size, dist.world_size, cfg.train.max_grad_norm
        )
        return zero3.ZeroSharder(cfg.parallel, config, dist.device, dist.world_size)
    return parallel.Sharder(
        cfg.parallel, cfg.param_dtype, dist.device, dist.world_size, dist.local_world_size
    )


def _model(cfg: Config, conf, dist: DistInfo, run_dir: Path, tokenizer) -> Model:
    """The base streamed in layer by layer and sharded as it arrives. A small random base is first written as
    a checkpoint, so that the adapter can be reloaded onto it; a large one is drawn on the devices."""
    base = cfg.model.name_or_path
    if cfg.model.init == "random":
        base = None
        if modeling.base_on_disk(cfg, conf):
            base_dir = run_dir / "base"
            if dist.is_main and not base_dir.is_dir():
                modeling.write_random_base(cfg, tokenizer, base_dir)
            barrier()
            base = str(base_dir.resolve())
    attn = modeling.attention_implementation(cfg.model.attn_implementation, dist.device)
    sharder = sharder_for(cfg, dist)
    host_before = host_rss_gib()
    module, build = loading.build_model(cfg, conf, base, attn, sharder, dist.device)
    config = getattr(sharder, "config", None)
    host_load, gpu_load = all_reduce_max(
        [host_peak_gib() - host_before, gpu_peak_gib(dist.device) or 0.0], dist.device
    )
    share = parallel.sharding_report(module)
    if dist.is_main:
        from shardtune import nf4  # bitsandbytes: imported by the loader already

        log.info(
            "model: %s (%s), %s params, %s trainable (LoRA r=%d on %s), %s, attention %s%s, %s on %d %s(s)",
            cfg.model.name_or_path,
            cfg.model.init,
            f"{build.total:,}",
            f"{build.trainable:,}",
            cfg.lora.r,
            cfg.lora.target_modules,
            f"{cfg.quant.quant_type.upper()} 4-bit storage {cfg.storage_dtype}, "
            f"{nf4.describe(cfg.quant, dist.device)}"
            if cfg.quant.load_in_4bit
            else "not quantized",
            attn,
            ", Liger fused kernels" if cfg.model.fused_kernels is True else "",
            f"FSDP {cfg.parallel.sharding_strategy} compute {cfg.param_dtype}"
            if cfg.parallel.backend == "fsdp"
            else f"DeepSpeed ZeRO-3 compute {cfg.param_dtype}",
            dist.world_size,
            dist.device.type.upper() if dist.device.type == "cuda" else "CPU process",
        )
        log.info(
            "load: %.1fs from %s (%.1f GiB on disk); host RAM peak +%.2f GiB over start per process, "
            "GPU peak %.2f GiB per process",
            build.load_s,
            base or "random weights",
            build.source_bytes / 2**30,
            host_load,
            gpu_load,
        )
    return Model(module, conf, base, build, share["local"] / share["total"], host_load, attn, config)


def _train(
    cfg: Config,
    dist: DistInfo,
    run_dir: Path,
    ckpts: CheckpointManager,
    resume_from: Path | None,
    cfg_yaml: str,
    stop: StopRequest,
    stop_file: Path | None,
) -> dict:
    own_stop_file = stop_file is None
    stop_file = stop_file or run_dir / STOP_FILE
    tokenizer = tokenizer_for(cfg, run_dir)
    data = _data(cfg, dist, run_dir, tokenizer)  # bad data fails here, before any model is loaded
    sampler = GlobalBatchSampler(  # and a batch size that does not divide, too
        len(data.train),
        cfg.train.global_batch_size,
        cfg.train.micro_batch_size,
        dist.world_size,
        dist.rank,
        cfg.train.seed,
        lengths=data.train.lengths(),
        micro_tokens=cfg.train.micro_batch_tokens,
    )
    total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * sampler.steps_per_epoch)
    fingerprint = _fingerprint(data)
    if resume_from is not None:
        _check_same_data(resume_from, fingerprint, data.origin)
        saved = checkpoint_step(resume_from)
        if saved > total_steps:  # training on would save this run's last step over weights from later ones
            raise ConfigError(
                f"train.resume: {resume_from} is at step {saved}, past this run's last step {total_steps} "
                f"(train.max_steps={cfg.train.max_steps}, train.epochs={cfg.train.epochs}). Raise train.max_steps "
                f"to train on; for an earlier step's adapter: shardtune export <run>/checkpoints/step-<N> OUT_DIR"
            )
        set_aside_after(ckpts, saved)  # nothing refuses this resume any more
    conf = modeling.model_config(cfg)  # read once: a hub model's config is a download
    cfg = _resolve_auto(cfg, conf, dist)
    m = _model(cfg, conf, dist, run_dir, tokenizer)
    model = m.module
    peft_config = parallel.unwrap(model).peft_config["default"]
    peft_config.base_model_name_or_path = (
        m.base or f"{cfg.model.name_or_path} (random, seed {cfg.train.seed})"
    )

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    scheduler = get_scheduler(
        "constant_with_warmup" if cfg.optim.scheduler == "constant" else cfg.optim.scheduler,
        optimizer,
        num_warmup_steps=cfg.optim.warmup_steps,
        num_training_steps=total_steps,
    )

    if m.deepspeed_config is not None and dist.world_size > 1:
        from shardtune import zero3

        model = zero3.initialize(model, optimizer, m.deepspeed_config)
    scaler = None
    if cfg.parallel.mixed_precision == "fp16":
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        scaler = ShardedGradScaler(device=dist.device.type)  # agrees on overflow across ranks
    start_step, state = 0, {}
    torch.manual_seed(cfg.train.seed * 7919 + dist.rank)  # dropout differs per rank, reproducibly
    if resume_from is not None:
        state = ckpts.load(resume_from, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(state["grad_scaler"])
        start_step = state["step"]
        changed = _optimizer_settings(cfg, optimizer, scheduler)
        if dist.is_main:
            log.info(
                "resumed from %s (step %d, saved by %d process%s)%s",
                resume_from,
                start_step,
                state["world_size"],
                "es" if state["world_size"] > 1 else "",
                f"; from here on {', '.join(changed)}" if changed else "",
            )

    peak, peak_how = device_peak_flops(dist.device, modeling.DTYPES[cfg.param_dtype])
    flops = FlopModel(
        modeling.matmul_parameters(m.conf),
        m.conf.num_hidden_layers,
        m.conf.hidden_size,
        peak,
        parallel.checkpointed_fraction(cfg.parallel, m.conf.num_hidden_layers),
    )
    adapters_autocast = cfg.lora.compute_dtype == "auto" and cfg.param_dtype != "float32"
    trainer = Trainer(
        model,
        optimizer,
        scheduler,
        data,
        sampler,
        tokenizer,
        dist,
        flops,
        cfg.train.max_grad_norm,
        scaler,
        autocast_dtype=modeling.DTYPES[cfg.param_dtype] if adapters_autocast else None,
        packed=cfg.data.packing,
        fused_loss=cfg.model.fused_kernels,
    )
    trainer.tokens_seen = state.get("tokens_seen", 0)
    sink = MetricsSink(run_dir, total_steps, start_step, dist.is_main)
    micro = (
        f"micro-batches of at most {cfg.train.micro_batch_tokens:,} tokens, as many on every process"
        if cfg.train.micro_batch_tokens
        else f"{sampler.grad_accum} x {cfg.train.micro_batch_size} rows per process per step"
    )
    sink.write(
        f"training {total_steps} steps of {cfg.train.global_batch_size} rows ({micro}), "
        f"{sampler.steps_per_epoch} steps per epoch; MFU against {peak / 1e12:.2f} TFLOP/s ({peak_how})"
    )

    with tempfile.TemporaryDirectory() as tmp:
        peft_config.save_pretrained(tmp)
        adapter_config = (Path(tmp) / "adapter_config.json").read_bytes()
    first_eval = state.get("first_eval")
    if start_step == 0:
        first_eval = trainer.evaluate(cfg.eval.batch_size, cfg.eval.max_rows)
        sink.eval(0, first_eval)
    elif state.get("eval_pending"):  # due at the step the last start stopped after, left to this one
        sink.eval(start_step, trainer.evaluate(cfg.eval.batch_size, cfg.eval.max_rows))

    def save(step: int, eval_pending: bool = False) -> Path:
        train_state = {
            "eval_pending": eval_pending,
            "scheduler": scheduler.state_dict(),
            "tokens_seen": trainer.tokens_seen,
            "epoch_position": list(sampler.position(step)),
            "first_eval": first_eval,
            "config_hash": hashlib.sha256(cfg_yaml.encode()).hexdigest()[:16],
            "data_fingerprint": fingerprint,
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
        }
        files = {
            "config.yaml": cfg_yaml.encode(),
            "adapter_config.json": adapter_config,
            "model_config.json": m.conf.to_json_string().encode(),
        }
        return ckpts.save(step, model, optimizer, train_state, files)

    # ---- the loop. At every step boundary the ranks agree, in one all-reduce, on whether any of them was
    # signalled and whether a timed save is due, so that all of them save (and stop) after the same step.
    last_saved, final_ckpt = (start_step if resume_from else -1), resume_from

    def asked() -> float:  # this rank was signalled, or (rank 0) the STOP file is there
        return float(stop.received is not None or (dist.is_main and stop_file.exists()))

    # What is alive now lives for the whole run (the model's modules, parameters and quantization states, the
    # data): frozen out of the garbage collector's sight, so that its full collections walk only what the loop
    # allocates (~3 ms). Walking all 700k objects took 0.5 s, one step in 12-35 (80-layer 70B on one H200: a
    # 2.06 s step among 1.63 s ones); with several GPUs every rank waits for the one collecting. train()
    # unfreezes it.
    gc.collect()
    gc.freeze()
    last_save_time, train_start = time.monotonic(), time.perf_counter()
    done = start_step
    profiler = StepProfiler(dist.rank)
    for step in range(start_step, total_steps):
        profiler.before(step + 1)
        metrics = trainer.train_step(step)
        done = step + 1
        profiler.after(done)
        sink.train_step(done, metrics, log_line=done % cfg.train.log_every == 0 or done == total_steps)
        minutes = cfg.train.save_every_minutes
        timed = minutes is not None and time.monotonic() - last_save_time >= 60 * minutes
        signalled, timed = (bool(v) for v in all_reduce_max([asked(), float(timed)], dist.device))
        eval_due = bool(cfg.eval.every) and done % cfg.eval.every == 0 and done != total_steps
        # stopping: the save first (a signal's grace is short), the eval left to the next start
        eval_pending = eval_due and signalled
        if eval_due and not eval_pending:
            sink.eval(done, trainer.evaluate(cfg.eval.batch_size, cfg.eval.max_rows))
            # a signal that came during the eval: saved now, not a step later
            signalled = bool(all_reduce_max([asked()], dist.device)[0])
        stopping = signalled and done < total_steps
        if signalled or timed or (cfg.train.save_every and done % cfg.train.save_every == 0):
            path = save(done, eval_pending=eval_pending)
            last_saved, last_save_time, final_ckpt = done, time.monotonic(), path
            if stopping:
                if dist.is_main:
                    stop_file.unlink(missing_ok=True)  # acted on: the next start trains on
                    write_status(
                        run_dir,
                        "interrupted",
                        step=done,
                        checkpoint=str(path),
                        next="run the same command again: train.resume=auto continues from here",
                    )
                sink.write(
                    f"stopped (signal or {STOP_FILE} file) after step {done}/{total_steps}; checkpoint {path}"
                )
                sink.close()
                return {
                    "status": "interrupted",
                    "run_dir": str(run_dir),
                    "step": done,
                    "checkpoint": str(path),
                }
    train_time = time.perf_counter() - train_start

    final_eval = trainer.evaluate(cfg.eval.batch_size, cfg.eval.max_rows)
    sink.eval(total_steps, final_eval)
    if last_saved != total_steps:
        final_ckpt = save(total_steps)
    adapter_dir = run_dir / "adapter"
    if dist.is_main:
        export_adapter(final_ckpt, adapter_dir)
    barrier()

    samples = _samples(cfg, trainer, data)
    peaks = gather_object({"host_peak_gib": host_peak_gib(), "gpu_peak_gib": gpu_peak_gib(dist.device)})
    summary = {
        "status": "complete",
        "run_dir": str(run_dir),
        "steps": total_steps,
        "first_eval_loss": first_eval["eval_loss"] if first_eval else None,
        "final_eval_loss": final_eval["eval_loss"],
        "trainable_params": m.build.trainable,
        "total_params": m.build.total,
        "load_s": m.build.load_s,
        "load_host_peak_gib": m.host_load_gib,
        "host_peak_gib_per_rank": [p["host_peak_gib"] for p in peaks],
        "gpu_peak_gib_per_rank": [p["gpu_peak_gib"] for p in peaks],
        "world_size": dist.world_size,
        "device_name": torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else "cpu",
        "attention": m.attention,
        "activation_checkpointing": cfg.parallel.activation_checkpointing,  # as resolved (auto -> a choice)
        "sharding_strategy": cfg.parallel.sharding_strategy,  # as resolved
        "checkpoint_every": cfg.parallel.checkpoint_every,
        "fused_kernels": cfg.model.fused_kernels,  # as resolved
        "rank0_holds": m.rank0_holds,  # fraction of the flat parameters on rank 0
        "train_time_s": train_time,
        "tokens_seen": trainer.tokens_seen,
        "exact_match": samples["exact_match"],
        "adapter": str(adapter_dir),
        "base": m.base,
        "checkpoint": str(final_ckpt),
    }
    if dist.is_main:
        plot = sink.plot()
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        _print_summary(sink, summary, run_dir, plot, samples, cfg.eval.show)
        if own_stop_file:  # a stop asked after the last step is moot (a sweep's next run acts on its own)
            stop_file.unlink(missing_ok=True)
        write_status(
            run_dir, "complete", step=total_steps, checkpoint=str(final_ckpt), adapter=str(adapter_dir)
        )
    sink.close()
    return summary


def _samples(cfg: Config, trainer: Trainer, data: Data) -> dict:
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
