"""The Responses API's routes: create (plain or streamed, through gateway.app's one respond() path
with a ResponsesDialect), retrieve, delete, input items, and input_tokens, over the responses
store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import auth, body, responses
from gateway import errors as http_errors
from gateway.params import GenParams
from gateway.responses_shapes import Framing, ResponseShaper
from gateway.responses_store import ChainBroken, ResponseStore
from protocol import endpoint as ep
from protocol import errors as E

STORE_FILE = Path("gateway") / "responses.sqlite"


class NotFound(E.BadRequest):
    """A response id that is not stored: OpenAI's 404, in its error shape (an LmxError, so it takes
    the one path every refusal takes; ResponsesDialect renders it)."""

    def __init__(self, message: str, param: str | None, code: str) -> None:
        super().__init__(message, param=param)
        self.body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=404, headers={"x-should-retry": "false"})


def _not_found(response_id: str) -> NotFound:
    return NotFound(f"No response with id {response_id[:128]!r} is stored here (never stored, deleted, made with "
                    f"another API key, or past the store's bounds)", None, "response_not_found")


def _owner(request: Request) -> str | None:
    """Stored responses are the key's that made them (None: no keys)."""
    key = getattr(request.state, "api_key", None)
    return None if key is None else key.key_id


class ResponsesDialect:
    """The Responses API as gateway.app's one respond() path takes a dialect. One per request: it
    numbers its events, and its parse reads the conversation previous_response_id names."""

    done: bytes | None = None  # response.completed is the end

    def __init__(self, store: ResponseStore, owner: str | None) -> None:
        self._store, self._owner = store, owner
        self._req: responses.ResponsesRequest | None = None
        self._shaper: ResponseShaper | None = None
        self._framing = Framing()

    def history(self, previous: str | None) -> list[dict]:
        if previous is None:
            return []
        try:
            items = self._store.conversation(previous, self._owner)
        except ChainBroken as gone:
            raise NotFound(f"Previous response {previous[:128]!r} continues {gone.args[0][:128]!r}, which is no "
                           f"longer stored (pruned or deleted)", "previous_response_id",
                           "previous_response_not_found") from None
        if items is None:
            raise NotFound(f"Previous response with id {previous[:128]!r} not found.", "previous_response_id",
                           "previous_response_not_found")
        return items

    def parse(self, body: Any) -> GenParams:
        self._req = responses.parse(body)
        return self._req.params(self.history(self._req.previous_response_id))

    def shaper(self, p: GenParams, request_id: str, applied_edits: list[dict] | None) -> ResponseShaper:
        req = self._req
        assert req is not None

        async def save(final: dict) -> None:
            await self._store.put(final, req.items, self._owner)

        self._shaper = ResponseShaper(req, request_id, save if req.store else None)
        return self._shaper

    def id_headers(self, request_id: str) -> dict[str, str]:
        return {"x-request-id": request_id}

    def frame(self, obj: dict) -> bytes:
        return self._framing.frame(obj)

    def error_event(self, err: E.LmxError) -> bytes:
        return self._framing.error(err, self._shaper)

    def error_response(self, err: E.LmxError, headers: dict[str, str]) -> Any:
        if isinstance(err, NotFound):
            return err.response()
        return http_errors.response(err, headers)


class ResponsesAPI:
    def __init__(self, gw: Any) -> None:
        self.gw = gw  # gateway.app.Gateway: its respond() path, config and token counting
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

    async def create(self, request: Request) -> Any:
        return await self.gw.respond(request, ResponsesDialect(self.store, _owner(request)))

    async def input_tokens(self, request: Request) -> Response:
        """What the same create's prompt would count, through the model's tokenizer and template."""
        dialect = ResponsesDialect(self.store, _owner(request))
        try:
            req = responses.parse_count(await body.json_body(request, self.gw.config.body_timeout_s))
            auth.check_model(request, req.model)  # the scoping rule respond() applies, the one copy of it
            p = req.params(dialect.history(req.previous_response_id))
            assert p.messages is not None
            count = await self.gw.count(p, p.messages)
        except E.LmxError as exc:
            return dialect.error_response(exc, {})
        return JSONResponse({"object": "response.input_tokens", "input_tokens": count})

    def _stored(self, request: Request) -> tuple[dict, list[dict]]:
        response_id = request.path_params["response_id"]
        found = self.store.get(response_id, _owner(request))
        if found is None:
            raise _not_found(response_id)
        return found

    async def retrieve(self, request: Request) -> Response:
        if request.query_params.get("stream") in ("true", "1"):
            return http_errors.response(E.BadRequest("stream: only background responses can be streamed again, and "
                                                     "there are none here", param="stream"))
        try:
            response, _ = self._stored(request)
        except NotFound as nf:
            return nf.response()
        return JSONResponse(response)

    async def items(self, request: Request) -> Response:
        try:
            _, items = self._stored(request)
        except NotFound as nf:
            return nf.response()
        data = [{"id": item.get("id") or f"item_{i}", **item} for i, item in enumerate(items)]
        if request.query_params.get("order", "desc") == "desc":
            data.reverse()
        return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None, "has_more": False})

    async def delete(self, request: Request) -> Response:
        response_id = request.path_params["response_id"]
        if not await self.store.delete(response_id, _owner(request)):
            return _not_found(response_id).response()
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})
