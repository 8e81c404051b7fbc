"""What the command lines share: a recipe file, its configuration with the launcher's settings and the key=value
overrides applied, the training flags and sweep grids, and the `shardtune` subcommands' argument types."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from shardtune.config import Config, check_inputs, check_names, parse_overrides
from shardtune.config.accelerate import accelerate_env_overrides, accelerate_yaml_overrides
from shardtune.config.checks import optimizer_device_problem
from shardtune.config.overrides import apply_layers
from shardtune.errors import ConfigError
from shardtune.parallel.backend import DEEPSPEED_MISSING, deepspeed_installed


def check_options(parser: argparse.ArgumentParser, rest: list[str], allowed: set[str]) -> None:
    """Refuse an option `parser` does not know, with its usage and the closest option it has."""
    import difflib

    known = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    for arg in rest:
        if arg.startswith("-") and arg.split("=")[0] not in allowed:
            close = difflib.get_close_matches(arg.split("=")[0], known, n=1)
            parser.error(f"unrecognized argument {arg}" + (f" (did you mean {close[0]}?)" if close else ""))


def positive(text: str) -> int:
    """A count of GPUs, nodes or processes: at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a count; give 1 or more")
    return value


def overrides_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="overrides, as on a training command line"
    )


def command_overrides(command: str, rest: list[str]) -> list[str]:
    """The key=value overrides of a command line that takes no training flags."""
    flags, overrides, _ = parse_args(rest)
    if flags:
        raise ConfigError(f"shardtune {command} takes no {' '.join(sorted(flags))}")
    return overrides


def recipe_config(command: str, recipe: str, rest: list[str]):
    """The recipe's config with the command line's key=value overrides (no training flags), and its
    architecture (with a note when a built-in shape stands in for a hub id)."""
    from shardtune.planning.estimate import architecture

    # plan runs anywhere (a laptop planning a cluster's run): local paths are checked where the run starts
    overrides = command_overrides(command, rest)
    cfg = resolve_config(load_recipe(recipe).config(), overrides, env={}, check_paths=command != "plan")
    return (cfg, *architecture(cfg))


def load_recipe_config(path: str):
    """Import a recipe file and call its `config()`."""
    return load_recipe(path).config()


def resolve_config(
    base: Config, overrides: list[str], env: dict[str, str] | None = None, check_paths: bool = True
) -> Config:
    """The recipe's config with the launcher's settings and the command-line overrides applied."""
    cli = parse_overrides(overrides)
    layers = []
    launch_config = cli.get("parallel.launch_config", base.parallel.launch_config)
    if launch_config:
        layers.append(accelerate_yaml_overrides(launch_config))
    values, origin = accelerate_env_overrides(env)
    if values:
        layers.append((values, origin))
    # validated once, all layers applied: the command line may settle what the launcher's settings conflict with
    cfg = apply_layers(base, [*layers, (cli, "the command line")])
    # local paths: not where they may exist only on the machines that train (plan, submit)
    (check_inputs if check_paths else check_names)(cfg)
    return cfg


def check_sweep(overrides: list[str], grid: dict[str, list] | None, recipe_grid: bool) -> None:
    """Refuse a command line whose values a sweep would silently replace: an override of a key the grid sweeps
    (every run would take the grid's values instead)."""
    if not grid:
        return
    whose = "the recipe's --sweep grid" if recipe_grid else "--sweep"
    for key, value in parse_overrides(overrides).items():
        if key in grid:
            values = ", ".join(str(v) for v in grid[key])
            raise ConfigError(
                f"{key}={value} on the command line is also swept by {whose} ({key}: {values}); every run would "
                f"take the sweep's values instead. Drop {key}={value}, or sweep the values you want: "
                f"--sweep {key}=v1,v2"
            )


def check_backend(configs: list[Config]) -> None:
    """Refuse, before the data and the model are prepared, a backend or optimizer this machine cannot run."""
    if any(c.parallel.backend == "deepspeed" for c in configs) and not deepspeed_installed():
        raise ConfigError(DEEPSPEED_MISSING)
    if any(c.optim.name.startswith("paged_") for c in configs):
        import torch

        for c in configs:
            problem = optimizer_device_problem(c, torch.cuda.is_available())
            if problem:
                raise ConfigError(problem)


def split_sweep_values(text: str) -> list[str]:
    """'8,16' -> ['8', '16']; commas inside [...] stay: '[q_proj,v_proj],all-linear' -> 2 values."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += 1 if ch in "[{(" else -1 if ch in "]})" else 0
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [*out, cur]


def parse_args(argv: list[str]) -> tuple[set[str], list[str], dict[str, list[str]]]:
    """(flags, key=value overrides, sweep grid).

    Each `--sweep` takes the next argument when it is `key=v1,v2,...` (two or more values); a bare
    `--sweep` (the last argument, or followed by a flag) runs the recipe's own grid. Everything else that is not a
    flag is an override.
    """
    flags, overrides, sweep = set(), [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help", "--print-config", "--validate", "--sweep", "--doctor"):
            flags.add(arg)
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            key, sep, values = nxt.partition("=")
            # one value after --sweep is no sweep: a bare --sweep (the recipe's grid) and an override, which
            # main() refuses where the grid would replace it, or where the recipe has no grid
            if arg == "--sweep" and sep and len(split_sweep_values(values)) > 1:
                if key in sweep:
                    raise ConfigError(
                        f"--sweep {key} is given twice ({','.join(sweep[key])} and {values}); give all its values "
                        f"in one --sweep {key}=v1,v2,..."
                    )
                sweep[key] = split_sweep_values(values)
                i += 1
        elif arg.startswith("--"):
            raise ConfigError(
                f"unknown flag {arg!r}; flags: --help --print-config --validate --sweep --doctor"
            )
        else:
            overrides.append(arg)
        i += 1
    return flags, overrides, sweep


def load_recipe(path: str | Path):
    """Import a recipe file as a module (its `config()` and, if it has one, its `SWEEP` grid)."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or not path.is_file():
        raise ConfigError(f"no recipe file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "config"):
        raise ConfigError(f"{path} defines no config() function")
    return module
