"""`POST /v1/rerank` (and `/rerank`) in the Jina/Cohere shape that vllm, llama.cpp's server and
LocalAI serve, over SupervisorClient.rerank: the body read and checked here, the documents sorted
by their score, `relevance_score` the sigmoid of the model's raw logit (0..1, as Jina's and Cohere's;
the order is the logit's), usage charged to the caller's key like an embedding's."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import auth, body, fields
from gateway import errors as http_errors
from protocol import errors as E
from protocol.rerank import RerankResult

PATHS = ("/v1/rerank", "/rerank")


@dataclass(frozen=True)
class RerankCall:
    model: str
    query: str
    documents: list[str]
    top_n: int | None
    return_documents: bool


def _text(doc: Any, i: int) -> str:
    """A document: a string, or an object with a string `text` (Jina's and Cohere's other form)."""
    if isinstance(doc, str):
        return doc
    if isinstance(doc, dict) and isinstance(doc.get("text"), str):
        return doc["text"]
    raise E.BadRequest(f"documents[{i}]: a string or an object with a string \"text\"", param="documents")


def parse(value: Any) -> RerankCall:
    """The call a body asks for; its bounds (counts, lengths) are protocol.rerank's, checked by the
    client before the wire."""
    value, model = fields.checked_body(value, fields.check_rerank)
    query = value.get("query")
    if not isinstance(query, str) or not query:
        raise E.BadRequest("query: a non-empty string is required", param="query")
    docs = value.get("documents")
    if not isinstance(docs, list) or not docs:
        raise E.BadRequest("documents: a non-empty list of strings or {\"text\": ...} objects is required",
                           param="documents")
    top_n = value.get("top_n")
    if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1):
        raise E.BadRequest("top_n: a positive integer (or null for every document)", param="top_n")
    back = value.get("return_documents", False)
    if back is not None and not isinstance(back, bool):
        raise E.BadRequest("return_documents: a boolean", param="return_documents")
    return RerankCall(model, query, [_text(d, i) for i, d in enumerate(docs)], top_n, bool(back))


def relevance(logit: float) -> float:
    """The logit as a 0..1 relevance: its sigmoid, written to stay finite at any magnitude."""
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    z = math.exp(logit)
    return z / (1.0 + z)


def reply(call: RerankCall, result: RerankResult) -> dict[str, Any]:
    """Every document (or the top_n), best first: by logit, ties by their place in the request."""
    if not result.finite():
        raise E.InternalError(f"model {call.model!r} gave a non-finite score (NaN or infinity): it is broken "
                              "or not a reranker")
    order = sorted(range(len(result.scores)), key=lambda i: (-result.scores[i], i))
    results = []
    for i in order[:call.top_n]:
        item: dict[str, Any] = {"index": i, "relevance_score": relevance(result.scores[i])}
        if call.return_documents:
            item["document"] = {"text": call.documents[i]}
        results.append(item)
    # truncated: the documents (their indices in the request) whose pair with the query was cut to
    # the model's position limit, so scored on their head alone; this server's addition to the shape.
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": call.model, "results": results,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
            "truncated": sorted(result.truncated)}


class RerankAPI:
    def __init__(self, gw: Any) -> None:
        self.gw = gw  # gateway.app.Gateway: its client, config and in-flight count

    def routes(self) -> list[Route]:
        return [Route(path, self.create, methods=["POST"]) for path in PATHS]

    async def create(self, request: Request) -> Response:
        gw = self.gw
        try:
            with gw.slot():
                call = parse(await body.json_body(request, gw.config.body_timeout_s))
                auth.check_model(request, call.model)
                result = await gw.client.rerank(call.model, call.query, call.documents,
                                                timeout_s=min(gw.config.request_timeout_s, 120.0))
                out = reply(call, result)
        except E.LmxError as exc:
            return http_errors.response(exc)
        auth.charge(request, {"prompt_tokens": result.prompt_tokens, "completion_tokens": 0})
        return JSONResponse(out)
