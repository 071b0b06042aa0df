"""The package's modules import each other without a circle (function-level and type-only
imports count: they are how a circle hides), and no lower layer imports a higher one."""

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


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules ``name`` imports anywhere in its body, ``if TYPE_CHECKING:``
    included: a type-only import is still an arrow a reader (and mypy) must follow."""
    return imports_in(ast.parse(path.read_text(), str(path)), name, known)


def imports_in(tree: ast.Module, name: str, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(tree):
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


def test_a_type_only_import_is_an_edge():
    """An import under ``if TYPE_CHECKING:`` is part of the graph, so a type-only circle fails
    the test above (sandbox admin/app had one)."""
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                     "    from dokstamp_sync.sandbox.app import Sandbox\n")
    known = {"dokstamp_sync.sandbox.app", "dokstamp_sync.sandbox.admin"}
    assert imports_in(tree, "dokstamp_sync.sandbox.admin", known) == {
        "dokstamp_sync.sandbox.app"}


# Arrows that run back up: a module under the key may import nothing under these prefixes.
UPWARD: dict[str, tuple[str, ...]] = {
    "dokstamp_sync.dokstamp": ("sync", "pipeline", "ops", "sandbox", "wiring", "worker", "tasks",
                               "cli", "demo", "testing"),
    "dokstamp_sync.sandbox": ("dokstamp", "sync", "pipeline", "ops", "wiring", "worker", "tasks",
                              "cli", "demo", "testing"),
    "dokstamp_sync.sandbox.admin": ("sandbox.app", "sandbox.server"),
    "dokstamp_sync.sync": ("pipeline", "ops", "wiring", "worker", "tasks", "cli", "demo",
                           "testing"),
    "dokstamp_sync.pipeline": ("sync", "ops", "wiring", "worker", "tasks", "cli", "demo",
                               "testing"),
    "dokstamp_sync.ops": ("wiring", "worker", "tasks", "cli", "demo", "testing"),
}


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a lower layer into a higher one, as ``"a -> b"``."""
    found = []
    for module, imported in sorted(graph.items()):
        for low, highs in UPWARD.items():
            if module != low and not module.startswith(low + "."):
                continue
            for target in sorted(imported):
                if any(target == f"{PACKAGE}.{h}" or target.startswith(f"{PACKAGE}.{h}.")
                       for h in highs):
                    found.append(f"{module} -> {target}")
    return found


def test_no_lower_layer_imports_a_higher_one():
    """The pump (pipeline) does not import ops.metrics, the sandbox's admin API does not import
    the app that mounts it, ops/ never reaches for the wiring or the CLI, and so on (UPWARD)."""
    assert upward_arrows(import_graph()) == []


def test_an_upward_arrow_is_found_when_there_is_one():
    """The rule itself: the pump importing ops.metrics, admin importing app, are reported."""
    graph = {"dokstamp_sync.pipeline.pump": {"dokstamp_sync.ops.metrics",
                                             "dokstamp_sync.pipeline.ingest"},
             "dokstamp_sync.sandbox.admin": {"dokstamp_sync.sandbox.app"},
             "dokstamp_sync.cli": {"dokstamp_sync.ops.status"}}
    assert upward_arrows(graph) == ["dokstamp_sync.pipeline.pump -> dokstamp_sync.ops.metrics",
                                    "dokstamp_sync.sandbox.admin -> dokstamp_sync.sandbox.app"]


SYNC = Path(__file__).resolve().parents[1] / "src" / "dokstamp_sync" / "sync"
# The walk's modules reach Redis only through its named objects (locks, marks, the breaker,
# the guard, the listing's marks), never through a client of their own.
WALK = ("engine.py", "upserts.py", "certificates.py", "deletes.py", "listing.py", "files.py",
        "references.py")


def test_no_module_of_the_walk_is_over_400_lines():
    """sync/ stays in files a reader can hold: none over 400 lines."""
    long = {p.name: n for p in SYNC.glob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def raw_redis(tree: ast.Module) -> list[str]:
    """A Redis client reached or made: an attribute named ``redis`` (``ctx.redis``,
    ``self.redis``) or ``Redis``/``from_url`` (its exception types may be named)."""
    return [f"{n.lineno}: .{n.attr}" for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and n.attr in ("redis", "Redis", "from_url")]


def test_the_walk_calls_no_raw_redis():
    """No raw Redis client in the walk: a new call would bypass the seam (and the namespace)."""
    found = {name: hits for name in WALK
             if (hits := raw_redis(ast.parse((SYNC / name).read_text())))}
    assert found == {}
    assert raw_redis(ast.parse("x = ctx.redis.get('k')\n")) == ["1: .redis"]  # the check bites
