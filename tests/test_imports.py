"""The package's modules import each other without a circle (function-level imports count:
they are how a circle hides)."""

from __future__ import annotations

import ast
from pathlib import Path

import dokstamp_sync

ROOT = Path(dokstamp_sync.__file__).parent
PACKAGE = "dokstamp_sync"


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _typing_only(tree: ast.Module) -> set[ast.AST]:
    """The statements under ``if TYPE_CHECKING:``: never run, so never part of a circle."""
    return {inner for node in ast.walk(tree) if isinstance(node, ast.If)
            and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
            for stmt in node.body for inner in ast.walk(stmt)}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules ``name`` imports when it runs, anywhere in its body."""
    found = set()
    tree = ast.parse(path.read_text(), str(path))
    skip = _typing_only(tree)
    for node in ast.walk(tree):
        if node in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import mod` imports the module `pkg.mod`, else names of `pkg`
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known
                      else node.module for a in node.names}
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path ``[a, b, ..., a]``, or None (depth-first, colouring)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (circle := visit(node)):
            return circle
    return None


def test_the_package_has_no_import_circle():
    """No module of dokstamp_sync reaches itself again through the package's own imports."""
    circle = find_circle(import_graph())
    assert circle is None, " -> ".join(circle or [])


def test_a_circle_is_found_when_there_is_one():
    """The walk itself: a made-up graph with a circle (a -> b -> c -> a) is reported."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_circle(graph) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_function_level_imports():
    """An import inside a function is an edge too (the CLI imports its commands lazily)."""
    assert "dokstamp_sync.ops.status" in import_graph()["dokstamp_sync.cli"]


def test_the_walk_does_not_import_the_pipeline():
    """The sync walk (``dokstamp_sync.sync``) sits below the pipeline: none of its modules
    imports ``dokstamp_sync.pipeline`` (the store gets the outcome publisher from wiring)."""
    graph = import_graph()
    walk = {name: deps for name, deps in graph.items() if name.startswith(f"{PACKAGE}.sync")}
    wrong = {name: sorted(d for d in deps if d.startswith(f"{PACKAGE}.pipeline"))
             for name, deps in walk.items()}
    assert {k: v for k, v in wrong.items() if v} == {}
