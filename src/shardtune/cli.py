"""The `shardtune` command: tools around runs (training itself is `accelerate launch recipes/X.py`).

shardtune validate RECIPE.py [key=value ...]     check a recipe and overrides, load nothing
shardtune export RUN_OR_CHECKPOINT OUT            write a PEFT adapter directory from a checkpoint
shardtune merge RUN_OR_CHECKPOINT OUT [--base DIR] [--dtype bfloat16]
                                                   base + adapter as one Hugging Face model directory
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from shardtune.config import ConfigError


def load_recipe_config(path: str):
    """Import a recipe file and call its `config()`."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if spec is None or not Path(path).is_file():
        raise ConfigError(f"no recipe file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "config"):
        raise ConfigError(f"{path} defines no config() function")
    return module.config()


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
    args = parser.parse_args(argv)
    try:
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


if __name__ == "__main__":
    sys.exit(main())
