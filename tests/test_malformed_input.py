"""Malformed input is the client's 400, never a 500 with a traceback: JSON nested past the gateway's
bound (or past the interpreter's recursion limit), and lone surrogates in any string, on every
generation endpoint of a real `lmx-gateway` process, in each endpoint's own error shape; and on the
client library's path (the msgpack codec), where a message that cannot be encoded is the caller's
BAD_REQUEST and a frame that cannot be decoded is refused with the connection alive."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgpack
import pytest
import zmq
import zmq.asyncio

from protocol import codec, errors as E, limits
from protocol.client import SupervisorClient
from protocol.messages import TO_CLIENT, Error, StatusReply, StatusRequest
from tests.test_gateway import supervised_gateway

pytestmark = pytest.mark.timeout(180)

SURROGATE = "\\ud800"  # as JSON writes it: the escape of a lone (unpaired) surrogate
HELLO = [{"role": "user", "content": "Hello"}]
ANTHROPIC = {"anthropic-version": "2023-06-01", "x-api-key": "unused"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    root = tmp_path_factory.mktemp("malformed")
    yield from supervised_gateway(root, [{"id": "tiny", "path": str(tiny_model)}])


def _json(value: object) -> str:
    """JSON text with the placeholder @S@ replaced by the lone surrogate's escape."""
    return json.dumps(value).replace("@S@", SURROGATE)


def _tool(openai_shape: bool, description: str = "d", schema: dict | None = None) -> dict:
    schema = schema or {"type": "object", "properties": {"q": {"type": "string", "description": description}}}
    if openai_shape:
        return {"type": "function", "function": {"name": "search", "parameters": schema}}
    return {"name": "search", "description": "d", "input_schema": schema}


def _nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


# (name, endpoint, body text): every body here is malformed and must be a 400.
CHAT, COMPLETIONS, MESSAGES, COUNT = ("/v1/chat/completions", "/v1/completions", "/v1/messages",
                                      "/v1/messages/count_tokens")
RESPONSES, INPUT_TOKENS = "/v1/responses", "/v1/responses/input_tokens"
FLAT_TOOL = {"type": "function", "name": "search", "parameters": {"type": "object", "description": "x@S@"}}
DEEP = "[" * 100_000 + "]" * 100_000
CASES = [
    *[(f"deep-{e}", e, DEEP) for e in (CHAT, COMPLETIONS, MESSAGES, COUNT, RESPONSES, INPUT_TOKENS)],
    *[(f"deep-object-{e}", e, '{"model": "tiny", "x": ' + '{"a": ' * 2000 + "1" + "}" * 2000 + "}")
      for e in (CHAT, MESSAGES)],
    ("model-chat", CHAT, _json({"model": "@S@", "messages": HELLO})),
    ("model-completions", COMPLETIONS, _json({"model": "@S@", "prompt": "Hi"})),
    ("model-messages", MESSAGES, _json({"model": "@S@", "max_tokens": 4, "messages": HELLO})),
    ("model-count", COUNT, _json({"model": "@S@", "messages": HELLO})),
    ("model-responses", RESPONSES, _json({"model": "@S@", "input": "Hi"})),
    ("input-responses", RESPONSES, _json({"model": "tiny", "input": [{"role": "user", "content": "a@S@"}]})),
    ("tool-responses", RESPONSES, _json({"model": "tiny", "input": "Hi", "tools": [FLAT_TOOL]})),
    ("input-tokens", INPUT_TOKENS, _json({"model": "tiny", "input": "@S@"})),
    ("content-chat", CHAT, _json({"model": "tiny", "messages": [{"role": "user", "content": "a@S@b"}]})),
    ("prompt-completions", COMPLETIONS, _json({"model": "tiny", "prompt": "a@S@b", "max_tokens": 2})),
    ("content-messages", MESSAGES, _json({"model": "tiny", "max_tokens": 4,
                                          "messages": [{"role": "user", "content": [{"type": "text", "text": "@S@"}]}]})),
    ("tool-chat", CHAT, _json({"model": "tiny", "messages": HELLO, "tools": [_tool(True, "x@S@")]})),
    ("tool-messages", MESSAGES, _json({"model": "tiny", "max_tokens": 4, "messages": HELLO,
                                       "tools": [_tool(False, "x@S@")]})),
    ("tool-count", COUNT, _json({"model": "tiny", "messages": HELLO, "tools": [_tool(False, "x@S@")]})),
    ("key-chat", CHAT, _json({"model": "tiny", "messages": HELLO, "tools": [
        _tool(True, schema={"type": "object", "properties": {"@S@": {"type": "string"}}})]})),
    ("deep-tool-chat", CHAT, _json({"model": "tiny", "messages": HELLO, "tools": [_tool(True, schema=_nested(40))]})),
    ("deep-tool-messages", MESSAGES, _json({"model": "tiny", "max_tokens": 4, "messages": HELLO,
                                            "tools": [_tool(False, schema=_nested(40))]})),
    ("stop-chat", CHAT, _json({"model": "tiny", "messages": HELLO, "stop": ["@S@"]})),
    ("stop-completions", COMPLETIONS, _json({"model": "tiny", "prompt": "Hi", "stop": "x@S@"})),
    ("stop-messages", MESSAGES, _json({"model": "tiny", "max_tokens": 4, "messages": HELLO,
                                       "stop_sequences": ["@S@"]})),
    # UTF-8's bytes for U+D800 (CESU-8), not an escape: json decodes them to the same lone surrogate.
    ("raw-surrogate-chat", CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}'),
    ("stream-chat", CHAT, _json({"model": "tiny", "messages": [{"role": "user", "content": "@S@"}], "stream": True})),
    ("stream-messages", MESSAGES, _json({"model": "tiny", "max_tokens": 4, "stream": True,
                                         "messages": [{"role": "user", "content": "@S@"}]})),
]


