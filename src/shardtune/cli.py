"""The `shardtune` command: tools around runs (training itself is `accelerate launch recipes/X.py`).

shardtune validate RECIPE.py [key=value ...]     check a recipe and overrides, load nothing
shardtune export RUN_OR_CHECKPOINT OUT            write a PEFT adapter directory from a checkpoint
shardtune merge RUN_OR_CHECKPOINT OUT [--base DIR] [--dtype bfloat16]
                                                   base + adapter as one Hugging Face model directory
shardtune submit RECIPE.py [key=value ...] [--sweep key=v1,v2] --nodes N --gpus-per-node G --time T ...
                                                   train on SLURM through submitit (see shardtune/submit.py)
shardtune status [JOB]  |  logs JOB [--task I]  |  cancel JOB
shardtune plan RECIPE.py [key=value ...] --gpus N --gpu-mem 24GiB [--fit]
                                                   predicted memory, checkpoint size and speed
shardtune bench SHAPE [key=value ...] --gpus N --seq 3072 --micro-batch 1 [--lengths instruct]
                                                   train a random model of a named shape, one JSON line
shardtune doctor RECIPE.py [key=value ...] [--signal-lead S] [--smoke]
                                                   versions, CUDA/NCCL, 4-bit kernels, dtypes, disk
                                                   submitted jobs: state, errors, logs; cancel one
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from shardtune.config import ConfigError


def load_recipe_config(path: str):
    """Import a recipe file and call its `config()`."""
    from shardtune.recipe import load_recipe

    return load_recipe(path).config()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardtune", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check a recipe and overrides without loading anything")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p = sub.add_parser("export", help="write a PEFT adapter directory from a run or checkpoint")
    p.add_argument("source", help="a run directory (its newest intact checkpoint) or a checkpoint directory")
    p.add_argument("out", help="adapter directory to write")
    p = sub.add_parser("merge", help="merge the adapter into its (dequantized) base: one model directory")
    p.add_argument("source", help="a run directory (its newest intact checkpoint) or a checkpoint directory")
    p.add_argument("out", help="model directory to write")
    p.add_argument("--base", help="base checkpoint directory (default: the one the run trained on)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument(
        "--max-shard-gib", type=float, default=2.0, help="largest safetensors shard (bounds host RAM)"
    )
    _submit_parsers(sub)
    commands = {"plan": _plan_parser(sub), "doctor": _doctor_parser(sub), "bench": _bench_parser(sub)}
    commands["submit"] = sub.choices["submit"]
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in commands:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command in commands:
        # key=value overrides may follow the options too (argparse leaves those in `rest`); anything else there is
        # a mistyped option of this command, which its own usage explains (not the training flags')
        _check_options(commands[args.command], rest, {"--sweep"} if args.command == "submit" else set())
        rest = getattr(args, "overrides", []) + rest
    try:
        if args.command in ("submit", "status", "logs", "cancel"):
            return _slurm_command(args, rest)
        if args.command == "plan":
            return _plan(args, rest)
        if args.command == "doctor":
            return _doctor(args, rest)
        if args.command == "bench":
            return _bench(args, rest)
        if args.command == "validate":
            from shardtune.recipe import resolve_config

            resolve_config(load_recipe_config(args.recipe), args.overrides, env={})
            print(f"{args.recipe}: configuration is valid")
        elif args.command == "export":
            from shardtune.export import export_adapter

            out = export_adapter(Path(args.source), Path(args.out))
            print(f"adapter written to {out}")
        else:
            from shardtune.merge import merge_adapter

            out = merge_adapter(Path(args.source), Path(args.out), args.base, args.dtype, args.max_shard_gib)
            print(f"merged model written to {out}")
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _check_options(parser: argparse.ArgumentParser, rest: list[str], allowed: set[str]) -> None:
    """Refuse an option `parser` does not know, with its usage and the closest option it has."""
    import difflib

    known = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    for arg in rest:
        if arg.startswith("-") and arg.split("=")[0] not in allowed:
            close = difflib.get_close_matches(arg.split("=")[0], known, n=1)
            parser.error(f"unrecognized argument {arg}" + (f" (did you mean {close[0]}?)" if close else ""))


def _positive(text: str) -> int:
    """A count of GPUs, nodes or processes: at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a count; give 1 or more")
    return value


