"""The state table, enumerated: every state is covered, reachable, and changes only through apply()."""

from __future__ import annotations

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


def test_groups_are_disjoint_where_they_must_be() -> None:
    assert not (states.ROUTABLE_STATES & states.PENDING_STATES)
    assert S.QUARANTINED not in states.PENDING_STATES
