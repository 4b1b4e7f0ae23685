"""What both control endpoints (the ipc socket and the tcp one) share: the model table and its
aliases, whether the supervisor is draining, the limits on requests in flight (supervisor-wide and
per client) and the routes of those requests. One Router, so `max_requests` bounds the supervisor,
not each endpoint, and a swap's alias holds on both."""

from __future__ import annotations

import collections
import dataclasses
from typing import TYPE_CHECKING, Any, Hashable

from protocol import errors as E
from protocol.messages import CountTokens, GenerateRequest
from supervisor.services import Services

if TYPE_CHECKING:
    from supervisor.lifecycle.runtime import ModelRuntime

Client = Hashable  # (endpoint, ZeroMQ identity): identities are unique per socket only
Key = tuple[Client, str]  # (client, the client's own request id)


class Router:
    def __init__(self, services: Services, models: dict[str, "ModelRuntime"]) -> None:
        self._services = services
        self.models = models  # the daemon's table (it adds and removes runtimes on reload)
        self.aliases: dict[str, str] = {}  # after `swap OLD NEW`: requests for OLD go to NEW
        self.draining = False
        self._routes: dict[Key, tuple["ModelRuntime", str]] = {}
        self._per_client: collections.Counter[Client] = collections.Counter()

    def runtime(self, model: str) -> "ModelRuntime":
        runtime = self.models.get(self.aliases.get(model, model))
        if runtime is None:
            raise E.UnknownModel(f"model {model!r} is not declared", model=model)
        return runtime

    def unalias(self, model: str) -> bool:
        """Loading a swapped-out model takes its name back; True when it had been swapped out."""
        return self.aliases.pop(model, None) is not None

    def admit(self, client: Client, req: GenerateRequest | CountTokens) -> tuple["ModelRuntime", Any]:
        """The runtime for a new request (a generation or a token count) and the request as it will
        run (its deadline capped), or the typed refusal: draining, unknown model, malformed, a reused
        id, or over a limit."""
        if self.draining:
            raise E.ShuttingDown("supervisor is shutting down", retry_after_s=5.0)
        runtime = self.runtime(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise E.BadRequest("exactly one of prompt or messages is required")
        if isinstance(req, GenerateRequest) and req.max_tokens < 1:
            raise E.BadRequest(f"max_tokens must be >= 1, got {req.max_tokens}")
        if (client, req.request_id) in self._routes:
            raise E.BadRequest(f"request id {req.request_id!r} is already in flight")
        limits = self._services.config.supervisor
        if len(self._routes) >= limits.max_requests:
            raise E.Overloaded(f"the supervisor has {len(self._routes)} requests in flight (max_requests)",
                               retry_after_s=1.0)
        if self._per_client[client] >= limits.max_requests_per_client:
            raise E.Overloaded(f"this client has {self._per_client[client]} requests in flight "
                               "(max_requests_per_client)", retry_after_s=1.0)
        # Every request has a deadline: the client's, capped by request_timeout_s.
        if req.timeout_s is not None and req.timeout_s <= 0:
            raise E.BadRequest(f"timeout_s must be > 0, got {req.timeout_s}")
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
