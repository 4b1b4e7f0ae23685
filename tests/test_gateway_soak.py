"""Hostile-client soak: a real `lmx-gateway` (API keys on) over a real supervisor, hit each round by
good streaming clients and, at the same time, as many hostile ones — malformed JSON and UTF-8, deep
nesting, lone surrogates, oversized and slow headers and bodies, wrong and missing keys, unknown
fields, template-kwargs attacks, schema bombs, disconnects mid-stream. After every round: every good
stream completed, no hostile request got a 5xx or anything but its documented status, no worker
died, and the gateway's memory and descriptors stayed bounded. LMX_SOAK_ROUNDS sets the rounds
(small by default, so CI runs it; 200 on demand), LMX_SOAK_SEED replays one."""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Awaitable, Callable

import httpx
import psutil
import pytest

from gateway import apikeys
from tests.harness import RunningSupervisor
from tests.test_gateway import GatewayProcess

ROUNDS = int(os.environ.get("LMX_SOAK_ROUNDS", "2"))
SEED = int(os.environ.get("LMX_SOAK_SEED", str(random.randrange(1 << 30))))
GOOD_PER_ROUND = 8
ASK = [{"role": "user", "content": "Hi"}]

pytestmark = [pytest.mark.soak, pytest.mark.timeout(120 + 20 * ROUNDS)]


def _chat(**extra: object) -> bytes:
    return json.dumps({"model": "a", "messages": ASK, "max_tokens": 4, **extra}).encode()


