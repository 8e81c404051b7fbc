"""A `shardtune bench` run with FSDP forced on for one process: what FSDP's wrapping costs against the plain
module, and whether its losses stay those of the plain module, on a machine with one GPU.

A run of one process trains the plain module (parallel/fsdp.py); here the FSDP backend is forced on, so that the one
process goes through FSDP1 as each rank of a 2-GPU run does: with parallel.sharding_strategy=NO_SHARD, all of
a 2-GPU NO_SHARD rank's work but the adapters' gradient all-reduce (the 80-layer 70B target row's setting).
Prints the plain run's JSON line, then the forced one's (`"fsdp_forced": true`).
    python bench/fsdp_one_gpu.py SHAPE [--seq N] [--micro-batch N] [--warmup N] [--steps N] [key=value ...]
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

RANK = "--fsdp-forced-rank"  # how the driver below starts each rank of the forced run (through torchrun)
UNITS = "fsdp_one_gpu: FSDP units, strategy:"


def rank() -> None:
    """A rank of the forced run: the benchmark recipe, with the FSDP backend wrapping in FSDP."""
    from shardtune.cli import bench
    from shardtune.cli.recipe import main
    from shardtune.parallel import fsdp

    built, root = fsdp.FsdpBackend.__init__, fsdp.FsdpBackend.shard_root

    def forced(self, *args, **kwargs):
        built(self, *args, **kwargs)
        self.enabled = True

    def wrapped(self, model):  # says in the log what the run trains (the driver checks it)
        model = root(self, model)
        units = fsdp.FSDP.fsdp_modules(model)
        print(f"{UNITS} {len(units)} {units[0].sharding_strategy.name}", flush=True)
        return model

    fsdp.FsdpBackend.__init__, fsdp.FsdpBackend.shard_root = forced, wrapped
    main(bench.config, argv=[a for a in sys.argv[1:] if a != RANK])


def driver() -> None:
    from shardtune.cli import bench

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", choices=sorted(bench.SHAPES))
    p.add_argument("--seq", type=int, default=3072)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lengths", default="fixed")
    p.add_argument("--workdir", type=Path, default=None)
    args, overrides = p.parse_known_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="shardtune-bench-"))
    run = dict(gpus=1, seq=args.seq, micro_batch=args.micro_batch, warmup=args.warmup, steps=args.steps)
    run.update(lengths=args.lengths)
    # each run in its own directory: both are named after this process, the second would resume the first
    print(json.dumps(bench.run(args.shape, overrides, workdir=work / "plain", **run)), flush=True)
    launch = bench.torchrun  # the ranks run this file (rank() above), not `-m shardtune.bench`
    bench.torchrun = lambda argv, *rest: launch([__file__, RANK, *argv[2:]], *rest)
    record = bench.run(args.shape, overrides, workdir=work / "forced", **run)
    logs = "".join(f.read_text() for f in (work / "forced").glob("*.log"))
    for units, strategy in (ln.split(UNITS)[1].split() for ln in logs.splitlines() if UNITS in ln):
        record.update(fsdp_units=int(units), fsdp_strategy=strategy)
    print(json.dumps({"fsdp_forced": True, **record}), flush=True)


if __name__ == "__main__":
    rank() if RANK in sys.argv else driver()
