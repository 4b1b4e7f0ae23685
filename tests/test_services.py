"""Services types its events and metrics by Protocols declared beside it (the control plane's classes
sit above it in the layers): the control plane's classes must keep every member those Protocols name,
and the no-op defaults that runtimes outside a daemon get must take every call the parts make."""

from __future__ import annotations

import inspect

import pytest

from supervisor.control.events import EventPublisher
from supervisor.control.metrics import Metrics
from supervisor.persistence.records import CrashRecord
from supervisor.services import Counters, Events, NoCounters, NoEvents

pytestmark = pytest.mark.timeout(30)


def _members(protocol: type) -> set[str]:
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {n for n, v in vars(protocol).items() if inspect.isfunction(v) and not n.startswith("_")}
    return names


@pytest.mark.parametrize("protocol, real, default", [(Counters, Metrics(), NoCounters()),
                                                     (Events, EventPublisher, NoEvents())])
def test_the_real_classes_and_the_defaults_have_every_member_services_declares(protocol: type, real: object,
                                                                              default: object) -> None:
    members = _members(protocol)
    assert members, protocol  # a Protocol that declared nothing would pass anything
    assert sorted(m for m in members if not hasattr(real, m)) == []
    assert sorted(m for m in members if not hasattr(default, m)) == []


def test_the_default_counters_take_every_call_the_parts_make_and_count_nothing() -> None:
    c = NoCounters()
    c.restarts.labels("m").inc()
    c.requests.labels("m", "ok").inc()
    c.tokens.labels("m").inc(5)
    c.ttft.labels("m").observe(0.1)
    c.itl.labels("m").observe(0.01)
    c.failed("m", "WORKER_CRASHED", CrashRecord("m", "r1", 0.0, "WORKER_CRASHED"))
    assert c.render() == b""
    NoEvents().publish("model.state", model="m")
