"""Who may call the gateway, and how much: an ASGI middleware in front of every route.

Off when the gateway listens on loopback and no API key exists; required as soon as one key exists,
and always when it listens on anything else (gateway/cli.py refuses to start there without keys
unless told `--no-auth`). A key comes as `Authorization: Bearer KEY` (OpenAI's SDKs) or
`x-api-key: KEY` (Anthropic's). /healthz and /readyz stay open for probes.

Per key: its endpoints' scope (`inference`, `admin` for /metrics), its requests per minute and
tokens per minute (token buckets that refill continuously; tokens are charged when a response
ends, from its usage), and its requests at once. Over a limit is 429 with Retry-After, in the
dialect's error shape (Anthropic's on /v1/messages, OpenAI's elsewhere). The models a key may use
are checked where the model is known, by each handler through check_model (and listings filtered
through visible): any other model is a 404, as if absent."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.requests import Request

from gateway import errors as http_errors
from gateway.anthropic_shapes import AnthropicDialect
from gateway.apikeys import ApiKey, KeyRing
from protocol import errors as E

log = structlog.get_logger("lmx.gateway")

OPEN_PATHS = ("/healthz", "/readyz")
ADMIN_PATHS = ("/metrics",)
_ANTHROPIC = AnthropicDialect()


class Bucket:
    """`per_minute` units a minute, refilled continuously, `per_minute` at most in hand. `take`
    may leave it below zero (tokens are known only after the fact): the debt is paid by waiting."""

    def __init__(self, per_minute: int) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self.level = self.capacity
        self._at = time.monotonic()

    def _fill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self._at) * self.rate)
        self._at = now

    def wait_s(self, need: float) -> float:
        """Seconds until `need` units are in hand (0: now)."""
        self._fill()
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, n: float) -> None:
        self._fill()
        self.level -= n


@dataclass
class _Use:
    requests: Bucket | None
    tokens: Bucket | None
    in_flight: int = 0


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("lmx_gateway_requests", "Requests admitted, per API key", ["key"], registry=r)
        self.refused = Counter("lmx_gateway_refused", "Requests refused by auth or a key's limit", ["key", "reason"],
                               registry=r)
        self.tokens = Counter("lmx_gateway_tokens", "Tokens served, per API key", ["key", "kind"], registry=r)
        self.in_flight = Gauge("lmx_gateway_in_flight", "Requests in flight", registry=r)


class Guard:
    def __init__(self, ring: KeyRing | None, required: bool, metrics: Metrics) -> None:
        self.ring = ring
        self.required = required
        self.metrics = metrics
        self._use: dict[str, _Use] = {}

    def active(self) -> bool:
        if self.required:
            return True
        if self.ring is None:
            return False
        self.ring.refresh()
        return bool(self.ring.keys)

    def _use_of(self, key: ApiKey) -> _Use:
        use = self._use.get(key.key_id)
        if use is None:
            use = self._use[key.key_id] = _Use(
                Bucket(key.requests_per_minute) if key.requests_per_minute else None,
                Bucket(key.tokens_per_minute) if key.tokens_per_minute else None)
        return use

    def _refuse(self, key: str, reason: str, err: E.LmxError) -> E.LmxError:
        self.metrics.refused.labels(key=key, reason=reason).inc()
        return err

    def admit(self, headers: dict[str, str], path: str) -> ApiKey | None:
        """The caller's key (None when auth is off); raises the error to answer with."""
        if not self.active() or path in OPEN_PATHS:
            return None
        presented = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
        key = self.ring.find(presented) if self.ring is not None and presented else None
        if key is None:
            raise self._refuse("", "unauthenticated", E.Unauthorized(
                "a valid API key is required (Authorization: Bearer KEY, or x-api-key: KEY)"))
        if path.startswith(ADMIN_PATHS) and "admin" not in key.scopes:
            raise self._refuse(key.name, "scope", E.Unauthorized(f"key {key.name!r} has no admin scope"))
        use = self._use_of(key)
        waits = {"concurrency": 1.0 if key.concurrency is not None and use.in_flight >= key.concurrency else 0.0,
                 "requests_per_minute": use.requests.wait_s(1) if use.requests else 0.0,
                 "tokens_per_minute": use.tokens.wait_s(1e-9) if use.tokens else 0.0}
        for name, wait in waits.items():
            if wait > 0:
                raise self._refuse(key.name, name, E.Overloaded(
                    f"key {key.name!r} is over its {name.replace('_', ' ')}", limit=name,
                    retry_after_s=max(1.0, math.ceil(wait))))
        if use.requests is not None:
            use.requests.take(1)
        use.in_flight += 1
        self.metrics.requests.labels(key=key.name).inc()
        return key

    def release(self, key: ApiKey, usage: dict | None) -> None:
        use = self._use_of(key)
        use.in_flight -= 1
        if usage:
            prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
            self.metrics.tokens.labels(key=key.name, kind="prompt").inc(prompt)
            self.metrics.tokens.labels(key=key.name, kind="completion").inc(completion)
            if use.tokens is not None:
                use.tokens.take(prompt + completion)


class AuthMiddleware:
    """Admits or refuses each HTTP request before the app sees it; the admitted key rides in
    `scope["state"]["api_key"]`, and its in-flight slot is given back when the response ends."""

    def __init__(self, app: Any, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":  # CORS preflights carry no key
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            key = self.guard.admit(headers, scope["path"])
        except E.LmxError as exc:
            log.info("gateway.auth_refused", path=scope["path"][:128], code=exc.code.code, message=exc.message)
            anthropic = scope["path"].startswith("/v1/messages")
            response = _ANTHROPIC.error_response(exc, {}) if anthropic else http_errors.response(exc)
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["api_key"] = key
        usage: dict = {}
        scope["state"]["usage"] = usage  # filled by gateway/app.py when a generation ends
        try:
            await self.app(scope, receive, send)
        finally:
            if key is not None:
                self.guard.release(key, usage)


def visible(request: Request, status: dict) -> dict:
    """The supervisor's status as the request's key sees it: only the models it may use."""
    key = getattr(request.state, "api_key", None)
    if key is None or not key.models:
        return status
    return {**status, "models": [m for m in status["models"] if key.allows_model(m["id"])]}


def check_model(request: Request, model: str) -> None:
    """A key scoped to some models sees no other: to it they are unknown."""
    key = getattr(request.state, "api_key", None)
    if key is not None and not key.allows_model(model):
        raise E.UnknownModel(f"no model {model[:128]!r} for this API key", model=model[:128])


def charge(request: Request, usage: dict) -> None:
    """What a request used (prompt_tokens, completion_tokens), left where the auth middleware charges
    it to the caller's key when the response has been sent; no key, nothing to charge."""
    account = getattr(request.state, "usage", None)
    if account is not None:
        account.update(usage)
