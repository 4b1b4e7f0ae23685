"""Through `lmx-gateway` (a real process, one SupervisorClient shared by every HTTP request): a bad
request is refused where it is read, with a 400 naming its field, and the streams running beside
it on the same supervisor connection finish with their whole text and `[DONE]`."""

from __future__ import annotations

import asyncio
import socket
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

    def chunks():  # no content-length: chunked transfer, counted as it comes
        for _ in range(MAX_BODY_BYTES // (1 << 20) + 2):
            yield b" " * (1 << 20)

    chunked = gateway.http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 400 and chunked.json()["error"]["code"] == "BAD_REQUEST"
    assert gateway.http.get("/healthz").status_code == 200
