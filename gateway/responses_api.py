"""The Responses API's routes: create (plain or streamed), retrieve, delete, input items, and
input_tokens, over the gateway's one SupervisorClient and the responses store."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import body, responses
from gateway import errors as http_errors
from gateway.responses_shapes import ResponseShaper, ResponsesDialect
from gateway.responses_store import ChainBroken, ResponseStore
from gateway.sse import GenerationResponse
from protocol import endpoint as ep
from protocol import errors as E

log = structlog.get_logger("lmx.gateway")

STORE_FILE = Path("gateway") / "responses.sqlite"


class NotFound(Exception):
    """A response id that is not stored: OpenAI's 404, in its error shape."""

    def __init__(self, message: str, param: str | None, code: str) -> None:
        super().__init__(message)
        self.body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=404, headers={"x-should-retry": "false"})


def _not_found(response_id: str) -> NotFound:
    return NotFound(f"No response with id {response_id[:128]!r} is stored here (never stored, deleted, or past "
                    f"the store's bounds)", None, "response_not_found")


class ResponsesAPI:
    def __init__(self, gw: Any) -> None:
        self.gw = gw  # gateway.app.Gateway: its SupervisorClient, config and token counting
        config = gw.config
        path = ep.resolve_state_dir(config.state_dir) / STORE_FILE
        self.store = ResponseStore(path, config.responses_max_count, config.responses_max_age_s)

    def routes(self) -> list[Route]:
        return [
            Route("/v1/responses", self.create, methods=["POST"]),
            Route("/v1/responses/input_tokens", self.input_tokens, methods=["POST"]),
            Route("/v1/responses/{response_id}", self.retrieve, methods=["GET"]),
            Route("/v1/responses/{response_id}", self.delete, methods=["DELETE"]),
            Route("/v1/responses/{response_id}/input_items", self.items, methods=["GET"]),
        ]

    async def _history(self, previous: str | None) -> list[dict]:
        if previous is None:
            return []
        try:
            items = await self.store.conversation(previous)
        except ChainBroken as gone:
            raise NotFound(f"Previous response {previous[:128]!r} continues {gone.args[0][:128]!r}, which is no "
                           f"longer stored (pruned or deleted)", "previous_response_id",
                           "previous_response_not_found") from None
        if items is None:
            raise NotFound(f"Previous response with id {previous[:128]!r} not found.", "previous_response_id",
                           "previous_response_not_found")
        return items

    async def create(self, request: Request) -> Any:
        try:
            req = responses.parse(await body.json_body(request))
            p = req.params(await self._history(req.previous_response_id))
        except E.LmxError as exc:
            return http_errors.response(exc)
        except NotFound as nf:
            return nf.response()
        stream = self.gw.client.generate(p.model, **p.client_kwargs())
        shaper = ResponseShaper(req, stream.request_id)

        async def save(final: dict) -> None:
            await self.store.put(final, req.items)

        saver = save if req.store else None
        events = shaper.events(stream, saver) if req.stream else shaper.whole(stream, saver)
        return GenerationResponse(events, streaming=req.stream, request_id=stream.request_id,
                                  dialect=ResponsesDialect(shaper))

    async def input_tokens(self, request: Request) -> Response:
        """What the same create's prompt would count, through the model's tokenizer and template."""
        try:
            req = responses.parse_count(await body.json_body(request))
            p = req.params(await self._history(req.previous_response_id))
            assert p.messages is not None
            count = await self.gw.count(p, p.messages)
        except E.LmxError as exc:
            return http_errors.response(exc)
        except NotFound as nf:
            return nf.response()
        return JSONResponse({"object": "response.input_tokens", "input_tokens": count})

    async def _stored(self, request: Request) -> tuple[dict, list[dict]]:
        response_id = request.path_params["response_id"]
        found = await self.store.get(response_id)
        if found is None:
            raise _not_found(response_id)
        return found

    async def retrieve(self, request: Request) -> Response:
        if request.query_params.get("stream") in ("true", "1"):
            return http_errors.response(E.BadRequest("stream: only background responses can be streamed again, and "
                                                     "there are none here", param="stream"))
        try:
            response, _ = await self._stored(request)
        except NotFound as nf:
            return nf.response()
        return JSONResponse(response)

    async def items(self, request: Request) -> Response:
        try:
            _, items = await self._stored(request)
        except NotFound as nf:
            return nf.response()
        data = [{"id": item.get("id") or f"item_{i}", **item} for i, item in enumerate(items)]
        if request.query_params.get("order", "desc") == "desc":
            data.reverse()
        return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None, "has_more": False})

    async def delete(self, request: Request) -> Response:
        response_id = request.path_params["response_id"]
        if not await self.store.delete(response_id):
            return _not_found(response_id).response()
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    async def close(self) -> None:
        await asyncio.to_thread(self.store.close)