def _overrides_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="overrides, as on a training command line"
    )


def _plan_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "plan",
        help="predict GPU memory, host memory, checkpoint size and speed of a run, before running it",
        description="Overrides (key=value) follow the recipe as on a training command line.",
    )
    p.add_argument("recipe")
    _overrides_argument(p)
    p.add_argument("--gpus", type=_positive, default=1, help="GPUs in total")
    p.add_argument("--gpu-mem", help="memory per GPU, e.g. 24GiB (A10G), 80GiB (H100)")
    p.add_argument("--nodes", type=_positive, default=1)
    p.add_argument("--host-ram", help="host memory per node, e.g. 128GiB")
    p.add_argument(
        "--gpu", default="h200", help="GPU model for the speed estimate: h200 h100 a100 a10g l40s l4"
    )
    p.add_argument(
        "--fit",
        action="store_true",
        help="search micro-batch, checkpointing and offload for the fastest that fits",
    )
    return p


def _overrides(command: str, rest: list[str]) -> list[str]:
    """The key=value overrides of a command line that takes no training flags."""
    from shardtune.recipe import _parse_args

    flags, overrides, _ = _parse_args(rest)
    if flags:
        raise ConfigError(f"shardtune {command} takes no {' '.join(sorted(flags))}")
    return overrides


def _recipe_config(command: str, recipe: str, rest: list[str]):
    """The recipe's config with the command line's key=value overrides (no training flags), and its
    architecture (with a note when a built-in shape stands in for a hub id)."""
    from shardtune import plan
    from shardtune.recipe import load_recipe, resolve_config

    # plan runs anywhere (a laptop planning a cluster's run): local paths are checked where the run starts
    overrides = _overrides(command, rest)
    cfg = resolve_config(load_recipe(recipe).config(), overrides, env={}, check_paths=command != "plan")
    return (cfg, *plan.architecture(cfg))


def _plan(args, rest: list[str]) -> int:
    from shardtune import plan

    if args.gpu.lower() not in plan.GPU_PEAKS:
        raise ConfigError(f"--gpu {args.gpu}: no peak rate known; use one of {', '.join(plan.GPU_PEAKS)}")
    cfg, conf, note = _recipe_config("plan", args.recipe, rest)
    problem = plan.batch_problem(cfg, args.gpus, micro_batch=not args.fit)
    if problem:  # a plan of a run that would not start
        raise ConfigError(problem)
    gpu_mem = plan.parse_size(args.gpu_mem) if args.gpu_mem else None
    host_ram = plan.parse_size(args.host_ram) if args.host_ram else None
    if note:
        print(note)
    print(
        f"{args.recipe} on {args.gpus} GPU(s), {args.nodes} node(s): seq {cfg.data.max_len}, "
        f"global batch {cfg.train.global_batch_size}, LoRA r={cfg.lora.r}"
    )
    memory = gpu_mem or plan.GPU_MEMORY[args.gpu.lower()]
    resolved, _ = plan.resolve_auto(cfg, conf, args.gpus, memory, args.nodes)
    if resolved is not cfg:
        print(f"auto: {plan.describe_auto(cfg, resolved)}")
        cfg = resolved
    est = plan.estimate(cfg, conf, args.gpus, args.nodes, args.gpu)
    print(plan.format_plan(est, args.gpus, gpu_mem, host_ram))
    if not args.fit:
        return 0 if gpu_mem is None or est.gpu_peak <= 0.95 * gpu_mem else 1
    if gpu_mem is None:
        raise ConfigError("--fit needs --gpu-mem (the memory of one GPU)")
    fits = plan.fit(cfg, conf, args.gpus, gpu_mem, args.nodes, args.gpu)
    if not fits:
        print(
            f"\n--fit: no configuration fits {gpu_mem / 2**30:.0f} GiB per GPU on {args.gpus} GPU(s), even "
            "with micro-batch 1, checkpointing and offload: use more GPUs or a shorter data.max_len"
        )
        return 1
    best = fits[0]
    print(
        f"\n--fit: fastest that fits ({best.gpu_peak / 2**30:.1f} GiB peak), paste:\n  {plan.override_line(best)}"
    )
    return 0


