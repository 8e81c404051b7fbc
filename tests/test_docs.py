"""The commands the README and docs/ show: every one that names a recipe resolves to a valid configuration (the
recipe, the accelerate config it is launched with, its overrides and sweep grids), and the `shardtune plan`,
`shardtune validate` and `--validate` lines run as written (in-process, no training: the training runs they
describe are tested end to end elsewhere). Paths a user would have to create (their own data files) are not
checked, only the keys and values."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import ROOT
from shardtune.cli.args import check_sweep, load_recipe, parse_args, resolve_config
from shardtune.cli.main import main as shardtune
from shardtune.cli.sweep import expand

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LAUNCHERS = ("accelerate", "torchrun", "python", "sbatch", "launch/node.sh", "shardtune")


def commands(page: Path) -> list[str]:
    """The shell lines of a page's ```bash blocks, comments and continuation dots left out."""
    out, inside = [], False
    for line in page.read_text().replace("\\\n", " ").splitlines():  # a command continued with a backslash
        if line.startswith("```"):
            inside = line.strip() == "```bash"
            continue
        line = re.sub(r"\s+#.*$", "", line).strip()
        words = line.split()
        while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value before the command
            words = words[1:]
        if inside and words and words[0] in LAUNCHERS and "..." not in line and "<" not in line:
            out.append(" ".join(words))
    return out


CASES = [(page.relative_to(ROOT), cmd) for page in PAGES for cmd in commands(page)]


def test_the_pages_show_commands():
    assert len(CASES) >= 20, CASES


def _placeholder_file(word: str, tmp_path: Path) -> str:
    """`data.source=my_rows.jsonl`: the user's own file, which this machine lacks; an empty one stands in (its
    rows are the run's to check, not the command's)."""
    key, sep, value = word.partition("=")
    if sep and key in ("data.source", "data.eval_source") and Path(value).suffix and not Path(value).exists():
        (tmp_path / Path(value).name).touch()
        return f"{key}={tmp_path / Path(value).name}"
    return word


def _training_argument(words: list[str], i: int) -> bool:
    """Whether words[i] of a `shardtune submit` line is the training command's (an override, --sweep and its
    grid), not a job option or its value."""
    w, before = words[i], words[i - 1] if i else ""
    return w == "--sweep" or before == "--sweep" or not (w.startswith("--") or before.startswith("--"))


def _recipe_and_rest(words: list[str]) -> tuple[str | None, list[str], str | None]:
    """(recipe, what follows it, the accelerate config it is launched with)."""
    config = None
    for i, w in enumerate(words):
        if w in ("--config_file", "--config-file"):
            config = words[i + 1]
        if w.endswith(".py") and w.startswith("recipes/"):
            return w, words[i + 1 :], config
    return None, [], config


@pytest.mark.parametrize(("page", "command"), CASES, ids=[f"{p}: {c[:60]}" for p, c in CASES])
def test_a_documented_command_is_valid(page, command, capsys, tmp_path):
    words = [_placeholder_file(w, tmp_path) for w in shlex.split(command)]
    if words[0] == "shardtune" and words[1] in ("plan", "validate"):
        assert shardtune(words[1:]) in (0, 1), capsys.readouterr().err  # 1: "does not fit", a plan's answer
        return
    recipe, rest, config = _recipe_and_rest(words)
    if recipe is None:
        pytest.skip("names no recipe (status, export, make ...): run by the tests of that command")
    if "doctor" in words[: words.index(recipe)]:  # `shardtune doctor`, `torchrun ... -m shardtune.cli doctor`
        pytest.skip("shardtune doctor: tested on local data, and --numerics launched, in test_doctor.py")
    if (
        words[0] == "shardtune" and words[1] == "submit"
    ):  # its options (--nodes 2 ...) are the job's resources
        rest = [w for i, w in enumerate(rest) if _training_argument(rest, i)]
    flags, overrides, grid = parse_args(rest)
    assert not flags - {"--help", "--validate", "--print-config", "--sweep", "--doctor"}
    module = load_recipe(ROOT / recipe)
    if config:
        overrides = [f"parallel.launch_config={config}", *overrides]
    cfg = resolve_config(module.config(), overrides, env={}, check_paths=False)
    if "--sweep" in flags:
        grid = grid or getattr(module, "SWEEP", None)
        assert grid, f"{recipe} has no sweep grid of its own"
        check_sweep(overrides, grid, recipe_grid=not parse_args(rest)[2])
        assert expand(cfg, grid)
