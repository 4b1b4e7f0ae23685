"""No import cycles in the shipped packages, counting the imports that import-linter and Python let
slip: those under `if TYPE_CHECKING:` and those inside a function (lazy). A cycle hidden either way is
still two modules that cannot be understood, tested or moved apart; this reads the source with `ast`
(nothing is imported or run) and names every cycle with the line of each of its edges."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(30)

# Not tests.harness.REPO: that module imports the client and psutil, and this test needs only the files.
REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("protocol", "supervisor", "worker", "gateway", "lmxctl")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    where: str  # "path:line"
    kind: str  # "import", "TYPE_CHECKING" or "lazy"


def _module_names(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in packages:
        for path in (root / package).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement with how it runs: at import time, only for the type checker, or lazily."""

    def visit(node: ast.AST, kind: str) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, kind
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from visit(ast.Module(body=[stmt], type_ignores=[]), "TYPE_CHECKING")
                for stmt in child.orelse:
                    yield from visit(ast.Module(body=[stmt], type_ignores=[]), kind)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from visit(child, "TYPE_CHECKING" if kind == "TYPE_CHECKING" else "lazy")
            else:
                yield from visit(child, kind)

    yield from visit(tree, "import")


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module that `name` (a dotted module or module.attribute) loads: the longest prefix."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def import_edges(root: Path, packages: tuple[str, ...]) -> list[Edge]:
    modules = _module_names(root, packages)
    edges: list[Edge] = []
    for module, path in sorted(modules.items()):
        rel = path.relative_to(root).as_posix()
        for node, kind in _imports(ast.parse(path.read_text(encoding="utf-8"), filename=rel)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = _package_of(module, path).split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from a import b` loads a.b when b is a module, else a itself.
                names = [f"{base}.{alias.name}" for alias in node.names]
            for name in names:
                target = _resolve(name, modules)
                if target is not None and target != module:
                    edges.append(Edge(module, target, f"{rel}:{node.lineno}", kind))
    return edges


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def _shortest_cycle(start: str, graph: dict[str, set[str]], members: set[str]) -> list[str]:
    """The shortest path start -> ... -> start inside one component (breadth first)."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if nxt not in came_from:
                    came_from[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{start} is in a component but on no cycle")


def import_cycles(edges: list[Edge]) -> list[str]:
    """One line per cycle: the shortest cycle through each module of each component, deduplicated,
    every edge with the file:line (and kind) that makes it."""
    graph: dict[str, set[str]] = {}
    by_pair: dict[tuple[str, str], Edge] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
        by_pair.setdefault((edge.source, edge.target), edge)
    lines: list[str] = []
    for component in _components(graph):
        seen: set[frozenset[tuple[str, str]]] = set()
        for start in component:
            cycle = _shortest_cycle(start, graph, set(component))
            pairs = list(zip(cycle, cycle[1:]))
            if frozenset(pairs) in seen:
                continue
            seen.add(frozenset(pairs))
            steps = [f"{a} -> {b} ({by_pair[a, b].where}, {by_pair[a, b].kind})" for a, b in pairs]
            lines.append("cycle: " + "; ".join(steps))
    return lines


def test_the_shipped_packages_have_no_import_cycle() -> None:
    cycles = import_cycles(import_edges(REPO, PACKAGES))
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(cycles)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_a_cycle_under_type_checking_or_in_a_function_is_found(tmp_path: Path) -> None:
    # The detector itself: a type-only edge and a lazy edge each close a cycle, and both are named.
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n",
        "pkg/b.py": "import pkg.a\n",
        "pkg/c.py": "def f():\n    from pkg import d\n",
        "pkg/d.py": "from pkg.c import f\n",
        "pkg/e.py": "from pkg import a\n",  # imports into a cycle, is on none
    })
    cycles = import_cycles(import_edges(tmp_path, ("pkg",)))
    assert sorted(cycles) == [
        "cycle: pkg.a -> pkg.b (pkg/a.py:3, TYPE_CHECKING); pkg.b -> pkg.a (pkg/b.py:1, import)",
        "cycle: pkg.c -> pkg.d (pkg/c.py:2, lazy); pkg.d -> pkg.c (pkg/d.py:1, import)",
    ]


def test_an_acyclic_package_has_no_cycle(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low.py": "X = 1\n",
        "pkg/mid.py": "from pkg.low import X\nfrom pkg import low\n",
        "pkg/top.py": "import pkg.mid\nfrom . import low\n",
    })
    edges = import_edges(tmp_path, ("pkg",))
    assert {(e.source, e.target) for e in edges} == {("pkg.mid", "pkg.low"), ("pkg.top", "pkg.mid"),
                                                     ("pkg.top", "pkg.low")}
    assert import_cycles(edges) == []