def _bench_parser(sub) -> None:
    from shardtune.bench import SHAPES

    p = sub.add_parser(
        "bench",
        help="train a random-weight model of a named shape for a few steps; print one JSON line",
        description="Overrides (key=value) change the benchmark recipe (shardtune/bench.py) as on a training "
        "command line, e.g. parallel.activation_checkpointing=false data.packing=true.",
    )
    p.add_argument("shape", choices=sorted(SHAPES))
    _overrides_argument(p)
    p.add_argument("--gpus", type=_positive, default=1, help="processes (GPUs) on this machine")
    p.add_argument(
        "--seq", type=int, default=3072, help="tokens per row (the longest row with --lengths instruct)"
    )
    p.add_argument("--micro-batch", type=int, default=1, help="rows per forward pass per GPU")
    p.add_argument("--warmup", type=int, default=3, help="steps run before measuring")
    p.add_argument("--steps", type=int, default=5, help="steps measured")
    p.add_argument("--lengths", choices=["fixed", "instruct"], default="fixed")
    p.add_argument("--out", help="also append the JSON line to this file")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before the run is stopped")
    p.add_argument("--workdir", help="where rows, logs and the run go (default: a new temporary directory)")
    return p


def _bench(args, rest: list[str]) -> int:
    import json

    from shardtune import bench
    from shardtune.recipe import resolve_config

    overrides = _overrides("bench", rest)
    resolve_config(bench.config(), overrides, env={})  # a typo fails here, before anything starts
    record = bench.run(
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


def _doctor_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "doctor",
        help="check this machine and a recipe before running it: versions, CUDA, 4-bit, dtypes, disk",
        description="Overrides (key=value) follow the recipe as on a training command line.",
    )
    p.add_argument("recipe")
    _overrides_argument(p)
    p.add_argument(
        "--gpus", type=_positive, help="GPUs the run will use (default: this machine's, at least 1)"
    )
    p.add_argument("--signal-lead", type=float, help="seconds of SLURM's --signal lead, to check it suffices")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="also run the recipe for real: load, 2 steps, save, resume, 1 step (minutes)",
    )
    return p


def _doctor(args, rest: list[str]) -> int:
    import torch

    from shardtune import doctor

    cfg, conf, note = _recipe_config("doctor", args.recipe, rest)
    gpus = args.gpus or max(1, torch.cuda.device_count())
    text, ok = doctor.report(doctor.run_checks(cfg, conf, gpus, args.signal_lead))
    print((note + "\n" if note else "") + text, flush=True)
    if args.smoke:
        from shardtune import smoke

        procs = args.gpus or torch.cuda.device_count() or 2  # no GPU: 2 CPU processes, as the demo
        text, smoke_ok = smoke.report(smoke.run_smoke(args.recipe, rest, procs))
        print(text)
        ok = ok and smoke_ok
    return 0 if ok else 1


