"""Crash-to-error latency (SIGKILL a worker mid-stream, time until the client holds WORKER_CRASHED),
p50/p99 over N kills on the tiny model, and SmolLM2's restart-to-READY. Prints JSON and a table."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protocol import errors as E  # noqa: E402
from protocol.client import SupervisorClient  # noqa: E402
from tests.snapshots import smollm2_gguf_path, write_tiny_llama  # noqa: E402

KILLS = int(os.environ.get("LMX_BENCH_KILLS", "50"))
CONFIG = """
[restart]
quarantine_after = 1000  # never reached here (history_max_rows must be at least this)
backoff_initial_s = 0.01
backoff_max_s = 0.01
[[models]]
id = "m"
path = "{path}"
[models.canary]
prompt = "{prompt}"
max_tokens = 8
"""


async def _model(client: SupervisorClient) -> dict:
    return (await client.status())["models"][0]


async def _wait_ready(client: SupervisorClient, not_pid: int | None = None) -> dict:
    while True:
        m = await _model(client)
        if m["state"] == "READY" and m["worker_pid"] != not_pid:
            return m
        await asyncio.sleep(0.01)


async def kill_loop(state: Path) -> list[float]:
    latencies = []
    async with SupervisorClient(state_dir=state) as client:
        for _ in range(KILLS):
            pid = (await _wait_ready(client))["worker_pid"]
            killed = 0.0
            try:
                async for _chunk in client.generate("m", "Hello", max_tokens=2000):
                    if not killed:
                        killed = time.perf_counter()
                        os.kill(pid, signal.SIGKILL)
            except E.WorkerCrashed:
                latencies.append(time.perf_counter() - killed)
    return latencies


async def restart_to_ready(state: Path, runs: int = 3) -> list[float]:
    out = []
    async with SupervisorClient(state_dir=state) as client:
        for _ in range(runs):
            pid = (await _wait_ready(client))["worker_pid"]
            t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            await _wait_ready(client, not_pid=pid)
            out.append(time.perf_counter() - t0)
    return out


def supervise(tmp: Path, name: str, model: Path, prompt: str, body) -> object:  # noqa: ANN001
    cfg = tmp / f"{name}.toml"
    cfg.write_text(CONFIG.format(path=model, prompt=prompt))
    state = tmp / f"{name}-state"
    sup = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "run", "--config", str(cfg),
                            "--state-dir", str(state)], cwd=REPO, stderr=open(tmp / f"{name}.stderr", "wb"))
    try:
        while not (state / "control.sock").exists():
            if sup.poll() is not None:  # a refused config, a locked state dir: say so, never wait forever
                raise SystemExit(f"supervisor exited {sup.returncode}: {(tmp / f'{name}.stderr').read_text()[-2000:]}")
            time.sleep(0.05)
        return asyncio.run(body(state))
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(timeout=60)


def main() -> None:
    from worker.gguf import import_gguf

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        tiny = write_tiny_llama(tmp / "tiny")
        lat = sorted(supervise(tmp, "tiny", tiny, "Hello", kill_loop))
        smol = tmp / "smollm2"
        import_gguf(smollm2_gguf_path(), smol)
        restarts = supervise(tmp, "smol", smol, "What is the capital of France?", restart_to_ready)
    q = lambda p: lat[min(len(lat) - 1, int(len(lat) * p))] * 1e3  # noqa: E731
    result = {"bench": "crash_latency", "machine": f"{platform.system()} {platform.machine()} {os.cpu_count()} cpus",
              "kills": len(lat), "crash_to_error_p50_ms": round(q(0.5), 2), "crash_to_error_p99_ms": round(q(0.99), 2),
              "crash_to_error_max_ms": round(lat[-1] * 1e3, 2),
              "smollm2_restart_to_ready_s": [round(r, 2) for r in restarts],
              "smollm2_restart_to_ready_median_s": round(statistics.median(restarts), 2)}
    print(json.dumps(result))
    print(f"crash -> WORKER_CRASHED at the client over {len(lat)} kills: p50 {result['crash_to_error_p50_ms']} ms,"
          f" p99 {result['crash_to_error_p99_ms']} ms, max {result['crash_to_error_max_ms']} ms")
    print(f"SmolLM2 SIGKILL -> READY again (spawn, import, load, Paris canary): "
          f"median {result['smollm2_restart_to_ready_median_s']} s of {result['smollm2_restart_to_ready_s']}")


if __name__ == "__main__":
    main()
