"""The state table, enumerated: every state is covered and reachable, and a model's state is assigned in
one place only, ModelRuntime.to(), which applies the table (apply())."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from supervisor.lifecycle import states
from supervisor.lifecycle.states import ModelState as S


def test_every_state_has_a_row_and_every_target_is_a_state() -> None:
    assert set(states.TRANSITIONS) == set(S)
    for targets in states.TRANSITIONS.values():
        assert targets <= set(S)


def test_every_state_is_reachable_from_unloaded_and_can_get_back() -> None:
    def reach(start: S) -> set[S]:
        seen, todo = {start}, [start]
        while todo:
            for nxt in states.TRANSITIONS[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert reach(S.UNLOADED) == set(S)
    for s in S:
        assert S.UNLOADED in reach(s), f"{s} is a dead end"


def test_the_happy_path_of_the_brief() -> None:
    path = [S.UNLOADED, S.ADMITTING, S.STARTING, S.LOADING, S.CANARY, S.READY, S.DRAINING, S.UNLOADED]
    for a, b in zip(path, path[1:]):
        states.check(a, b)


@pytest.mark.parametrize("a, b", [(S.UNLOADED, S.READY), (S.QUARANTINED, S.STARTING), (S.READY, S.LOADING),
                                  (S.DRAINING, S.READY), (S.REJECTED, S.STARTING)])
def test_illegal_transitions_raise(a: S, b: S) -> None:
    with pytest.raises(states.IllegalTransition):
        states.check(a, b)


def test_apply_logs_one_model_state_event() -> None:
    events: list[tuple[str, dict]] = []
    new = states.apply(S.CANARY, S.READY, "canary passed", lambda e, **kw: events.append((e, kw)), model="m")
    assert new is S.READY
    assert events == [("model.state", {"from": "CANARY", "to": "READY", "reason": "canary passed", "model": "m"})]


def test_a_models_state_is_assigned_only_in_the_runtimes_to() -> None:
    # Any other `x.state = ...` in the daemon would move a model past the table and its log line.
    root = Path(__file__).resolve().parents[1] / "supervisor"
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
                if any(isinstance(t, ast.Attribute) and t.attr == "state" for t in targets):
                    found.append(f"{path.relative_to(root.parent).as_posix()}:{fn.name}")
    assert sorted(set(found)) == ["supervisor/lifecycle/runtime.py:__init__", "supervisor/lifecycle/runtime.py:to"]
