"""The layers run one way: server -> engine -> models, with no import cycle among gorgon's modules."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["models", "engine", "server"]  # each may import only those before it


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every gorgon module that `path` imports, wherever the import stands (a lazy import is still an edge)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in LAYERS)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for layer in LAYERS for p in (ROOT / layer).rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in files and m != name} for name, path in files.items()}


def test_no_module_imports_a_layer_above_its_own():
    upward = [(name, target) for name, targets in import_graph().items() for target in targets
              if LAYERS.index(target.split(".")[0]) > LAYERS.index(name.split(".")[0])]
    assert upward == []


def test_no_import_cycle():
    graph, state, cycles = import_graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


@pytest.mark.parametrize("layer, forbidden", [("models", ("engine", "server")), ("engine", ("server",))])
def test_importing_a_layer_loads_nothing_above_it(layer, forbidden):
    """In a fresh interpreter, as a user would import it."""
    modules = [module_name(p) for p in (ROOT / layer).rglob("*.py")]
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
