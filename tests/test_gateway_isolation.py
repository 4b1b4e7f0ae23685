"""Through `lmx-gateway` (a real process, one SupervisorClient shared by every HTTP request): a bad
request is refused where it is read, with a 400 naming its field, and the streams running beside
it on the same supervisor connection finish with their whole text and `[DONE]`."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from pathlib import Path

import httpx
import openai
import pytest

from protocol import limits
from tests.harness import wait_until
from tests.test_gateway import supervised_gateway

pytestmark = pytest.mark.timeout(120)

PROMPTS = ["Hello", "The quick brown fox", "What is the capital", "Numbers such as"]
MAX_TOKENS = 400  # long enough that the four still stream when the bad one comes


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    root = tmp_path_factory.mktemp("gateway-isolation")
    yield from supervised_gateway(root, [{"id": "tiny", "path": str(tiny_model)}])


def test_a_bad_request_beside_four_streams_is_a_400_and_the_four_finish(gw) -> None:
    sup, gateway = gw

    async def run() -> tuple[list[tuple[str, str, str | None]], openai.BadRequestError]:
        client = gateway.async_openai()
        begun = asyncio.Event()
        started: set[int] = set()

        async def one(i: int, prompt: str) -> tuple[str, str, str | None]:
            stream = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, stream=True)
            text, rid, finish = "", "", None
            async for c in stream:  # ends without an exception only after [DONE]
                rid = c.id
                started.add(i)
                if len(started) == len(PROMPTS):
                    begun.set()
                if c.choices:
                    text += c.choices[0].delta.content or ""
                    finish = c.choices[0].finish_reason or finish
            return rid.removeprefix("chatcmpl-"), text, finish

        try:
            tasks = [asyncio.ensure_future(one(i, p)) for i, p in enumerate(PROMPTS)]
            await asyncio.wait_for(begun.wait(), 60)
            with pytest.raises(openai.BadRequestError) as info:
                await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=2_000_000, stream=True)
            ended = [t.exception() or "finished" for t in tasks if t.done()]
            assert not ended, f"streams ended while the bad request was refused: {ended}"
            return await asyncio.gather(*tasks), info.value
        finally:
            await client.close()

    done, err = asyncio.run(run())
    assert err.status_code == 400 and err.code == "BAD_REQUEST" and err.param == "max_tokens"
    for rid, text, finish in done:
        assert finish in ("stop", "length") and text
    ends = {}

    def logged() -> bool:
        ends.update({e["request_id"]: e for e in sup.events("request.done")})
        return {rid for rid, _, _ in done} <= set(ends)

    wait_until(logged, 30, "the four requests' request.done")
    for rid, text, finish in done:
        if finish == "length":
            assert ends[rid]["completion_tokens"] == MAX_TOKENS
    assert not sup.events("client.bad_request")  # the bad one never reached the wire


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": limits.MAX_TOKENS + 1}, "max_tokens"),
    ({"max_completion_tokens": limits.MAX_TOKENS + 1}, "max_completion_tokens"),
    ({"seed": limits.MAX_SEED + 1}, "seed"),
    ({"stop": ["x"] * (limits.MAX_STOP + 1)}, "stop"),
    ({"stop": "x" * (limits.MAX_STOP_CHARS + 1)}, "stop"),
    ({"model": "m" * (limits.MAX_NAME_CHARS + 1)}, "model"),
    ({"messages": [{"role": "user", "content": "x"}] * (limits.MAX_MESSAGES + 1)}, "messages"),
    ({"messages": [{"role": "r" * (limits.MAX_NAME_CHARS + 1), "content": "x"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": "x" * limits.MAX_PROMPT_CHARS}]}, "messages"),
])
def test_fields_past_the_wire_limits_are_400_naming_the_field(gw, body: dict, param: str) -> None:
    sup, gateway = gw
    request = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], **body}
    r = gateway.http.post("/v1/chat/completions", json=request)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "BAD_REQUEST" and r.json()["error"]["param"] == param
    prompt = gateway.http.post("/v1/completions", json={"model": "tiny", "prompt": "x" * (limits.MAX_PROMPT_CHARS + 1)})
    assert prompt.status_code == 400 and prompt.json()["error"]["param"] == "prompt"
    assert not sup.events("client.bad_request")


def test_a_body_past_the_bound_is_refused_unread(gw) -> None:
    from gateway.app import MAX_BODY_BYTES

    _, gateway = gw
    # A length past the bound is answered from the headers, before a byte of the body is sent.
    url = httpx.URL(gateway.url)
    with socket.create_connection((url.host, url.port), timeout=10) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1))
        head = b""
        while b"}}" not in head and (part := conn.recv(65536)):  # the JSON error body's end, or EOF
            head += part
    assert head.startswith(b"HTTP/1.1 400 ") and b"more than" in head, head[:500]
    assert b"\r\nconnection: close\r\n" in head.lower(), head[:500]  # the body it never read ends the connection

    def chunks():  # no content-length: chunked transfer, counted as it comes
        for _ in range(MAX_BODY_BYTES // (1 << 20) + 2):
            yield b" " * (1 << 20)

    chunked = gateway.http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 400 and chunked.json()["error"]["code"] == "BAD_REQUEST"
    assert chunked.headers["connection"] == "close"
    assert gateway.http.get("/healthz").status_code == 200


def _one_connection(url: httpx.URL, request: bytes, body: list[bytes], after: bytes) -> bytes:
    """`request`, the chunks of `body` and then `after`, on one connection, sent from a thread (the
    server answers, and may close, while the body is still going); returns every byte the server
    sent until it closed the connection."""
    with socket.create_connection((url.host, url.port), timeout=30) as conn:
        def send() -> None:
            try:
                conn.sendall(request)
                for chunk in body:
                    conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                conn.sendall(b"0\r\n\r\n" + after)
            except OSError:  # closed by the server: the rest was never going to be read
                pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        received = b""
        try:
            while part := conn.recv(65536):  # until the server closes (a timeout fails the test)
                received += part
        except ConnectionResetError:  # closed with our unread bytes in its buffer: what it sent came first
            pass
        sender.join(30)
    return received


def test_the_rest_of_a_refused_chunked_body_is_never_read_as_a_request(gw) -> None:
    """A chunked body past the bound is refused as it comes, its rest still on the way: that
    response closes the connection, so the rest (and a request sent after it on the same
    connection) is never parsed as a request. Kept alive, the connection answered the rest with a
    431 (taken for an oversized head), which a client reusing the connection read as its next
    request's answer."""
    from gateway.app import MAX_BODY_BYTES

    _, gateway = gw
    head = (b"POST /v1/embeddings HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
    body = [b" " * (1 << 20)] * (MAX_BODY_BYTES // (1 << 20) + 4)
    received = _one_connection(httpx.URL(gateway.url), head, body, b"GET /healthz HTTP/1.1\r\nhost: gw\r\n\r\n")
    # A status line anywhere: a second response follows the first's body with no line break between.
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", received)
    assert statuses == [b"400"], received[-2000:]
    head = received.split(b"\r\n\r\n", 1)[0].lower()
    assert b"\r\nconnection: close" in head and b"more than" in received, received[:2000]
    assert gateway.http.get("/healthz").status_code == 200
    # A body read to its end keeps its connection, even when the request is refused.
    refused = gateway.http.post("/v1/embeddings", json={"model": "tiny", "input": ["x"], "dimensions": 0})
    assert refused.status_code == 400 and "connection" not in refused.headers, refused.headers
