"""A dialect is one HTTP API over generations: OpenAI's chat and completions, Anthropic's Messages,
OpenAI's Responses. Each reads its body into the wire's request (GenParams), shapes whole answers
and streamed events, frames them, and shapes its errors; gateway/app.py's one `respond()` path
does the rest (body, context edits, the generation, the HTTP response), so a fix to streaming or a
new field is written once for all three."""

from __future__ import annotations

from typing import Any, AsyncGenerator, Callable, Protocol

from gateway import errors as http_errors
from gateway import params
from gateway.shapes import Shaper
from gateway.sse import DONE, event
from protocol import errors as E
from protocol.client import GenerateStream


class Shaping(Protocol):
    """The objects of one response."""

    def whole(self, stream: GenerateStream) -> AsyncGenerator[dict, None]: ...

    def events(self, stream: GenerateStream) -> AsyncGenerator[dict, None]: ...


class Dialect(Protocol):
    done: bytes | None  # what ends a complete stream, after the last event (None: the last event does)

    def parse(self, body: Any) -> params.GenParams: ...

    def shaper(self, p: params.GenParams, request_id: str, applied_edits: list[dict] | None) -> Shaping: ...

    def id_headers(self, request_id: str) -> dict[str, str]: ...

    def frame(self, obj: dict) -> bytes: ...

    def error_event(self, err: E.LmxError) -> bytes: ...

    def error_response(self, err: E.LmxError, headers: dict[str, str]) -> Any: ...


class OpenAIDialect:
    """`data:` events, `[DONE]` at the end, errors as {"error": {...}}: chat or completions."""

    done: bytes | None = DONE

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self._parse: Callable[[Any], params.GenParams] = params.chat if chat else params.completion

    def parse(self, body: Any) -> params.GenParams:
        return self._parse(body)

    def shaper(self, p: params.GenParams, request_id: str, applied_edits: list[dict] | None) -> Shaping:
        return Shaper(self.chat, p.model, request_id, include_usage=p.include_usage)

    def id_headers(self, request_id: str) -> dict[str, str]:
        return {"x-request-id": request_id}

    def frame(self, obj: dict) -> bytes:
        return event(obj)

    def error_event(self, err: E.LmxError) -> bytes:
        return event(http_errors.body(err))

    def error_response(self, err: E.LmxError, headers: dict[str, str]) -> Any:
        return http_errors.response(err, headers)


CHAT = OpenAIDialect(chat=True)
COMPLETIONS = OpenAIDialect(chat=False)
