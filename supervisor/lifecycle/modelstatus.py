"""A model's entry in status (what `lmxctl status`, the LMX server and metrics read): a typed view
of its runtime (protocol.states.ModelStatus, the record the wire carries), computed on demand."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from protocol.states import ModelStatus
from supervisor.lifecycle import policy
from supervisor.lifecycle import states
from supervisor.lifecycle.states import ModelState as S

if TYPE_CHECKING:
    from supervisor.lifecycle.runtime import ModelRuntime


def of(rt: "ModelRuntime") -> ModelStatus:
    w = rt.worker
    err = rt.last_error
    window = rt.config.restart.window_s
    now = time.time()
    history = rt.store.failures(rt.cfg.id, now - window)
    return ModelStatus(
        id=rt.cfg.id,
        state=rt.state.value,
        autoload=rt.cfg.autoload,
        pinned=rt.cfg.pinned,
        idled_out=rt.idled_out,
        wanted=rt.wanted(),  # the operator's last load/unload (None: as the config says)
        revision=rt.running.revision,
        configured_revision=rt.cfg.revision,
        lkg_revision=rt.store.flags(rt.cfg.id).lkg_revision,
        worker_pid=w.process.pid if w else None,
        restarts=rt.restarts,
        failures_in_window=policy.failures_in_window(history, now, window),
        last_error={"code": err.code.code, "message": err.message} if err else None,
        quarantined=rt.state is S.QUARANTINED,
        retry_after_s=rt.retry_after_s() if rt.state in states.PENDING_STATES else None,
        ready_for_s=round(time.monotonic() - rt.ready_since, 3) if rt.ready_since else None,
        queued=rt.requests.queued,
        active=len(rt.requests.active),
        phase=w.phase if w else None,
        memory=dict(w.memory) if w else {},
        prefix_cache=rt.cache_totals.observe(w.process.pid if w else None, w.cache if w else {}),
        canary=rt.canary,
        group=w.status() if w is not None else None,  # a group's ranks (Worker.status); None for one worker
        kind=rt.cfg.kind,
    )
