"""The package's layout: imports run one way through the layers, with no cycle (imports inside functions
counted), every import of shardtune's own names resolves, and no module or function outgrows a screen's worth."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

SRC = ROOT / "src" / "shardtune"
# The layers, lowest first: a module may import from its own layer and the ones below, never above.
LAYERS = [
    {"errors", "files", "faults"},
    {"config"},
    {"observability", "kernels", "model", "parallel", "data"},
    {"planning", "checkpoint"},
    {"train"},
    {"cli"},
]
LAYER_OF = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import of a shardtune module in `path`, functions included; imports only
    for type checkers (`if TYPE_CHECKING:`) left out: they do not run."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and _is_type_checking(node)
        for n in ast.walk(node)
    }
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "shardtune":
            out.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "shardtune"]
    return out


def _targets(module: str, names: list[str]) -> list[str]:
    """The shardtune modules an import loads: `from shardtune.x import y` is module shardtune.x.y where y is one."""
    found = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
    return found or [module]


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYER_OF.get(parts[1]) if len(parts) > 1 else None


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        graph[name] = {t for _, mod, names in _imports(path) for t in _targets(mod, names) if t != name}
    return graph


USERS = sorted(
    p
    for d in ("src", "tests", "bench", "recipes")
    for p in (ROOT / d).rglob("*.py")
    if "results" not in p.parts
)


def test_imports_resolve_to_existing_modules_and_names():
    """Every import of shardtune's own names (in the package, its tests, benchmarks and recipes) names a module
    that exists and a name it defines (or imports)."""
    problems = []
    for path in USERS:
        for line, mod, names in _imports(path):
            if mod not in MODULES:
                problems.append(f"{path.relative_to(ROOT)}:{line}: no module {mod}")
                continue
            tree = ast.parse(MODULES[mod].read_text())
            defined = {
                t.id if isinstance(t, ast.Name) else None
                for node in tree.body
                for t in (node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)])
                if isinstance(t, ast.Name)
            }
            defined |= {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            defined |= {
                (a.asname or a.name).split(".")[0]
                for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for a in node.names
            }
            missing = [n for n in names if n != "*" and n not in defined and f"{mod}.{n}" not in MODULES]
            if missing:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {mod} has no {', '.join(missing)}")
    assert not problems, "\n".join(problems)


def test_imports_run_down_the_layers():
    """config < model/kernels/parallel/data/observability < planning/checkpoint < train < cli; the package's
    own __init__ files are facades and may re-export from below."""
    wrong = []
    for name, path in MODULES.items():
        here = _layer(name)
        for line, mod, names in _imports(path):
            for target in _targets(mod, names):
                there = _layer(target)
                if here is not None and there is not None and there > here:
                    wrong.append(
                        f"{path.relative_to(ROOT)}:{line}: {name} (layer {here}) imports {target} (layer {there})"
                    )
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt.endswith(".__init__") or nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        # a package's __init__ is imported before any of its modules: a facade re-exporting them is no cycle
        if node not in state and MODULES[node].name != "__init__.py":
            visit(node, [node])
    cycles = [c for c in cycles if not any(MODULES[m].name == "__init__.py" for m in c.split(" -> "))]
    assert not cycles, "\n".join(cycles)


def test_the_top_of_the_package_is_subpackages():
    top = [p for p in SRC.iterdir() if p.suffix == ".py"]
    subpackages = [p for p in SRC.iterdir() if (p / "__init__.py").is_file()]
    assert len(subpackages) >= 4 and len(top) <= 8, (sorted(p.name for p in top), len(subpackages))


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_modules_and_functions_fit_a_screen(path: Path):
    """No module over 500 lines, no function over 80: one concern each, readable in one sitting."""
    text = path.read_text()
    assert len(text.splitlines()) <= 500
    long = [
        f"{n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for n in ast.walk(ast.parse(text))
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80
    ]
    assert not long
