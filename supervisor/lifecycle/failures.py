"""A model's failures, durable before they are observable: what lifecycle.reduce makes of one is
decided first and its safety records (the failure, a quarantine) written to the store, fsynced, before
its requests fail, a log line or an event says so, or a restart is scheduled (docs/security.md)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from protocol import errors as E
from supervisor.lifecycle import reducer as lifecycle
from supervisor.lifecycle.states import ModelState as S
from supervisor.workers.classify import Verdict

if TYPE_CHECKING:
    from supervisor.lifecycle.runtime import ModelRuntime


class Failures:
    """ModelRuntime's failure handling (a mixin: `self` is the ModelRuntime)."""

    async def _failed(self: "ModelRuntime", exc: E.LmxError, verdict: Verdict | None = None) -> None:
        """A start or a READY worker failed. What lifecycle.reduce makes of it (restart in BACKOFF,
        roll back, or quarantine) is decided first and its safety records made durable; only then
        do its requests fail, the log say so and what is left of the worker stop (docs/security.md:
        durable before observable)."""
        self.last_error = exc
        self.restarts += 1
        self.metrics.restarts.labels(self.cfg.id).inc()
        self.consecutive_failures += 1
        worker = self.worker
        if verdict is None and worker is not None:
            verdict = worker.death  # a death during start surfaced as the awaited future's error
        phase = self.state.value
        now = time.time()
        event = lifecycle.Failed(exc.code.code, exc.message, self.running.revision,
                                 self.store.model_flags(self.cfg.id)["lkg_revision"], self.consecutive_failures,
                                 bool(verdict and verdict.victim))
        effects = self._make_durable(self._reduce(event, now))
        self.log.warning("model.failed", code=exc.code.code, message=exc.message, phase=phase, **exc.details)
        self.requests.fail_all(exc)  # before the stop ladder: nobody waits on it
        await self.stop_worker(f"failed: {exc.code.code}")
        record = lifecycle.crash_record(self.cfg.id, self.running.revision, now, exc, verdict, worker, phase,
                                        self._death_request if worker is not None and worker.death else None)
        await self._perform(effects, exc.code.code, exc, record)

    def _make_durable(self: "ModelRuntime", effects: list[lifecycle.Effect]) -> list[lifecycle.Effect]:
        """Write the safety decisions among `effects` (a failure, a quarantine) to the store now,
        before anything of them can be observed; the rest, in order, for _perform."""
        rest = []
        for effect in effects:
            if isinstance(effect, lifecycle.RecordFailure):
                self.store.add_failure(self.cfg.id, effect.failure)
                continue
            if isinstance(effect, lifecycle.Quarantine):
                self.store.set_quarantine(self.cfg.id, effect.summary)
            rest.append(effect)
        return rest

    def _record_crash(self: "ModelRuntime", record: dict[str, Any], exc: E.LmxError) -> None:
        self.store.add_crash(record)
        self.metrics.failed(self.cfg.id, exc.code.code, record)
        self.events.publish("model.failed", **{k: v for k, v in record.items() if k != "at"})
        self._evidence().failure(record)  # the registry takes only what is about compatibility

    def _quarantine(self: "ModelRuntime", exc: E.LmxError, summary: dict[str, Any]) -> None:
        self.retry_at = None  # the store has it already (_make_durable)
        details = {k: v for k, v in summary.items() if k != "message"}
        self.last_error = E.ModelQuarantined(summary["message"], **details)
        self.log.error("model.quarantined", code=exc.code.code, message=summary["message"],
                       hint=f"lmxctl history {self.cfg.id}; after fixing the cause: lmxctl release {self.cfg.id}")
        self.to(S.QUARANTINED, "too many failures", **details)
