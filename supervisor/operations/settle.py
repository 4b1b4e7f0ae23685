"""Waiting for a model an operation started: until it is READY or has given up, or the drain begins."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Awaitable, Callable

from protocol import errors as E
from supervisor.lifecycle.states import ModelState as S

if TYPE_CHECKING:
    from supervisor.lifecycle.runtime import ModelRuntime

# The states a start ends in: READY, or given up (refused, quarantined, stopped). Defined here, not
# in lifecycle/states.py: only operations wait for them.
SETTLED_STATES = frozenset({S.READY, S.REJECTED, S.QUARANTINED, S.UNLOADED})


async def settled(rt: "ModelRuntime", drained: Callable[[], Awaitable[None]]) -> None:
    """Until the model is in a SETTLED_STATES state, bounded by its load and canary timeouts; the
    drain beginning (`drained` returns) cuts it short: the operation then stops what it began."""
    timeout_s = rt.config.supervisor.load_timeout_s + rt.cfg.canary.timeout_s + 60
    waits = (asyncio.ensure_future(rt.until(lambda: rt.state in SETTLED_STATES)),
             asyncio.ensure_future(drained()))
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def bring_to_ready(rt: "ModelRuntime", reason: str, drained: Callable[[], Awaitable[None]]) -> None:
    """Start the model (as the operator wants it) unless READY, and wait: its error if it gives up."""
    if rt.state is S.READY:
        return
    rt.start(reason, wanted=True)
    await settled(rt, drained)
    if rt.state is not S.READY:
        raise rt.last_error or E.ModelNotReady(f"model {rt.cfg.id} did not become READY ({rt.state.value})")
