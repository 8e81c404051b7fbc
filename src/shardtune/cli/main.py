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
torchrun --nproc_per_node N -m shardtune.cli doctor RECIPE.py [key=value ...] --numerics
                                                   sharded against unsharded: logits, loss, gradients
                                                   submitted jobs: state, errors, logs; cancel one
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from shardtune.cli.args import check_options, load_recipe_config, overrides_argument, positive
from shardtune.errors import ConfigError


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
    # the commands whose options may be followed by key=value overrides; each one's code is imported only when
    # it runs (`shardtune status` should not wait for torch)
    commands = {"plan": _plan_parser(sub), "doctor": _doctor_parser(sub), "bench": _bench_parser(sub)}
    commands["submit"] = _submit_parsers(sub)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in commands:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command in commands:
        # key=value overrides may follow the options too (argparse leaves those in `rest`); anything else there is
        # a mistyped option of this command, which its own usage explains (not the training flags')
        check_options(commands[args.command], rest, {"--sweep"} if args.command == "submit" else set())
        rest = getattr(args, "overrides", []) + rest
    try:
        if args.command in ("submit", "status", "logs", "cancel"):
            from shardtune.cli import jobs

            return jobs.command(args, rest)
        if args.command in ("plan", "doctor", "bench"):
            module = importlib.import_module(f"shardtune.cli.{args.command}")
            return module.command(args, rest)
        if args.command == "validate":
            from shardtune.cli.args import resolve_config

            resolve_config(load_recipe_config(args.recipe), args.overrides, env={})
            print(f"{args.recipe}: configuration is valid")
        elif args.command == "export":
            from shardtune.checkpoint.export import export_adapter

            out = export_adapter(Path(args.source), Path(args.out))
            print(f"adapter written to {out}")
        else:
            from shardtune.checkpoint.merge import merge_adapter

            out = merge_adapter(Path(args.source), Path(args.out), args.base, args.dtype, args.max_shard_gib)
            print(f"merged model written to {out}")
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _plan_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "plan",
        help="predict GPU memory, host memory, checkpoint size and speed of a run, before running it",
        description="Overrides (key=value) follow the recipe as on a training command line.",
    )
    p.add_argument("recipe")
    overrides_argument(p)
    p.add_argument("--gpus", type=positive, default=1, help="GPUs in total")
    p.add_argument("--gpu-mem", help="memory per GPU, e.g. 24GiB (A10G), 80GiB (H100)")
    p.add_argument("--nodes", type=positive, default=1)
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


def _bench_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help="train a random-weight model of a named shape for a few steps; print one JSON line",
        description="Overrides (key=value) change the benchmark recipe (shardtune/bench.py) as on a training "
        "command line, e.g. parallel.activation_checkpointing=false data.packing=true.",
    )
    from shardtune.cli.bench import SHAPES

    p.add_argument("shape", choices=sorted(SHAPES))
    overrides_argument(p)
    p.add_argument("--gpus", type=positive, default=1, help="processes (GPUs) on this machine")
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


def _doctor_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "doctor",
        help="check this machine and a recipe before running it: versions, CUDA, 4-bit, dtypes, disk",
        description="Overrides (key=value) follow the recipe as on a training command line.",
    )
    p.add_argument("recipe")
    overrides_argument(p)
    p.add_argument(
        "--gpus", type=positive, help="GPUs the run will use (default: this machine's, at least 1)"
    )
    p.add_argument("--signal-lead", type=float, help="seconds of SLURM's --signal lead, to check it suffices")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="also run the recipe for real: load, 2 steps, save, resume, 1 step (minutes)",
    )
    p.add_argument(
        "--numerics",
        action="store_true",
        help="only this: launched as the run is (torchrun/accelerate launch ... -m shardtune.cli doctor RECIPE "
        "--numerics), compare the sharded model's logits, loss and adapter gradients with an unsharded copy's",
    )
    p.add_argument(
        "--force-sharding",
        action="store_true",
        help="with --numerics on one process: wrap it in the backend's sharding anyway (FSDP units, DeepSpeed "
        "partitions of one), which a one-process run skips: checks the 4-bit weights through it on one GPU",
    )
    return p


def _submit_parsers(sub) -> argparse.ArgumentParser:
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
    return sub.choices["submit"]
