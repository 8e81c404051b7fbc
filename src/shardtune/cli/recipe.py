"""The entry point every recipe file calls: `shardtune.recipe.main(config)`.

    accelerate launch --config_file fsdp_configs/cpu_2proc.yaml recipes/tiny.py [key=value ...] [flags]
    torchrun --nproc_per_node 2 recipes/tiny.py [key=value ...] [flags]

Flags: --help (every key, its value in this recipe, its documentation), --print-config, --validate (check
the configuration and stop), --doctor (check the machine and setup first, see doctor.py), --sweep [key=v1,v2
...] (run a grid of configurations one after another).

Exit codes: 0 done; 2 a configuration or data error (nothing trained); 75 stopped by SIGTERM/SIGUSR1 after
saving a checkpoint (run the same command again to continue; see stopping.py; the main process's code, the
others exit 0, and all exit 0 under `torchrun --max-restarts`).

Settings are layered, later wins: the recipe, then the accelerate config (`parallel.launch_config`, or the
environment `accelerate launch` sets), then the command line. Mistakes in any of them are reported before
anything is loaded, with exit code 2.
"""

from __future__ import annotations

import faulthandler
import gc
import logging
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

from shardtune import faults
from shardtune.cli.args import check_backend, check_sweep, parse_args, resolve_config
from shardtune.config import (
    Config,
    format_help,
    to_yaml,
)
from shardtune.errors import EXIT_USAGE, REPORTED, ConfigError, is_input_error
from shardtune.parallel.distributed import exit_process, launcher_restarts
from shardtune.train.stopping import StopRequest, stopped_exit_code

USAGE = """usage: accelerate launch --config_file fsdp_configs/<hardware>.yaml {recipe} [key=value ...] [flags]
       torchrun --nproc_per_node N {recipe} [key=value ...] [flags]

flags: --help  --print-config  --validate  --doctor  --sweep [key=v1,v2]  (--sweep once per swept key)
keys (value shown is this recipe's):
"""


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def setup_logging(rank: int) -> None:
    import datasets
    import transformers

    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = "[shardtune] %(message)s" if rank == 0 else f"[shardtune rank {rank}] %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    # torch's sharded-state-dict machinery warns about its own deprecated internals on every save
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft calling a renamed API
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    # huggingface_hub's HTTP client logs every request at INFO: hundreds of lines for one model download
    for client in ("httpx", "httpx2", "httpcore"):
        logging.getLogger(client).setLevel(logging.WARNING)
    # a checkpoint holds the adapters only (the frozen base is rebuilt from its source), so loading it into
    # the whole model warns once for every base parameter (1,440 lines for 70B)
    logging.getLogger("torch.distributed.fsdp._state_dict_utils").setLevel(logging.ERROR)


def main(
    build: Callable[[], Config] | Config, sweep: dict[str, list] | None = None, argv: list[str] | None = None
):
    """Parse the command line, validate, then train (or print help / the config, or validate only). A worker
    that a launcher started (torchrun, accelerate launch, launch/node.sh) ends its process here, whatever the
    outcome, with its exit code (distributed.exit_process: not through Python's finalization)."""
    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        return _main(build, sweep, argv)
    try:
        _main(build, sweep, argv)
        code: object = 0
    except SystemExit as e:
        code = e.code
    except BaseException:
        traceback.print_exc()
        code = 1
    exit_process(code)


