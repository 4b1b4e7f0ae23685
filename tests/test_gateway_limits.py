"""What an idle or hostile client may cost a real `lmx-gateway` process before its request is
served: the bytes and time of its headers, the time of its body, the connections open at once and
the requests in flight. Raw sockets, since no HTTP client library sends half a request. No
supervisor runs: every bound here holds before a request reaches one."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from tests.harness import wait_until
from tests.test_gateway import GatewayProcess

pytestmark = pytest.mark.timeout(60)

CHAT = b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("gateway-limits")
    gateway = GatewayProcess(root / "gw", root / "no-supervisor", "--max-connections", "16",
                             "--header-timeout-s", "1", "--body-timeout-s", "1.5", "--max-in-flight", "2",
                             "--max-header-bytes", "16384", "--access-log")
    yield gateway
    assert gateway.stop() == 0


def _connect(gw: GatewayProcess) -> socket.socket:
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    return s


def _answer(s: socket.socket) -> bytes:
    """Everything the gateway sends until it closes (or 10 s pass: the socket's timeout fails the test)."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_a_huge_header_line_is_431_and_never_read_into_memory(gw: GatewayProcess) -> None:
    rss = psutil.Process(gw.proc.pid).memory_info().rss
    s = _connect(gw)
    s.sendall(CHAT + b"x-big: ")
    sent = 0
    try:
        for _ in range(256):  # up to 64 MiB, a MiB at a time; the gateway closes long before
            s.sendall(b"a" * (1 << 20))
            sent += 1 << 20
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        reply = _answer(s)
    except ConnectionResetError:
        reply = b"HTTP/1.1 431 (reset after the reply)"
    assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
    assert sent < 32 << 20, "the gateway kept reading a header line past its bound"
    assert psutil.Process(gw.proc.pid).memory_info().rss - rss < 16 << 20
    assert gw.http.get("/healthz").status_code == 200


def test_headers_that_never_finish_are_408_after_the_header_timeout(gw: GatewayProcess) -> None:
    s = _connect(gw)
    start = time.monotonic()
    s.sendall(CHAT + b"x-slow: still typ")
    reply = _answer(s)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert 0.8 < time.monotonic() - start < 5


def test_a_body_that_never_arrives_is_refused_after_the_body_timeout(gw: GatewayProcess) -> None:
    s = _connect(gw)
    start = time.monotonic()
    s.sendall(CHAT + b"content-length: 100\r\n\r\n{\"model\":")
    reply = b""
    while b"did not arrive within" not in reply and (chunk := s.recv(65536)):  # the connection may stay open
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 400") and b"did not arrive within" in reply, reply[:300]
    assert 1.2 < time.monotonic() - start < 6


def test_idle_clients_cannot_lock_everyone_out(gw: GatewayProcess) -> None:
    idle = [_connect(gw) for _ in range(24)]  # past --max-connections 16
    for s in idle:
        try:
            s.sendall(b"GET /healthz HTTP/1.1\r\nhost")  # half a request, then silence
        except OSError:
            pass
    timed_out = 0
    for s in idle:
        try:  # each is closed: past the cap at once (503, or a reset that overtook it), else 408
            reply = _answer(s)
        except ConnectionResetError:
            reply = b"reset"
        assert reply.startswith((b"HTTP/1.1 503", b"HTTP/1.1 408", b"reset")), reply[:200]
        timed_out += reply.startswith(b"HTTP/1.1 408")
    assert 0 < timed_out <= 16
    assert wait_until(lambda: gw.http.get("/healthz").status_code == 200, 5, "a good request after the crowd")


def test_requests_in_flight_are_capped_with_retry_after(gw: GatewayProcess) -> None:
    slow = []
    for _ in range(2):  # --max-in-flight 2: two bodies trickling in hold both slots
        s = _connect(gw)
        s.sendall(CHAT + b"content-length: 100\r\n\r\n{")
        slow.append(s)

    def third() -> httpx.Response:
        return gw.http.post("/v1/chat/completions", json={"model": "m", "messages": []})

    # The two slow ones are in flight once the gateway has read their headers: wait for that, on its
    # own gauge (a probe request instead could take a slot first and outlast their 1.5 s body timeout).
    wait_until(lambda: "lmx_gateway_in_flight 2.0" in gw.http.get("/metrics").text, 5, "both slow ones in flight")
    r = third()
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "OVERLOADED"
    for s in slow:
        assert s.recv(65536).startswith(b"HTTP/1.1 400")  # their body timeout gives the slots back
    assert wait_until(lambda: third().status_code != 429, 5, "a slot again once the slow bodies timed out")


def test_the_fd_limit_is_raised_for_the_connection_cap(gw: GatewayProcess) -> None:
    soft, hard = psutil.Process(gw.proc.pid).rlimit(psutil.RLIMIT_NOFILE)
    assert soft == psutil.RLIM_INFINITY or soft >= min(16 + 256, hard)


def test_the_bounds_are_in_the_help() -> None:
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "--help"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    for flag in ("--max-connections", "--max-header-bytes", "--header-timeout-s", "--keep-alive-s",
                 "--body-timeout-s", "--max-in-flight"):
        assert flag in out


def test_the_access_log_is_json_lines(gw: GatewayProcess) -> None:
    assert gw.http.get("/healthz?probe=access").status_code == 200
    lines = wait_until(lambda: [e for e in gw.events("gateway.access") if e["path"] == "/healthz?probe=access"], 5,
                       "the access line")
    assert lines[0]["method"] == "GET" and lines[0]["status"] == 200 and lines[0]["level"] == "info"
    for line in gw.stderr_path.read_text().splitlines():  # uvicorn's own lines are JSON too
        assert line.startswith("{"), line