class Stack:
    def __init__(self, sup: RunningSupervisor, gateway: GatewayProcess, key: str) -> None:
        self.sup, self.gateway, self.key = sup, gateway, key
        host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)

    async def raw(self, data: bytes, then_wait: bool = True) -> int:
        """Send `data` on a fresh connection; the status line's code (0 if the gateway closed without one)."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(data)
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 15) if then_wait else b""
        except (ConnectionResetError, BrokenPipeError):
            line = b""
        finally:
            writer.close()
        return int(line.split()[1]) if line.startswith(b"HTTP/1.1 ") else 0

    def request(self, body: bytes, key: str | None = "", path: str = "/v1/chat/completions",
                extra: bytes = b"") -> bytes:
        key = self.key if key == "" else key
        auth = f"authorization: Bearer {key}\r\n".encode() if key else b""
        return (f"POST {path} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n").encode() + auth + extra + b"\r\n" + body


def _hostile(stack: Stack) -> dict[str, tuple[Callable[[], Awaitable[int]], set[int]]]:
    """Each hostile kind: how to send it, and the statuses its documentation promises."""
    r, req = stack.raw, stack.request
    deep = b'{"model": "a", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    schema_bomb = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {f"p{i}": {"type": "string", "pattern": "(a+)+$"} for i in range(5000)}}}}
    return {
        "malformed_json": (lambda: r(req(b'{"model": "a", "messages": [')), {400}),
        "bad_utf8": (lambda: r(req(b'{"model": "\xff\xfe", "messages": []}')), {400}),
        "deep_nesting": (lambda: r(req(deep)), {400}),
        "lone_surrogate": (lambda: r(req(b'{"model": "a", "max_tokens": 4, "messages": '
                                         b'[{"role": "user", "content": "\\ud800"}]}')), {400}),
        "unknown_field": (lambda: r(req(_chat(frobnicate=1))), {400}),
        "wrong_key": (lambda: r(req(_chat(), key="lmx-00000000-" + "A" * 43)), {401}),
        "no_key": (lambda: r(req(_chat(), key=None)), {401}),
        "template_kwargs": (lambda: r(req(_chat(chat_template_kwargs={"return_tensors": "np"}))), {400}),
        "template_swap": (lambda: r(req(_chat(chat_template_kwargs={"chat_template": "{% for i in range(10**9) %}"
                                                                                      "x{% endfor %}"}))), {400}),
        "schema_bomb": (lambda: r(req(_chat(response_format=schema_bomb))), {400}),  # past MAX_SCHEMA_CHARS
        "declared_huge": (lambda: r(req(b"", extra=b"x-pad: 1\r\n").replace(
            b"content-length: 0", b"content-length: 99999999999"), then_wait=True), {400}),
        "huge_header": (lambda: r(req(_chat(), extra=b"x-big: " + b"a" * 200_000 + b"\r\n")), {431, 0}),
        "slow_headers": (lambda: r(b"POST /v1/chat/completions HTTP/1.1\r\nhost: g"), {408}),
        "slow_body": (lambda: r(req(_chat())[:-10]), {400}),
        "disconnect": (lambda: r(req(_chat(stream=True, max_tokens=64)), then_wait=False), {0}),
    }


async def _good(stack: Stack, client: httpx.AsyncClient) -> float:
    """One good streamed chat; its wall time. Fails the round if it does not end with [DONE]."""
    start = time.monotonic()
    body = {"model": "a", "messages": ASK, "max_tokens": 16, "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body,
                             headers={"authorization": f"Bearer {stack.key}"}) as resp:
        assert resp.status_code == 200, await resp.aread()
        lines = [line async for line in resp.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    assert json.loads(lines[-2].removeprefix("data: "))["choices"][0]["finish_reason"] in ("stop", "length")
    return time.monotonic() - start


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    root = tmp_path_factory.mktemp("gateway-soak")
    sup = RunningSupervisor(root / "sup", [{"id": "a", "path": str(tiny_model), "max_batch_size": 8}])
    try:
        sup.start()
        _, key = apikeys.create(apikeys.path_in(sup.state_dir), "soak")
        gateway = GatewayProcess(root / "gw", sup.state_dir, "--header-timeout-s", "1", "--body-timeout-s", "1",
                                 "--max-header-bytes", "32768")
        yield Stack(sup, gateway, key)
        assert gateway.stop() == 0
    finally:
        sup.cleanup()


def test_good_streams_survive_a_hostile_crowd(stack: Stack) -> None:
    rng = random.Random(SEED)
    print(f"gateway soak seed {SEED}, {ROUNDS} rounds")
    proc = psutil.Process(stack.gateway.proc.pid)
    before = stack.sup.model("a")
    tried: dict[str, int] = {}
    worst_rss = proc.memory_info().rss

    async def round_(hostile: bool) -> list[float]:
        kinds = _hostile(stack)
        async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=60) as client:
            good = [asyncio.ensure_future(_good(stack, client)) for _ in range(GOOD_PER_ROUND)]
            names = rng.sample(sorted(kinds), len(kinds)) if hostile else []  # every kind, each round
            bad = [asyncio.ensure_future(kinds[n][0]()) for n in names]
            times = await asyncio.gather(*good)
            statuses = await asyncio.gather(*bad)
        for name, status in zip(names, statuses):
            tried[name] = tried.get(name, 0) + 1
            assert status in kinds[name][1], f"{name}: got {status}, documented {kinds[name][1]}"
        return list(times)

    calm = asyncio.run(round_(hostile=False))
    fds = proc.num_fds()
    mixed: list[float] = []
    for _ in range(ROUNDS):
        mixed += asyncio.run(round_(hostile=True))
        after = stack.sup.model("a")
        assert (after["state"], after["worker_pid"], after["restarts"]) == \
            ("READY", before["worker_pid"], before["restarts"]), "a hostile request cost the worker"
        worst_rss = max(worst_rss, proc.memory_info().rss)
        assert worst_rss < 600 << 20 and proc.num_fds() < fds + 64
    p99 = lambda xs: sorted(xs)[max(0, int(len(xs) * 0.99) - 1)]  # noqa: E731
    print(f"tried {json.dumps(tried, sort_keys=True)}; worst gateway RSS {worst_rss >> 20} MiB; good streams p50/p99 "
          f"{statistics.median(calm) * 1000:.0f}/{p99(calm) * 1000:.0f} ms alone, "
          f"{statistics.median(mixed) * 1000:.0f}/{p99(mixed) * 1000:.0f} ms beside the hostile half")
