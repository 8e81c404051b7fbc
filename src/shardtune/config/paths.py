"""Where a run goes: its directory, derived in one place from train.output_dir and train.run_name (one path
component, so that a run never writes outside train.output_dir), and whether that place can be written."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

from shardtune.errors import ConfigError

if TYPE_CHECKING:
    from shardtune.config.schema import TrainConfig


def run_name_problem(name: str) -> str | None:
    """Why `name` cannot name a run directory (one directory name under train.output_dir), or None."""
    if not name.strip():
        return "is empty"
    if name in (".", ".."):
        return f"names {'the output directory itself' if name == '.' else 'its parent'}, not a run directory in it"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or name.startswith("~"):
        return "is a path of its own, not a name under train.output_dir"
    if "/" in name or "\\" in name:
        return (
            "has a path separator: a run directory's path would leave train.output_dir or nest in another run"
        )
    if "\0" in name:
        return "holds a NUL character"
    return None


def check_run_name(name: str | None, output_dir: str, what: str = "train.run_name") -> None:
    """Refuse a run name that is not one path component (ConfigError naming `what`, with the fix)."""
    problem = None if name is None else run_name_problem(name)
    if problem:
        raise ConfigError(
            f"{what}={name!r} {problem}. A run name is one directory name, made under train.output_dir "
            f"({output_dir}): give a plain name, e.g. train.run_name=my-run, and put the runs elsewhere with "
            f"train.output_dir=DIR."
        )


def run_directory(train: TrainConfig, default_name: str, sub: str | None = None) -> Path:
    """The run directory: train.output_dir / (train.run_name, else `default_name`, the recipe's name) [/ sub].
    `sub` is a path inside the run that shardtune itself chooses (a sweep's runs: sweep/<point>)."""
    name = train.run_name if train.run_name is not None else default_name
    check_run_name(name, train.output_dir, "train.run_name" if train.run_name is not None else "the run name")
    run_dir = Path(train.output_dir) / name
    return run_dir / sub if sub else run_dir


def unwritable(path: Path) -> str | None:
    """Why nothing can be made at `path` (the nearest directory that exists is read-only or not ours to write),
    or None. Asked without writing anything: permissions, then the filesystem's read-only flag (which applies to
    root too)."""
    here = Path(os.path.abspath(path.expanduser()))
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        return f"{here} is a file, not a directory"
    if os.statvfs(here).f_flag & os.ST_RDONLY:
        return f"{here} is on a read-only filesystem"
    if not os.access(here, os.W_OK | os.X_OK):
        return f"{here} is not writable by this user (permission denied)"
    return None


def check_output_dir(train: TrainConfig) -> None:
    """train.output_dir must be a place this process can make the run directory in (ConfigError with the fix),
    checked before anything is loaded and by every process alike."""
    problem = unwritable(Path(train.output_dir) / (train.run_name or ""))
    if problem:
        raise ConfigError(
            f"train.output_dir={train.output_dir}: the run cannot be written there ({problem}). Give a "
            f"directory you can write, e.g. train.output_dir=$HOME/runs, or make this one writable."
        )
