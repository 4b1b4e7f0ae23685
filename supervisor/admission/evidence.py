"""What each load, canary and crash says about this model on this stack, written to the
compatibility registry and consulted at admission."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from protocol import errors as E
from protocol.messages import Final
from supervisor.admission import compat
from supervisor.config import CanarySettings
from supervisor.persistence.records import CrashRecord
from supervisor.persistence.store import Store

# Phases in which a failure is the model's own doing on this stack: its weights loading, its first
# generation. Later deaths (READY) are about requests, load, neighbours and operators.
START_PHASES = frozenset({"LOADING", "CANARY"})
# Signals a process brings on itself (an abort, a fault in a kernel). SIGKILL, SIGTERM, SIGSTOP
# and the like come from someone else: an operator, the OOM killer, our own stop ladder.
OWN_SIGNALS = frozenset({"SIGABRT", "SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE"})
OWN_CODES = frozenset({E.ErrorCode.LOAD_FAILED.code, E.ErrorCode.CANARY_FAILED.code})
# Separate starts that must fail so before the combination is recorded as failed: one stray
# fault (a signal from outside that looks like a segfault) never condemns a model.
STARTS_FOR_VERDICT = 2
_STARTS_KEPT = 10


def about_compat(record: CrashRecord) -> bool:
    """Pure: does this crash record say anything about the model on this stack? Only a failure
    in LOADING or CANARY that the worker raised itself (LOAD_FAILED, CANARY_FAILED) or died of by
    its own abort or fault; never a hang, an OOM, an innocent victim or a signal someone sent."""
    if record.phase not in START_PHASES or record.victim:
        return False
    return record.code in OWN_CODES or (record.code == E.ErrorCode.WORKER_CRASHED.code
                                        and record.signal in OWN_SIGNALS)


def canary_key(c: CanarySettings) -> str:
    """Everything in the request that decides the greedy text (the template is keyed apart): a
    canary change must meet a new reference, not be judged against the old one's output."""
    return json.dumps({"prompt": c.prompt, "max_tokens": c.max_tokens}, sort_keys=True)


class Evidence:
    def __init__(self, store: Store, model_id: str, path: str, worker_command: tuple[str, ...] | None,
                 group: Any = None) -> None:
        self.store = store
        self.model_id = model_id
        self.path = path
        self.fingerprint = compat.fingerprint(path)
        # A custom worker command (a wrapper, a test fault injector) is another stack: what it
        # did must not condemn the model on the standard worker. So is a group (its backend, its
        # size, its sharding): a model that fails split in two may well run whole, and back.
        self.backend = compat.backend() + (f" / worker {' '.join(worker_command)}" if worker_command else "")
        if group is not None:
            self.backend += f" / group {group.backend} x{group.size} {group.parallel or 'auto'}"

    def row(self) -> dict[str, Any] | None:
        rows = self.store.compat(self.fingerprint, self.backend)
        return rows[0] if rows else None

    def known_bad(self) -> E.LmxError | None:
        row = self.row()
        if row is None or row["outcome"] != "failed":
            return None
        ev = row["evidence"]
        return E.CompatKnownBad(
            f"{self.model_id} failed on {self.backend} before ({ev.get('crashes', {})}); "
            f"lmxctl load {self.model_id} --force to try anyway",
            fingerprint=self.fingerprint, backend=self.backend, evidence=ev)

    def canary_passed(self, canary: CanarySettings, out: Final, load_s: float | None, memory: dict) -> dict[str, Any]:
        """Record a pass. The same stack giving different greedy text for the same request is a
        failure (corrupt weights or a broken kernel); a different stack giving different text is
        drift: recorded, not failed."""
        template, key = compat.template_hash(self.path), canary_key(canary)
        seen = self.store.canary_outputs(self.fingerprint, template, key)
        digest = hashlib.sha256(out.text.encode()).hexdigest()
        if self.backend in seen and seen[self.backend] != digest:
            raise E.CanaryFailed("greedy canary output differs from this stack's earlier output "
                                 f"(corrupt weights or a broken kernel): {out.text[:80]!r}")
        drift = any(d != digest for b, d in seen.items() if b != self.backend)
        self.store.set_canary_output(self.fingerprint, self.backend, template, key, out.text)
        canary = {"text": out.text[:200], "tokens": out.usage.get("completion_tokens"),
                  "total_s": out.timings.get("total_s"), "decode_tokens_per_s": out.timings.get("decode_tokens_per_s"),
                  "drift": drift}
        # A pass on this stack outweighs the failed starts before it: they count again from none.
        self.store.compat_record(self.fingerprint, self.backend, self.model_id, "verified", {
            "canary": canary, "load_s": load_s, "peak_memory_bytes": memory.get("mlx_peak_bytes"),
            "failed_starts": []})
        return canary

    def failure(self, record: CrashRecord) -> bool:
        """Learn from a crash record, if it is evidence (about_compat); the combination is marked
        failed once STARTS_FOR_VERDICT separate starts (worker processes) failed so. True if counted."""
        if not about_compat(record):
            return False
        row = self.row()
        ev = (row or {}).get("evidence", {})
        crashes = dict(ev.get("crashes", {}))
        crashes[record.code] = crashes.get(record.code, 0) + 1
        start = record.worker_pid or record.at
        starts = [*ev.get("failed_starts", []), start][-_STARTS_KEPT:]
        failed = len(set(starts)) >= STARTS_FOR_VERDICT
        self.store.compat_record(self.fingerprint, self.backend, self.model_id, "failed" if failed else None,
                                 {"crashes": crashes, "failed_starts": starts})
        return True
