"""What both control endpoints (the ipc socket and the tcp one) share: the admission of a request
by the supervisor's state (draining, a declared model, a reused id, the limits on requests in flight,
supervisor-wide and per client, the deadline cap) and the routes of those requests. One Router, so
`max_requests` bounds the supervisor, not each endpoint. The model table, its aliases and the drain
flag are Operations'; this reads them there. What protocol.limits checks at decode is not checked
again here."""

from __future__ import annotations

import collections
import dataclasses
from typing import TYPE_CHECKING, Any, Hashable

from protocol import errors as E
from protocol.messages import CountTokens, EmbedRequest, GenerateRequest, RerankRequest

if TYPE_CHECKING:
    from supervisor.lifecycle.runtime import ModelRuntime
    from supervisor.operations.verbs import Operations

Client = Hashable  # (endpoint, ZeroMQ identity): identities are unique per socket only
Key = tuple[Client, str]  # (client, the client's own request id)


class Router:
    def __init__(self, ops: "Operations") -> None:
        self._ops = ops
        self._routes: dict[Key, tuple["ModelRuntime", str]] = {}
        self._per_client: collections.Counter[Client] = collections.Counter()

    def admit(self, client: Client, req: GenerateRequest | CountTokens | EmbedRequest | RerankRequest,
              ) -> tuple["ModelRuntime", Any]:
        """The runtime for a new request (a generation, a token count, an embedding, a rerank) and the
        request as it will run (its deadline capped), or the typed refusal: draining, unknown model,
        a model of another kind, neither or both of prompt and messages, a reused id, or over a limit."""
        if self._ops.draining:
            raise E.ShuttingDown("supervisor is shutting down", retry_after_s=5.0)
        runtime = self._ops.runtime(req.model)
        _check_kind(runtime.cfg.id, runtime.cfg.kind, req)
        if isinstance(req, (GenerateRequest, CountTokens)) and (req.prompt is None) == (req.messages is None):
            raise E.BadRequest("exactly one of prompt or messages is required")
        if (client, req.request_id) in self._routes:
            raise E.BadRequest(f"request id {req.request_id!r} is already in flight")
        limits = self._ops.config.supervisor
        if len(self._routes) >= limits.max_requests:
            raise E.Overloaded(f"the supervisor has {len(self._routes)} requests in flight (max_requests)",
                               retry_after_s=1.0)
        if self._per_client[client] >= limits.max_requests_per_client:
            raise E.Overloaded(f"this client has {self._per_client[client]} requests in flight "
                               "(max_requests_per_client)", retry_after_s=1.0)
        # Every request has a deadline: the client's (decode made sure it is > 0), capped by
        # request_timeout_s.
        deadline = limits.request_timeout_s if req.timeout_s is None else min(req.timeout_s, limits.request_timeout_s)
        if deadline != req.timeout_s:
            req = dataclasses.replace(req, timeout_s=deadline)
        return runtime, req

    def add(self, key: Key, runtime: "ModelRuntime", wrid: str) -> None:
        self._routes[key] = (runtime, wrid)
        self._per_client[key[0]] += 1

    def end(self, key: Key) -> bool:
        """The request's route is over (its last message is going out); False if it was already."""
        if self._routes.pop(key, None) is None:
            return False
        client = key[0]
        self._per_client[client] -= 1
        if not self._per_client[client]:
            del self._per_client[client]
        return True

    def cancel(self, key: Key) -> bool:
        """Cancel the request in flight under `key`, if there is one."""
        route = self._routes.get(key)
        if route is not None:
            route[0].cancel(route[1])
        return route is not None


# What each kind of model serves (supervisor.kinds): a request of another sort is the client's
# mistake, refused here before any worker sees it.
_SERVES = {"generate": (GenerateRequest, CountTokens), "embed": (EmbedRequest,), "rerank": (RerankRequest,)}
_SORT = {"generate": "generation", "count_tokens": "token count", "embed": "embedding", "rerank": "rerank"}
_SERVED = {"generate": "generations and token counts", "embed": "embeddings", "rerank": "rerank scores"}


def _check_kind(model_id: str, kind: str, req: Any) -> None:
    if not isinstance(req, _SERVES.get(kind, ())):
        serves = _SERVED.get(kind, "nothing yet")
        raise E.BadRequest(f"model {model_id!r} is of kind {kind!r}: it serves {serves}, not a "
                           f"{_SORT.get(req.TAG, req.TAG)} request", model=model_id, kind=kind)
