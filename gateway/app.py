"""The Starlette app: routes, the one SupervisorClient they share, and the one path every
generation takes whatever its dialect (`Gateway.respond`). Everything about the supervisor goes
through protocol.client."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import anthropic, apikeys, auth, body, context_edits, listing, readiness
from gateway import errors as http_errors
from gateway.anthropic_shapes import AnthropicDialect
from gateway.dialect import CHAT, COMPLETIONS, Dialect
from gateway.embeddings import EmbeddingsAPI
from gateway.rerank import RerankAPI
from gateway.params import GenParams
from gateway.responses_api import ResponsesAPI
from gateway.signing import ThinkingSigner
from gateway.sse import GenerationResponse
from protocol import endpoint as ep
from protocol import errors as E
from protocol.client import GenerateStream, SupervisorClient

log = structlog.get_logger("lmx.gateway")

MAX_BODY_BYTES = body.MAX_BODY_BYTES


@dataclass(frozen=True)
class GatewayConfig:
    endpoint: str | None = None          # else the control socket in state_dir
    state_dir: str | None = None         # else LMX_STATE_DIR, else the platform default
    request_timeout_s: float = 300.0     # each generation's deadline, carried to the supervisor
    status_timeout_s: float = 5.0        # /v1/models and /readyz
    required_models: tuple[str, ...] = ()  # /readyz: exactly these must be READY (default: status' view)
    cors_origins: tuple[str, ...] = ()   # browser origins allowed to call (CORS); none by default
    body_timeout_s: float = body.BODY_TIMEOUT_S  # a request's body must arrive within this
    max_in_flight: int = 256             # generations at once; past it 429 with Retry-After
    auth_required: bool = False          # API keys required even while none exists (a non-loopback bind)
    responses_max_count: int = 10_000    # stored Responses kept (the oldest go first)
    responses_max_age_s: float = 30 * 86_400.0  # and none older than this


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.client = SupervisorClient(config.endpoint, state_dir=config.state_dir,
                                       timeout_s=config.request_timeout_s)
        self.state_dir = ep.resolve_state_dir(config.state_dir)
        self.signer = ThinkingSigner.from_state_dir(self.state_dir)
        self.anthropic = AnthropicDialect(self.signer)
        self.in_flight = 0
        self.metrics = auth.Metrics()
        self.metrics.in_flight.set_function(lambda: self.in_flight)  # read off the one counter
        self.guard = auth.Guard(apikeys.KeyRing(apikeys.path_in(self.state_dir)), config.auth_required, self.metrics)

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """One request in flight for as long as the block runs; past max_in_flight, Overloaded (a 429
        with Retry-After). The generations keep theirs until their response is sent (_Counted)."""
        if self.in_flight >= self.config.max_in_flight:
            raise self._overloaded()
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def _overloaded(self) -> E.LmxError:
        return E.Overloaded(f"the gateway has {self.in_flight} requests in flight, its limit", retry_after_s=1.0)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        try:
            await self.client.connect()
        except E.LmxError as exc:
            # Not fatal: the gateway serves /healthz and answers 503 until the supervisor is up;
            # every request connects again.
            log.warning("gateway.supervisor_unavailable", code=exc.code.code, message=exc.message)
        log.info("gateway.started", endpoint=self.client.endpoint)
        try:
            yield
        finally:
            await self.client.close()

    # --- probes and listing ------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        try:
            status = await self.client.status(timeout_s=self.config.status_timeout_s)
        except E.LmxError as exc:
            return http_errors.response(exc)
        ready, report = readiness.check(status, self.config.required_models)
        return JSONResponse(report, status_code=200 if ready else 503)

    def _listing_dialect(self, request: Request) -> tuple[bool, Dialect]:
        wants = "anthropic-version" in request.headers  # the anthropic SDK sends it on every call
        return wants, (self.anthropic if wants else CHAT)

    async def models(self, request: Request) -> Response:
        wants, dialect = self._listing_dialect(request)
        try:
            status = await self.client.status(timeout_s=self.config.status_timeout_s)
        except E.LmxError as exc:
            return dialect.error_response(exc, {})
        return JSONResponse(listing.listing(auth.visible(request, status), wants))

    async def model(self, request: Request) -> Response:
        wants, dialect = self._listing_dialect(request)
        try:
            status = await self.client.status(timeout_s=self.config.status_timeout_s)
            return JSONResponse(listing.one(auth.visible(request, status), request.path_params["model_id"], wants))
        except E.LmxError as exc:
            return dialect.error_response(exc, {})

    async def metrics_text(self, request: Request) -> Response:
        """The gateway's own figures (requests, refusals and tokens per API key; in flight):
        Prometheus text, for keys with the admin scope."""
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # --- generations -------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Any:
        return await self.respond(request, CHAT)

    async def completions(self, request: Request) -> Any:
        return await self.respond(request, COMPLETIONS)

    async def messages(self, request: Request) -> Any:
        return await self.respond(request, self.anthropic)

    async def respond(self, request: Request, dialect: Dialect) -> Any:
        """Every generation: the body read and parsed by its dialect, context edits applied, the
        generation started, its objects shaped and framed by the dialect. A failure before the
        first token is an HTTP error in the dialect's shape (GenerationResponse)."""
        if self.in_flight >= self.config.max_in_flight:
            return dialect.error_response(self._overloaded(), {})
        self.in_flight += 1  # counted from here to the response's end (_Counted), body read included
        try:
            p = dialect.parse(await body.json_body(request, self.config.body_timeout_s))
            auth.check_model(request, p.model)
            p, applied = await self._edit(p)
        except E.LmxError as exc:
            self.in_flight -= 1
            return dialect.error_response(exc, {})
        except BaseException:
            self.in_flight -= 1
            raise
        kwargs = p.client_kwargs()
        key = getattr(request.state, "api_key", None)
        if key is not None and key.priority == "batch":  # waits behind interactive work in the supervisor
            kwargs["priority"] = "batch"
        stream = self.client.generate(p.model, **kwargs)
        shaper = dialect.shaper(p, stream.request_id, applied)
        events = shaper.events(stream) if p.stream else shaper.whole(stream)
        return _Counted(self, request, stream, GenerationResponse(
            events, streaming=p.stream, request_id=stream.request_id, dialect=dialect))

    async def count(self, p: GenParams, messages: list[dict]) -> int:
        """The prompt's tokens as the model renders it: tools and template switches included."""
        return await self.client.count_tokens(p.model, messages=messages, tools=p.agent.get("tools"),
                                              chat_template_kwargs=p.agent.get("chat_template_kwargs"))

    async def _edit(self, p: GenParams) -> tuple[GenParams, list[dict] | None]:
        if p.context_edits is None or p.messages is None:
            return p, None
        messages, applied = await context_edits.apply(p.context_edits, p.messages, lambda m: self.count(p, m))
        return dataclasses.replace(p, messages=messages), applied

    async def count_tokens(self, request: Request) -> Response:
        """POST /v1/messages/count_tokens: the Messages body (max_tokens not needed), counted by
        the model's worker through its tokenizer and chat template, without generating."""
        try:
            p = anthropic.parse_count(await body.json_body(request, self.config.body_timeout_s), self.signer)
            auth.check_model(request, p.model)
            edited, applied = await self._edit(p)
            assert edited.messages is not None
            out: dict[str, Any] = {"input_tokens": await self.count(edited, edited.messages)}
            if applied is not None:
                out["context_management"] = {"original_input_tokens": await self.count(p, p.messages or [])}
        except E.LmxError as exc:
            return self.anthropic.error_response(exc, {})
        return JSONResponse(out)


