"""What the HTTP gateway adds to a non-streaming request: p50/p99 over the client library alone vs
POST /v1/completions through `lmx-gateway`, same tiny model, same prompt, same run (interleaved, so
both see the same machine load). Prints one JSON line and a table. Run:
`python bench/gateway_overhead.py` (LMX_BENCH_REQUESTS sets the count per path)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.daemon import wait_ready  # noqa: E402
from bench.servers import start_gateway  # noqa: E402
from protocol.client import SupervisorClient  # noqa: E402
from tests.snapshots import write_tiny_llama  # noqa: E402

REQUESTS = int(os.environ.get("LMX_BENCH_REQUESTS", "400"))
WARMUP = 30
PROMPT = "Hello"
MAX_TOKENS = 2
CONFIG = """
[[models]]
id = "tiny"
path = "{path}"
[models.canary]
prompt = "Hello"
max_tokens = 2
"""


class Http:
    """One keep-alive connection from the standard library: the least client-side cost we can
    put in front of the gateway, so the difference is the gateway's."""

    def __init__(self, url: str) -> None:
        u = urlsplit(url)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        self.conn.connect()
        # http.client writes headers and body separately: without this, Nagle holds the body
        # until the server's delayed ACK (40 ms on Linux), a client-side cost, not the gateway's.
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": MAX_TOKENS}).encode()

    def complete(self) -> dict:
        self.conn.request("POST", "/v1/completions", self.body, {"content-type": "application/json"})
        resp = self.conn.getresponse()
        data = resp.read()
        assert resp.status == 200, data
        return json.loads(data)

    def get(self, path: str) -> bytes:
        self.conn.request("GET", path)
        resp = self.conn.getresponse()
        data = resp.read()
        assert resp.status == 200, data
        return data


async def measure(state: Path, url: str) -> tuple[list[float], list[float], list[float]]:
    http_client = Http(url)
    direct, gateway, healthz = [], [], []

    async def one_direct() -> tuple[float, str]:
        t0 = time.perf_counter()
        result = await client.complete("tiny", PROMPT, max_tokens=MAX_TOKENS)
        return time.perf_counter() - t0, result.text

    def one_gateway() -> tuple[float, str]:
        # Blocking inside the loop is fine: nothing else runs on it between our calls.
        t0 = time.perf_counter()
        body = http_client.complete()
        return time.perf_counter() - t0, body["choices"][0]["text"]

    async with SupervisorClient(state_dir=state) as client:
        for i in range(WARMUP + REQUESTS):
            # Alternate which path goes first, so neither always runs on the other's warm caches.
            if i % 2:
                (d, d_text), (g, g_text) = await one_direct(), one_gateway()
            else:
                (g, g_text), (d, d_text) = one_gateway(), await one_direct()
            assert g_text == d_text  # the same greedy work on both paths
            t0 = time.perf_counter()
            http_client.get("/healthz")
            h = time.perf_counter() - t0
            if i >= WARMUP:
                direct.append(d)
                gateway.append(g)
                healthz.append(h)
    return direct, gateway, healthz


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * q))] * 1e3


def _start(tmp: Path) -> tuple[subprocess.Popen, subprocess.Popen, Path, str]:
    tiny = write_tiny_llama(tmp / "tiny")
    cfg = tmp / "bench.toml"
    cfg.write_text(CONFIG.format(path=tiny))
    state = tmp / "state"
    sup = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "run", "--config", str(cfg),
                            "--state-dir", str(state)], cwd=REPO, stderr=subprocess.DEVNULL)
    gw, url = start_gateway(state)
    return sup, gw, state, url


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sup, gw, state, url = _start(Path(tmp))
        try:
            asyncio.run(wait_ready(state))
            direct, gateway, healthz = asyncio.run(measure(state, url))
        finally:
            for proc in (gw, sup):
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
    result = {
        "bench": "gateway_overhead", "model": "tiny random llama", "max_tokens": MAX_TOKENS, "requests": REQUESTS,
        "machine": f"{platform.system()} {platform.machine()} {os.cpu_count()} cpus",
        "client_p50_ms": round(_quantile(direct, 0.5), 3), "client_p99_ms": round(_quantile(direct, 0.99), 3),
        "gateway_p50_ms": round(_quantile(gateway, 0.5), 3), "gateway_p99_ms": round(_quantile(gateway, 0.99), 3),
    }
    # Per-request pairs ran back to back: the median of the differences is the added cost.
    result["overhead_p50_ms"] = round(_quantile([g - d for d, g in zip(direct, gateway)], 0.5), 3)
    # The HTTP round trip alone (uvicorn, Starlette, loopback TCP, no supervisor): the floor of any overhead.
    result["healthz_rtt_p50_ms"] = round(_quantile(healthz, 0.5), 3)
    result["target_p50_ms"] = 1.0
    result["within_target"] = result["overhead_p50_ms"] < 1.0
    print(json.dumps(result))
    print(f"{'non-streaming request':<28}{'p50 ms':>10}{'p99 ms':>10}")
    print(f"{'client library':<28}{result['client_p50_ms']:>10}{result['client_p99_ms']:>10}")
    print(f"{'through lmx-gateway':<28}{result['gateway_p50_ms']:>10}{result['gateway_p99_ms']:>10}")
    print(f"{'GET /healthz round trip':<28}{result['healthz_rtt_p50_ms']:>10}")
    print(f"{'added by the gateway (p50)':<28}{result['overhead_p50_ms']:>10}")


if __name__ == "__main__":
    main()