def _main(build: Callable[[], Config] | Config, sweep: dict[str, list] | None, argv: list[str] | None):
    argv = sys.argv[1:] if argv is None else argv
    name = Path(sys.argv[0]).stem
    try:
        flags, overrides, cli_sweep = parse_args(argv)
        base = build() if callable(build) else build
        if flags & {"-h", "--help"}:
            print(USAGE.format(recipe=sys.argv[0]) + format_help(base))
            return
        cfg = resolve_config(base, overrides)
        grid = cli_sweep or (sweep if "--sweep" in flags else None)
        if "--sweep" in flags and not grid:
            raise ConfigError(
                f"--sweep: {sys.argv[0]} has no sweep grid of its own; give one: --sweep key=v1,v2"
            )
        check_sweep(overrides, grid, recipe_grid=not cli_sweep)
        points = [cfg]
        if grid:
            from shardtune.cli.sweep import expand

            points = [point for _, point in expand(cfg, grid)]  # validates every combination now
        if "--print-config" in flags:
            if _is_main_process():
                print(to_yaml(cfg), end="")
            return
        if "--validate" in flags:
            if _is_main_process():
                print(f"{name}: configuration is valid")
            return
        check_backend(points)
        if "--doctor" in flags and _is_main_process():
            _doctor(cfg)
    except ConfigError as e:
        if _is_main_process():
            print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    # A crash in native code (a segfault or abort in a kernel, a collective library or the allocator) prints
    # every thread's Python stack on stderr before the process dies, instead of only the launcher's exit code.
    faulthandler.enable(all_threads=True)
    # Record SIGTERM/SIGUSR1 from here on: a scheduler's signal during the imports and the model load must
    # not kill the process (the default action); the loop acts on it at its first step boundary. A USR1 after
    # the run (`srun --signal=USR1@N` can come up to a minute early) is moot: ignored, it cannot fail a run
    # that has finished.
    with StopRequest(ignore_after=(signal.SIGUSR1,)) as stop:
        try:
            results = run(cfg, name, grid, stop)
        except REPORTED as e:
            if _is_main_process():
                print(f"error: {e}", file=sys.stderr)
            # data out of reach is not the input's fault: exit 1, which launchers restart
            sys.exit(EXIT_USAGE if is_input_error(e) else 1)
    faults.inject("exit", int(os.environ.get("RANK", "0")), 0)
    if any(r.get("status") == "interrupted" for r in results):
        sys.exit(stopped_exit_code(_is_main_process()))  # checkpointed: the same command continues the run


def _doctor(cfg: Config) -> None:
    """`--doctor`: shardtune doctor's checks before training; stops (exit 2) on an error."""
    from shardtune.cli import doctor
    from shardtune.parallel.distributed import machine_count
    from shardtune.planning.estimate import architecture

    hf_config, _ = architecture(cfg)
    world = int(os.environ.get("WORLD_SIZE", 1))
    nodes = machine_count(world, [int(os.environ.get("LOCAL_WORLD_SIZE", world))])
    text, ok = doctor.report(doctor.run_checks(cfg, hf_config, world, with_data=False, nodes=nodes))
    print(text, file=sys.stderr, flush=True)
    if not ok:
        raise ConfigError("shardtune doctor found errors (above); fix them or run without --doctor")


def run(
    cfg: Config, name: str, grid: dict | None = None, stop: StopRequest | None = None, sub: str | None = None
) -> list[dict]:
    """Train one configuration (or each of a grid) inside one process group; the runs' summaries (`sub`: a path
    inside the run directory that is the run's own, as for a sweep's run). Raises ConfigError / DataError for
    input only the run itself can check (data files, resume compatibility)."""
    # torch, transformers, peft and bitsandbytes (~550k objects, all alive as long as the process) imported with
    # the garbage collector paused, then frozen out of its sight: its full passes over them while they were
    # being imported took 1.5-2 s of every process's start (2-core CPU, 11-13 s of imports). The imports' own
    # garbage (~5k small objects) is frozen with them; collecting it first would cost one such pass.
    enabled = gc.isenabled()
    gc.disable()
    try:
        from shardtune.cli.sweep import run_grid
        from shardtune.parallel.distributed import init_distributed, teardown
        from shardtune.train.run import train
    finally:
        if enabled:
            gc.enable()
    gc.freeze()
    try:
        faults.inject("start", int(os.environ.get("RANK", "0")), 0)
        dist = init_distributed(
            cfg.parallel.device, cfg.parallel.timeout_minutes, cfg.parallel.gpu_memory_limit_gib
        )
        setup_logging(dist.rank)
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restart and dist.is_main:
            logging.getLogger("shardtune").warning(
                "the launcher restarted the processes after a failure (restart %d of %d); the run continues from "
                "its newest checkpoint",
                restart,
                launcher_restarts(),
            )
        try:
            results = (
                run_grid(cfg, grid, dist, name, stop) if grid else [train(cfg, dist, name, stop, sub=sub)]
            )
        except BaseException:
            teardown(failed=True)
            raise
        teardown()
        return results
    finally:
        gc.unfreeze()  # train() does too; this is for a failure before it (a caller in this process goes on)