def _submit_parsers(sub) -> None:
    p = sub.add_parser(
        "submit",
        help="submit a recipe to SLURM through submitit (requeued on time limit, preemption and a crash)",
        description="Overrides (key=value) and --sweep key=v1,v2 (a job array, one run per value; a bare "
        "--sweep runs the recipe's own grid) follow the recipe as on a training command line.",
    )
    p.add_argument("recipe", nargs="?")
    p.add_argument(
        "--resume",
        metavar="JOB",
        help="submit again the runs of job JOB that did not complete (a crash, a cancel), each from its newest "
        "checkpoint, with that job's recipe, overrides and resources (give no recipe; a resource given here "
        "replaces that job's)",
    )
    # Resources (submit.Resources' fields): left out of the namespace when not given, so that --resume can
    # tell which of the earlier job's resources to replace; the defaults are Resources'
    res = p.add_argument_group(
        "resources (defaults: 1 node, 1 GPU, 4:00:00)", argument_default=argparse.SUPPRESS
    )
    res.add_argument("--nodes", type=int)
    res.add_argument("--gpus-per-node", type=int, help="one task (process) per GPU; 0 for CPU jobs")
    res.add_argument("--tasks-per-node", type=int, help="processes per node (default: --gpus-per-node)")
    res.add_argument("--cpus-per-task", type=int)
    res.add_argument("--mem", help="memory per node, e.g. 200G")
    res.add_argument("--time", help="time limit: minutes or [D-]HH:MM:SS (default 4:00:00)")
    res.add_argument("--partition")
    res.add_argument("--account")
    res.add_argument("--qos")
    res.add_argument("--constraint")
    res.add_argument(
        "--signal-lead",
        dest="signal_lead_s",
        metavar="SECONDS",
        type=int,
        help="seconds before the time limit to stop and save: more than one step plus one save (Slurm checks "
        "limits every 30 s, so the signal may come up to 30 s earlier; default 300)",
    )
    res.add_argument("--max-parallel", type=int, help="array tasks that may run at once (sweeps)")
    res.add_argument(
        "--max-restarts",
        type=int,
        help="times a crashed job (a task killed, a segfault) is requeued to continue from its newest "
        "checkpoint; errors in the input are not retried (default 1; 0: never)",
    )
    res.add_argument(
        "--sbatch", dest="extra", action="append", metavar="KEY[=VALUE]", help="any other sbatch option"
    )
    p.add_argument("--job-name")
    p.add_argument("--runs-dir", default="runs", help="run directories and job records go here")
    for name, text in (
        ("status", "state, step and errors of submitted jobs (the newest, or one job or sweep)"),
        ("logs", "the end of a submitted job's logs"),
        ("cancel", "cancel a submitted job (every task of a sweep)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("job", nargs=None if name != "status" else "?", help="job id (a sweep's array id)")
        p.add_argument("--runs-dir", default="runs")
        if name == "logs":
            p.add_argument("--task", type=int, help="array task (sweep point); default all")
            p.add_argument("--rank", type=int, default=0, help="which process of the job")
            p.add_argument("--lines", type=int, default=40, help="last N lines of each log (0: all)")


def _slurm_command(args, rest: list[str]) -> int:
    from shardtune import submit as slurm
    from shardtune.recipe import _parse_args

    runs = Path(args.runs_dir)
    if args.command == "submit":
        flags, overrides, grid = _parse_args(rest)
        if flags - {"--sweep"}:
            raise ConfigError(f"shardtune submit takes no {' '.join(sorted(flags - {'--sweep'}))}")
        if args.resume and (args.recipe or rest):
            given = " ".join([args.recipe or "", *rest]).strip()
            raise ConfigError(
                f"shardtune submit --resume {args.resume} takes the recipe, overrides and sweep from that job's "
                f"record; give only resources (--nodes, --time, ...), not: {given}"
            )
        if not args.resume and not args.recipe:
            raise ConfigError("shardtune submit needs a recipe (or --resume JOB)")
        recipe_grid = "--sweep" in flags and not grid and not args.resume
        if recipe_grid:
            from shardtune.recipe import load_recipe

            grid = getattr(load_recipe(args.recipe), "SWEEP", None)
            if not grid:
                raise ConfigError(f"--sweep: {args.recipe} has no SWEEP grid; give one: --sweep key=v1,v2")
        from shardtune.recipe import check_sweep

        check_sweep(overrides, grid, recipe_grid)
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(slurm.Resources) if f.name in args}
        if "extra" in given:
            given["extra"] = {
                k: (v if sep else True) for k, sep, v in (o.partition("=") for o in given["extra"])
            }
        if args.resume:
            record = slurm.resubmit(args.resume, given, runs, args.job_name)
        else:
            record = slurm.submit(
                args.recipe, overrides, grid or None, slurm.Resources(**given), runs, args.job_name
            )
        res = slurm.Resources(**record.resources)
        print(
            f"submitted job {record.job_id}: {record.recipe}, {len(record.tasks)} run(s), "
            f"{res.nodes} node(s) x {res.tasks} task(s), time {res.time}"
        )
        for task in record.tasks:
            print(f"  {task['job_id']}: {task['run_dir']}")
        print(
            f"follow it: shardtune status {record.job_id}  |  shardtune logs {record.job_id}"
            f"  |  shardtune cancel {record.job_id}"
        )
    elif args.command == "status":
        records = [slurm.Submission.load(runs, args.job)] if args.job else slurm.recent(runs)
        if not records:
            print(f"no jobs submitted from {runs}")
        for record in records:
            print(slurm.format_status(record, slurm.status_rows(record)))
    elif args.command == "logs":
        record = slurm.Submission.load(runs, args.job)
        print(slurm.logs(record, args.task, args.rank, args.lines or None))
    else:
        slurm.cancel(slurm.Submission.load(runs, args.job))
        print(f"cancelled job {args.job}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