def _assert_dialect_400(endpoint: str, resp) -> str:
    assert resp.status_code == 400, f"{resp.status_code}: {resp.text[:500]}"
    body = resp.json()
    if endpoint in (MESSAGES, COUNT):  # Anthropic's shape
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
    else:  # OpenAI's
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "BAD_REQUEST", body
    return body["error"]["message"]


@pytest.mark.parametrize("name, endpoint, text", CASES, ids=[c[0] for c in CASES])
def test_a_malformed_body_is_a_400_in_the_endpoints_shape(gw, name: str, endpoint: str, text: str | bytes) -> None:
    sup, gateway = gw
    headers = {"content-type": "application/json", **(ANTHROPIC if endpoint in (MESSAGES, COUNT) else {})}
    raw = text if isinstance(text, bytes) else text.encode()
    message = _assert_dialect_400(endpoint, gateway.http.post(endpoint, content=raw, headers=headers))
    if "surrogate" in name or (isinstance(text, str) and SURROGATE in text):
        assert "surrogate" in message, message
    if name.startswith("deep"):
        assert "nests deeper" in message, message
    # The gateway is alive and serves a good request right after.
    assert gateway.proc.poll() is None
    good = gateway.http.post(CHAT, json={"model": "tiny", "messages": HELLO, "max_tokens": 2})
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] is not None


def test_malformed_bodies_are_logged_rate_limited_at_warning_never_as_a_traceback(gw) -> None:
    sup, gateway = gw
    for _ in range(5):
        gateway.http.post(CHAT, content=DEEP.encode(), headers={"content-type": "application/json"})
        gateway.http.post(CHAT, content=_json({"model": "@S@", "messages": HELLO}).encode(),
                          headers={"content-type": "application/json"})
    lines = gateway.events("gateway.malformed_body")
    by_reason = {r: [ln for ln in lines if ln["reason"] == r] for r in ("too_deep", "lone_surrogate")}
    for reason, logged in by_reason.items():
        # Once per reason and period (the module's earlier tests included), each with the count so far.
        assert len(logged) == 1 and logged[0]["level"] == "warning" and logged[0]["count"] >= 1, (reason, logged)
    assert not gateway.events("gateway.internal_error")
    assert "Traceback" not in gateway.stderr_path.read_text()
    assert gateway.proc.poll() is None


def test_the_client_library_refuses_what_it_cannot_encode_as_bad_request_and_stays_usable(gw) -> None:
    sup, _ = gw

    async def run() -> None:
        client = SupervisorClient(state_dir=sup.state_dir, timeout_s=30.0)
        try:
            for kwargs in ({"prompt": "a\ud800b"}, {"messages": [{"role": "user", "content": "\udfff"}]},
                           {"prompt": "Hi", "stop": ["\ud800"]}):
                with pytest.raises(E.BadRequest, match="surrogate"):
                    await client.complete("tiny", max_tokens=2, **kwargs)
            with pytest.raises(E.BadRequest, match="nests deeper"):
                await client.complete("tiny", "Hi", max_tokens=2, tools=[_tool(True, schema=_nested(40))])
            with pytest.raises(E.BadRequest, match="surrogate"):
                await client.complete("\ud800", "Hi", max_tokens=2)
            result = await client.complete("tiny", "Hello", max_tokens=2)
            assert result.usage["completion_tokens"] >= 1
        finally:
            await client.close()

    asyncio.run(run())


def test_a_frame_that_cannot_be_decoded_is_refused_and_the_connection_lives(gw) -> None:
    sup, _ = gw
    bad_utf8 = b"\x92\xa6status\x81\xaarequest_id\xa3\xed\xa0\x80"  # ["status", {request_id: <a surrogate>}]
    deep = msgpack.packb(["status", {"request_id": "r2", "x": _nested_list(limits.MAX_DEPTH + 5)}])

    async def run() -> None:
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.connect(f"ipc://{sup.state_dir / 'control.sock'}")
        try:
            for body in (b"\xc1\xc1\xc1", bad_utf8, deep):
                await sock.send_multipart([codec.PROTOCOL, body])
                reply = codec.decode(await asyncio.wait_for(sock.recv_multipart(), 10), TO_CLIENT)
                assert isinstance(reply, Error) and reply.code == "BAD_REQUEST", reply
            await sock.send_multipart(codec.encode(StatusRequest("alive")))
            reply = codec.decode(await asyncio.wait_for(sock.recv_multipart(), 10), TO_CLIENT)
            assert isinstance(reply, StatusReply) and reply.request_id == "alive"
        finally:
            sock.close(0)
            ctx.term()

    asyncio.run(run())
    assert sup.proc is not None and sup.proc.poll() is None


def _nested_list(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value
