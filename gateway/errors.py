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


def body(exc: E.LmxError) -> dict[str, Any]:
    """{"error": {message, type, code, param}} plus `retryable` and the code's details (signal,
    failure summary, retry_after_s...), which OpenAI clients ignore and our callers can use."""
    details = dict(exc.details)
    param = details.pop("param", None)
    return {"error": {"message": exc.message, "type": error_type(exc.http_status), "code": exc.code.code,
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
