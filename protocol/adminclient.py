"""The operator's calls of SupervisorClient (release, rollback, verify, compat, repair, probe, reload,
cache clear, swap, metrics): each one typed admin request (protocol.admin) and its answer. A mixin
of SupervisorClient; import the client from protocol.client."""

from __future__ import annotations

from protocol import admin as A
from protocol.connection import Connection, new_id
from protocol.messages import Ack


class AdminCalls:
    """Each call one request on the client's connection."""

    connection: Connection

    async def _admin(self, req: A.AdminOp, timeout_s: float) -> dict:
        """Send a typed admin request; its answer as a dict, the same whether the supervisor
        replied typed or with an Ack."""
        reply = await self.connection.call(req, timeout_s)
        if isinstance(reply, A.AdminReply):
            return reply.detail()
        assert isinstance(reply, Ack)
        return reply.detail

    async def release(self, model: str, timeout_s: float = 30.0) -> dict:
        """Lift a quarantine and start the model again on its configured revision."""
        return await self._admin(A.ReleaseRequest(new_id(), model), timeout_s)

    async def rollback(self, model: str, revision: str | None = None, timeout_s: float = 120.0) -> dict:
        """Run `revision` (default: the last-known-good one)."""
        return await self._admin(A.RollbackRequest(new_id(), model, revision), timeout_s)

    async def verify(self, model: str, timeout_s: float = 60.0) -> dict:
        """The admission checks on a model's snapshot: {path, findings: [{code, file, message}]}."""
        return await self._admin(A.VerifyRequest(new_id(), model), timeout_s)

    async def compat(self, timeout_s: float = 10.0) -> dict:
        """The compatibility registry: {backend (this stack), rows: [{model, backend, outcome, evidence, ...}]}."""
        return await self._admin(A.CompatRequest(new_id()), timeout_s)

    async def repair(self, model: str, timeout_s: float = 3600.0) -> dict:
        """Fetch a model's missing/corrupt files from its mirror: {fetched, bytes, findings, state}."""
        return await self._admin(A.RepairRequest(new_id(), model), timeout_s)

    async def probe(self, path: str, timeout_s: float = 900.0) -> dict:
        """Admit, load and canary the snapshot at `path` in a throwaway worker; the registry keeps it."""
        return await self._admin(A.ProbeRequest(new_id(), path), timeout_s)

    async def reload(self, timeout_s: float = 120.0) -> dict:
        """Re-read the config file (like SIGHUP): {added, removed, changed}."""
        return await self._admin(A.ReloadRequest(new_id()), timeout_s)

    async def clear_cache(self, model: str | None = None, timeout_s: float = 30.0) -> dict:
        """Forget a model's prefix cache (every model's without one), in its worker and on disk:
        {models, files, bytes}."""
        return await self._admin(A.CacheClearRequest(new_id(), model), timeout_s)

    async def swap(self, old: str, new: str, timeout_s: float = 900.0) -> dict:
        """NEW takes over OLD's requests: NEW READY first when memory allows, else OLD drained
        first. Requests for OLD go to NEW from then on: {mode, old, new, state}."""
        return await self._admin(A.SwapRequest(new_id(), old, new), timeout_s)

    async def metrics(self, timeout_s: float = 10.0) -> str:
        """The Prometheus text exposition, as the metrics port would serve it."""
        return (await self._admin(A.MetricsRequest(new_id()), timeout_s))["text"]
