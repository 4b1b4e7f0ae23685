"""`POST /v1/embeddings` in OpenAI's shape, over SupervisorClient.embed: the body read and checked
here, the vectors as float lists or as base64 of their little-endian float32 bytes (what the
openai SDKs ask for by default and decode), usage charged to the caller's key like a generation's."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import auth, body, fields
from gateway import errors as http_errors
from protocol import embed as wire
from protocol import errors as E
from protocol import limits

FORMATS = ("float", "base64")
MAX_DIMS = limits.MAX_EMBED_DIMS  # the wire's bound, named here so its 400 names the field


@dataclass(frozen=True)
class EmbedCall:
    model: str
    inputs: list[str] | list[list[int]]
    encoding_format: str
    dimensions: int | None


def _tokens(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def _inputs(v: Any) -> list[str] | list[list[int]]:
    """OpenAI's four forms: a string, a list of strings, one token array, a list of token arrays.
    Their bounds (count, length, total) are protocol.limits', checked by the client before the wire."""
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v:
        if all(isinstance(s, str) for s in v):
            return list(v)
        if _tokens(v):
            return [list(v)]
        if all(_tokens(a) for a in v):
            return [list(a) for a in v]
    raise E.BadRequest("input: a string, a non-empty list of strings, a token array (integers) or a non-empty "
                       "list of token arrays", param="input")


def parse(value: Any) -> EmbedCall:
    value, model = fields.checked_body(value, fields.check_embeddings)
    if "input" not in value:
        raise E.BadRequest("input: required", param="input")
    fmt = value.get("encoding_format") or "float"
    if fmt not in FORMATS:
        raise E.BadRequest(f"encoding_format: one of {', '.join(FORMATS)}", param="encoding_format")
    dims = value.get("dimensions")
    if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= MAX_DIMS):
        raise E.BadRequest(f"dimensions: a positive integer, at most {MAX_DIMS}", param="dimensions")
    return EmbedCall(model, _inputs(value["input"]), fmt, dims)


def _vector(row: list[float], fmt: str) -> list[float] | str:
    return row if fmt == "float" else base64.b64encode(wire.pack([row])).decode("ascii")


def reply(call: EmbedCall, vectors: list[list[float]], prompt_tokens: int) -> dict[str, Any]:
    data = [{"object": "embedding", "index": i, "embedding": _vector(row, call.encoding_format)}
            for i, row in enumerate(vectors)]
    return {"object": "list", "data": data, "model": call.model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


class EmbeddingsAPI:
    def __init__(self, gw: Any) -> None:
        self.gw = gw  # gateway.app.Gateway: its client, config and in-flight count

    def routes(self) -> list[Route]:
        return [Route("/v1/embeddings", self.create, methods=["POST"])]

    async def create(self, request: Request) -> Response:
        gw = self.gw
        try:
            with gw.slot():
                call = parse(await body.json_body(request, gw.config.body_timeout_s))
                auth.check_model(request, call.model)
                result = await gw.client.embed(call.model, call.inputs, dimensions=call.dimensions,
                                               timeout_s=min(gw.config.request_timeout_s, 120.0))
        except E.LmxError as exc:
            if exc.details.get("param") == "inputs":  # the wire's name for the bounds; OpenAI's is input
                exc.details["param"] = "input"
            return http_errors.response(exc)
        auth.charge(request, {"prompt_tokens": result.prompt_tokens, "completion_tokens": 0})
        return JSONResponse(reply(call, result.vectors, result.prompt_tokens))
