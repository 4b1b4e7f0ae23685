"""docs/events.md cannot drift: every event name the code emits is catalogued (at the levels it is
emitted at), and every catalogued name is still emitted somewhere."""

from __future__ import annotations

import ast
import re

from tests.harness import REPO

SOURCES = ("supervisor", "worker", "protocol")
CATALOGUE = REPO / "docs" / "events.md"
LEVEL_METHODS = {"debug": "debug", "info": "info", "warning": "warning", "error": "error",
                 "exception": "error", "critical": "critical"}
NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
LOGGER = re.compile(r"(^|\.)_?(log|logger)$")  # log, self.log, self._log, logger
ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*([a-z/-]+)\s*\|")


def _emitted_by(call: ast.Call) -> tuple[str, str | None, ast.expr] | None:
    """(kind, level, name argument) when `call` emits an event: a logger's level method, the
    worker's `log(event, level=...)` (also states.apply's `log`), a helper called as
    `note("warning", "model.evicted", ...)`, or an events-socket `publish(event, ...)`."""
    f, args = call.func, call.args
    if isinstance(f, ast.Attribute) and f.attr in LEVEL_METHODS and LOGGER.search(ast.unparse(f.value)):
        return "log", LEVEL_METHODS[f.attr], args[0]
    if isinstance(f, ast.Name) and f.id == "log":
        level = next((k.value for k in call.keywords if k.arg == "level"), ast.Constant("info"))
        return "log", level.value if isinstance(level, ast.Constant) else None, args[0]
    if len(args) >= 2 and isinstance(args[0], ast.Constant) and args[0].value in LEVEL_METHODS:
        return "log", LEVEL_METHODS[args[0].value], args[1]
    if isinstance(f, ast.Attribute) and f.attr == "publish":
        return "publish", None, args[0]
    return None


def emitted() -> dict[str, list[tuple[str, str | None, str]]]:
    """event name -> [(kind, level, "file:line")] over every module of the daemon and the worker.
    A plain variable as the name is a helper forwarding its caller's event (whose literal the
    scan sees at the call site); any other expression (an f-string) is reported as not a literal."""
    found: dict[str, list[tuple[str, str | None, str]]] = {}
    for top in SOURCES:
        for path in sorted((REPO / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                how = _emitted_by(node) if isinstance(node, ast.Call) and node.args else None
                if how is None or isinstance(how[2], ast.Name):
                    continue
                kind, level, first = how
                where = f"{path.relative_to(REPO)}:{node.lineno}"
                name = first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None
                found.setdefault(name or f"<not a literal at {where}>", []).append((kind, level, where))
    return found


def catalogue() -> dict[str, set[str]]:
    """event name -> documented levels, from the tables of docs/events.md."""
    rows: dict[str, set[str]] = {}
    for line in CATALOGUE.read_text().splitlines():
        m = ROW.match(line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} is catalogued twice"
            rows[m.group(1)] = set(m.group(2).split("/"))
    return rows


def test_the_scan_finds_the_events_it_must() -> None:
    names = emitted()
    # One of each way of emitting: a bound structlog logger, states.apply, the worker's log(), publish.
    for name in ("worker.exited", "model.state", "worker.loaded", "model.failed"):
        assert name in names, name
    assert any(kind == "publish" for kind, _, _ in names["model.state"])


def test_every_event_name_is_a_literal_in_dotted_snake_case() -> None:
    bad = {name: [w for _, _, w in uses] for name, uses in emitted().items() if not NAME.match(name)}
    assert not bad, f"event names must be string literals like 'model.state': {bad}"


def test_every_emitted_event_is_catalogued() -> None:
    documented = catalogue()
    missing = {name: [w for _, _, w in uses] for name, uses in emitted().items() if name not in documented}
    assert not missing, f"add these events to docs/events.md: {missing}"


def test_every_catalogued_event_is_still_emitted() -> None:
    names = emitted()
    stale = sorted(name for name in catalogue() if name not in names)
    assert not stale, f"docs/events.md lists events no code emits any more: {stale}"


def test_catalogued_levels_match_the_code() -> None:
    documented = catalogue()
    wrong = [f"{name} at {where}: emitted at {level}, catalogued as {'/'.join(sorted(documented[name]))}"
             for name, uses in emitted().items() if name in documented
             for kind, level, where in uses if kind == "log" and level not in documented[name]]
    assert not wrong, "\n".join(wrong)
