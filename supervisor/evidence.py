"""What each load, canary and crash says about this model on this stack, written to the
compatibility registry and consulted at admission."""

from __future__ import annotations

import hashlib
from typing import Any

from protocol import errors as E
from protocol.messages import Final
from supervisor import compat
from supervisor.store import Store


class Evidence:
    def __init__(self, store: Store, model_id: str, path: str, worker_command: tuple[str, ...] | None) -> None:
        self.store = store
        self.model_id = model_id
        self.path = path
        self.fingerprint = compat.fingerprint(path)
        # A custom worker command (a wrapper, a test fault injector) is another stack: what it
        # did must not condemn the model on the standard worker.
        self.backend = compat.backend() + (f" / worker {' '.join(worker_command)}" if worker_command else "")

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

    def canary_passed(self, prompt: str, out: Final, load_s: float | None, memory: dict) -> dict[str, Any]:
        """Record a pass. The same stack giving different greedy text is a failure (corrupt weights or
        a broken kernel); a different stack giving different text is drift: recorded, not failed."""
        template = compat.template_hash(self.path)
        seen = self.store.canary_outputs(self.fingerprint, template, prompt)
        digest = hashlib.sha256(out.text.encode()).hexdigest()
        if self.backend in seen and seen[self.backend] != digest:
            raise E.CanaryFailed("greedy canary output differs from this stack's earlier output "
                                 f"(corrupt weights or a broken kernel): {out.text[:80]!r}")
        drift = any(d != digest for b, d in seen.items() if b != self.backend)
        self.store.set_canary_output(self.fingerprint, self.backend, template, prompt, out.text)
        canary = {"text": out.text[:200], "tokens": out.usage.get("completion_tokens"),
                  "total_s": out.timings.get("total_s"), "decode_tokens_per_s": out.timings.get("decode_tokens_per_s"),
                  "drift": drift}
        self.store.compat_record(self.fingerprint, self.backend, self.model_id, "verified", {
            "canary": canary, "load_s": load_s, "peak_memory_bytes": memory.get("mlx_peak_bytes")})
        return canary

    def failure(self, code: str, quarantined: bool = False) -> None:
        """Count the failure; a quarantine marks the combination failed, except for running out of
        memory, which says more about the budget and the limit than about the model on this stack."""
        row = self.row()
        crashes = dict((row or {}).get("evidence", {}).get("crashes", {}))
        crashes[code] = crashes.get(code, 0) + 1
        failed = quarantined and code != E.ErrorCode.WORKER_OOM.code
        self.store.compat_record(self.fingerprint, self.backend, self.model_id,
                                 "failed" if failed else None, {"crashes": crashes})
