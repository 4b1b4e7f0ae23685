"""Supervisor error codes as HTTP: status from protocol.errors' table, an OpenAI-shaped body, retry hints."""

from __future__ import annotations

import math
from typing import Any

from starlette.responses import JSONResponse

from protocol import errors as E

# OpenAI's error `type` is a coarse class; the precise, stable one is `code` (the LMX code).
_TYPES = {401: "authentication_error", 429: "rate_limit_error", 499: "cancelled"}


def error_type(status: int) -> str:
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def context_exceeded(exc: E.LmxError) -> tuple[int, int] | None:
    """(prompt tokens, the model's context) when `exc` refused a prompt past the context."""
    d = exc.details
    if d.get("reason") != "context_length_exceeded":
        return None
    n, m = d.get("prompt_tokens"), d.get("context_tokens")
    return (n, m) if isinstance(n, int) and isinstance(m, int) else None


def body(exc: E.LmxError) -> dict[str, Any]:
    """{"error": {message, type, code, param}} plus `retryable` and the code's details (signal,
    failure summary, retry_after_s...), which OpenAI clients ignore and our callers can use.
    `code` is the LMX code, but for a prompt past the context: OpenAI's `context_length_exceeded`
    (and its wording), which litellm and LangChain map to their context-window errors."""
    details = dict(exc.details)
    param = details.pop("param", None)
    code, message = exc.code.code, exc.message
    if (over := context_exceeded(exc)) is not None:
        code = "context_length_exceeded"
        message = (f"This model's maximum context length is {over[1]} tokens. However, your messages "
                   f"resulted in {over[0]} tokens. Please reduce the length of the messages.")
    return {"error": {"message": message, "type": error_type(exc.http_status), "code": code,
                      "param": param if isinstance(param, str) else None, "retryable": exc.retryable,
                      "details": details}}


def headers(exc: E.LmxError) -> dict[str, str]:
    # x-should-retry is what the openai SDKs obey before their own status rules: without it they
    # would retry a quarantined model's 503 twice for nothing.
    out = {"x-should-retry": "true" if exc.retryable else "false"}
    after = exc.retry_after_s
    if isinstance(after, (int, float)) and math.isfinite(after) and after >= 0:
        out["retry-after"] = str(max(1, math.ceil(after)))  # delta-seconds: an integer
        out["retry-after-ms"] = str(round(after * 1000))
    return out


def response(exc: E.LmxError, extra_headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body(exc), status_code=exc.http_status, headers={**headers(exc), **(extra_headers or {})})