class _Counted:
    """A response that gives its in-flight slot back when it has been sent (or abandoned), and
    leaves its usage where the auth middleware charges it to the caller's key."""

    def __init__(self, gw: Gateway, request: Request, stream: GenerateStream, response: GenerationResponse) -> None:
        self._gw, self._request, self._stream, self._response = gw, request, stream, response

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self._response(scope, receive, send)
        finally:
            self._gw.in_flight -= 1
            if self._stream.result is not None:
                auth.charge(self._request, self._stream.result.usage)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    err = {"message": exc.detail, "type": http_errors.error_type(exc.status_code), "code": None, "param": None}
    return JSONResponse({"error": err}, status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("gateway.internal_error", path=request.url.path, error=repr(exc), exc_info=exc)
    return http_errors.response(E.InternalError(f"internal error in the gateway: {exc!r}"))


def _middleware(config: GatewayConfig, gw: Gateway) -> list[Middleware]:
    # CORS outside auth: a browser's preflight carries no key.
    cors = [Middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST", "DELETE"],
                       allow_headers=["*"], expose_headers=["x-request-id", "request-id", "retry-after"],
                       max_age=600)] if config.cors_origins else []  # off by default
    # CloseUnread outermost: a refusal by CORS or auth before the body was read closes too.
    return [Middleware(body.CloseUnread), *cors, Middleware(auth.AuthMiddleware, guard=gw.guard)]


def create_app(config: GatewayConfig | None = None) -> Starlette:
    config = config or GatewayConfig()
    gw = Gateway(config)
    routes = [
        Route("/healthz", gw.healthz, methods=["GET"]),
        Route("/readyz", gw.readyz, methods=["GET"]),
        Route("/v1/models", gw.models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", gw.model, methods=["GET"]),
        Route("/v1/chat/completions", gw.chat_completions, methods=["POST"]),
        Route("/v1/completions", gw.completions, methods=["POST"]),
        Route("/v1/messages", gw.messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", gw.count_tokens, methods=["POST"]),
        Route("/metrics", gw.metrics_text, methods=["GET"]),
        *ResponsesAPI(gw).routes(),
        *EmbeddingsAPI(gw).routes(),
        *RerankAPI(gw).routes(),
    ]
    app = Starlette(routes=routes, lifespan=gw.lifespan, middleware=_middleware(config, gw),
                    exception_handlers={HTTPException: _http_error, Exception: _internal_error})
    app.state.gateway = gw
    return app
