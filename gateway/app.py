"""The Starlette app: routes, the one SupervisorClient they share, and OpenAI requests turned into
generations. Everything about the supervisor goes through protocol.client."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any, AsyncGenerator, AsyncIterator, Callable

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import errors as http_errors
from gateway import anthropic, params, readiness
from gateway.anthropic_shapes import ANTHROPIC, MessageShaper
from gateway.shapes import Shaper
from gateway.sse import GenerationResponse
from protocol import errors as E
from protocol.client import GenerateStream, SupervisorClient
from protocol.states import ModelState

log = structlog.get_logger("lmx.gateway")


@dataclass(frozen=True)
class GatewayConfig:
    endpoint: str | None = None          # else the control socket in state_dir
    state_dir: str | None = None         # else LMX_STATE_DIR, else the platform default
    request_timeout_s: float = 300.0     # each generation's deadline, carried to the supervisor
    status_timeout_s: float = 5.0        # /v1/models and /readyz
    required_models: tuple[str, ...] = ()  # /readyz: exactly these must be READY (default: status' view)


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.client = SupervisorClient(config.endpoint, state_dir=config.state_dir,
                                       timeout_s=config.request_timeout_s)

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

    async def models(self, request: Request) -> Response:
        try:
            status = await self.client.status(timeout_s=self.config.status_timeout_s)
        except E.LmxError as exc:
            return http_errors.response(exc)
        now = time.time()
        data = [{"id": m["id"], "object": "model",
                 "created": int(now - (m.get("ready_for_s") or 0.0)),  # when it became routable
                 "owned_by": "lmx-supervisor", "state": m["state"], "revision": m["revision"]}
                for m in status["models"] if m["state"] == ModelState.READY.value]
        return JSONResponse({"object": "list", "data": data})

    # --- generations -------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Any:
        return await self._generate(request, params.chat, chat=True)

    async def completions(self, request: Request) -> Any:
        return await self._generate(request, params.completion, chat=False)

    async def messages(self, request: Request) -> Any:
        """Anthropic's Messages API: its own request and response shapes and error bodies, over the
        same generations."""
        try:
            p = anthropic.parse(await _json_body(request))
        except E.LmxError as exc:
            return ANTHROPIC.error_response(exc, {})
        stream = self.client.generate(p.model, **p.client_kwargs())
        shaper = MessageShaper(p.model, stream.request_id)
        events = shaper.events(stream) if p.stream else shaper.whole(stream)
        return GenerationResponse(events, streaming=p.stream, request_id=stream.request_id, dialect=ANTHROPIC)

    async def _generate(self, request: Request, parse: Callable[[Any], params.GenParams], chat: bool) -> Any:
        try:
            p = parse(await _json_body(request))
        except E.LmxError as exc:
            return http_errors.response(exc)
        stream = self.client.generate(p.model, **p.client_kwargs())
        shaper = Shaper(chat, p.model, stream.request_id)
        events = _stream_events(stream, shaper, p) if p.stream else _full(stream, shaper)
        return GenerationResponse(events, streaming=p.stream, request_id=stream.request_id)


# The largest body whose fields can pass the wire's bounds: MAX_PROMPT_CHARS characters, each up to
# 12 bytes as a JSON escape (a surrogate pair), plus the rest. Past it the body is not even read.
MAX_BODY_BYTES = 32 * 1024 * 1024


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise E.BadRequest(f"the request body has {declared} bytes, more than {MAX_BODY_BYTES}")
    parts, size = [], 0
    async for part in request.stream():  # chunked bodies declare no length: count as they come
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise E.BadRequest(f"the request body has more than {MAX_BODY_BYTES} bytes")
        parts.append(part)
    return b"".join(parts)


async def _json_body(request: Request) -> Any:
    raw = await _read_body(request)
    try:
        return json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise E.BadRequest(f"the request body is not valid JSON: {exc}") from None


async def _full(stream: GenerateStream, shaper: Shaper) -> AsyncGenerator[dict, None]:
    async with stream:
        result = await stream.collect()
    yield shaper.full(result)


async def _stream_events(stream: GenerateStream, shaper: Shaper, p: params.GenParams) -> AsyncGenerator[dict, None]:
    # Leaving this generator any way (end, error, GeneratorExit, cancellation on disconnect)
    # goes through `async with stream`, which cancels the request if it still runs.
    async with stream:
        opened = False
        async for chunk in stream:
            if not opened:
                opened = True
                if (first := shaper.opening()) is not None:
                    yield first
            for obj in shaper.deltas(chunk):  # text, thinking, tool calls, logprobs
                yield obj
        result = stream.result
        assert result is not None
    if not opened and (first := shaper.opening()) is not None:
        yield first
    yield shaper.closing(result.finish_reason)
    if p.include_usage:
        yield shaper.usage_chunk(result.usage)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    err = {"message": exc.detail, "type": http_errors.error_type(exc.status_code), "code": None, "param": None}
    return JSONResponse({"error": err}, status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("gateway.internal_error", path=request.url.path, error=repr(exc), exc_info=exc)
    return http_errors.response(E.InternalError(f"internal error in the gateway: {exc!r}"))


def create_app(config: GatewayConfig | None = None) -> Starlette:
    gw = Gateway(config or GatewayConfig())
    routes = [
        Route("/healthz", gw.healthz, methods=["GET"]),
        Route("/readyz", gw.readyz, methods=["GET"]),
        Route("/v1/models", gw.models, methods=["GET"]),
        Route("/v1/chat/completions", gw.chat_completions, methods=["POST"]),
        Route("/v1/completions", gw.completions, methods=["POST"]),
        Route("/v1/messages", gw.messages, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=gw.lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _internal_error})
    app.state.gateway = gw
    return app
