"""The size rules of the shipped packages: no module over 400 lines and no function or method over 50
lines. A module or function past them is split before it grows further; this reads the source with
`ast` (nothing is imported or run), so it is quick and names every offender at once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

# Not tests.harness.REPO: that module imports the client and psutil, and this test needs only the files.
REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("protocol", "worker", "supervisor", "gateway", "lmxctl")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 50


def _modules() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (REPO / package).rglob("*.py"))


def _function_lengths(tree: ast.AST) -> list[tuple[str, int, int]]:
    """(qualified name, first line, length in lines) of every function and method, nested ones too;
    a decorated function counts from its `def`, as ast's lineno does."""
    found: list[tuple[str, int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                assert child.end_lineno is not None
                found.append((name, child.lineno, child.end_lineno - child.lineno + 1))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


@pytest.mark.timeout(30)
def test_packages_are_found() -> None:
    # A renamed package would otherwise make the size test pass on nothing.
    for package in PACKAGES:
        assert any((REPO / package).rglob("*.py")), f"no modules under {package}/"


@pytest.mark.timeout(30)
def test_modules_and_functions_stay_small() -> None:
    offenders: list[str] = []
    for path in _modules():
        source = path.read_text(encoding="utf-8")
        rel = path.relative_to(REPO).as_posix()
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            offenders.append(f"{rel}: module has {lines} lines (limit {MAX_MODULE_LINES})")
        for name, lineno, length in _function_lengths(ast.parse(source, filename=rel)):
            if length > MAX_FUNCTION_LINES:
                offenders.append(f"{rel}:{lineno}: {name} has {length} lines (limit {MAX_FUNCTION_LINES})")
    assert not offenders, "split these:\n" + "\n".join(offenders)
