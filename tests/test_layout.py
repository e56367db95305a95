"""The code's own structure: no import cycles between the modules of a package."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _imports(package):
    """Module name -> the modules of ``package`` it imports (at any depth of its code)."""
    folder = REPO / package
    graph = {}
    for path in folder.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                parts = node.module.split(".")
                if parts[0] == package:
                    names = [a.name for a in node.names] if len(parts) == 1 else [parts[1]]
                    deps |= {n for n in names if (folder / f"{n}.py").exists()}
            elif isinstance(node, ast.ImportFrom) and node.level == 1:
                name = node.module.split(".")[0] if node.module else None
                names = [name] if name else [a.name for a in node.names]
                deps |= {n for n in names if (folder / f"{n}.py").exists()}
        graph[path.stem] = deps - {path.stem}
    return graph


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return path[path.index(dep) :] + [dep]
            if dep not in state:
                found = visit(dep, path + [dep])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


@pytest.mark.parametrize("package", ["bench", "nwfast", "kernels"])
def test_no_import_cycles(package):
    assert _cycle(_imports(package)) is None, " -> ".join(_cycle(_imports(package)))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
