"""`shardtune submit | status | logs | cancel`: the command lines of training on SLURM through submitit
(submit.py submits; inside_job.py runs in the job and requeues it; submission.py is the record; status.py
reads what the jobs did)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from shardtune.errors import ConfigError


def command(args, rest: list[str]) -> int:
    from shardtune.cli import status as jobs_status
    from shardtune.cli import submit as slurm
    from shardtune.cli.args import parse_args
    from shardtune.cli.submission import Submission

    runs = Path(args.runs_dir)
    if args.command == "submit":
        flags, overrides, grid = parse_args(rest)
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
            from shardtune.cli.args import load_recipe

            grid = getattr(load_recipe(args.recipe), "SWEEP", None)
            if not grid:
                raise ConfigError(f"--sweep: {args.recipe} has no SWEEP grid; give one: --sweep key=v1,v2")
        from shardtune.cli.args import check_sweep

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
        records = [Submission.load(runs, args.job)] if args.job else jobs_status.recent(runs)
        if not records:
            print(f"no jobs submitted from {runs}")
        for record in records:
            print(jobs_status.format_status(record, jobs_status.status_rows(record)))
    elif args.command == "logs":
        record = Submission.load(runs, args.job)
        print(jobs_status.logs(record, args.task, args.rank, args.lines or None))
    else:
        jobs_status.cancel(Submission.load(runs, args.job))
        print(f"cancelled job {args.job}")
    return 0
