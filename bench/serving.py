"""Serving under load on the tiny random llama, where the supervisor's overhead is most visible.
Each figure is measured beside its baseline in the same run:

- single-stream decode throughput and time to first token: supervised vs in-process stream_generate;
- `status` round trip p50/p99 vs a raw ZeroMQ REQ/REP echo of the same bytes (the floor);
- N concurrent streams (1, 4, 16, 64): aggregate tokens/s and p50/p99 inter-token latency, with
  continuous batching (max_batch_size 64) vs one at a time (max_batch_size 1);
- supervisor CPU per generated token under load, and RSS / idle CPU with 8 idle workers.

Prints one JSON line, then a table. Run: `make bench` (all benchmarks) or `python bench/serving.py`."""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protocol import codec  # noqa: E402
from bench.daemon import wait_ready  # noqa: E402
from protocol.client import SupervisorClient  # noqa: E402
from protocol.messages import StatusRequest  # noqa: E402
from tests.snapshots import write_tiny_llama  # noqa: E402

TOKENS = int(os.environ.get("LMX_BENCH_TOKENS", "256"))
RUNS = int(os.environ.get("LMX_BENCH_RUNS", "30"))
CONCURRENCY = [int(n) for n in os.environ.get("LMX_BENCH_CONCURRENCY", "1,4,16,64").split(",")]
# Rounds over every concurrency: this machine's speed drifts by up to 2x over seconds, so each
# round's N-stream figure is divided by the same round's 1-stream figure, and medians are reported.
CONCURRENCY_ROUNDS = int(os.environ.get("LMX_BENCH_CONCURRENCY_ROUNDS", "3"))
STREAM_TOKENS = 64
PROMPT = "Once upon a time"


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] if values else 0.0


class InProcess:
    """The baseline: mlx_lm.stream_generate in this process, same model, prompt and token count."""

    def __init__(self, path: Path) -> None:
        import mlx_lm

        self._mlx_lm = mlx_lm
        self.model, self.tok = mlx_lm.load(str(path))
        # The text, as a client sends it: stream_generate tokenizes it inside the timing, as the
        # worker does.
        self.prompt = PROMPT

    def run(self) -> dict:
        t0 = time.perf_counter()
        stamps = [time.perf_counter() for _ in self._mlx_lm.stream_generate(self.model, self.tok, self.prompt,
                                                                             max_tokens=TOKENS)]
        return {"ttft_s": stamps[0] - t0, "tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
                "tokens": len(stamps)}


def _median(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


async def _stream(client: SupervisorClient, model: str, max_tokens: int) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    stamps: list[float] = []
    async for chunk in client.generate(model, PROMPT, max_tokens=max_tokens):
        now = time.perf_counter()
        stamps.extend([now] * max(1, chunk.tokens))
    return t0, stamps


async def _single(client: SupervisorClient, model: str) -> dict:
    t0, stamps = await _stream(client, model, TOKENS)
    return {"ttft_s": stamps[0] - t0, "tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "tokens": len(stamps)}


async def single_streams(client: SupervisorClient, base: InProcess) -> dict[str, dict]:
    """Every supervised run sits between two in-process runs and is compared with their geometric
    mean (its extra time to first token with their mean), so the drift of a shared machine, up to 2x
    over seconds here, hits both sides alike. Batched and one-at-a-time serving take turns."""
    models = {"batched": "tiny", "serial": "tiny1"}
    runs: dict[str, list] = {"in_process": [], "batched": [], "serial": []}
    ratios: dict[str, list] = {"batched": [], "serial": []}
    extra_ttft: dict[str, list] = {"batched": [], "serial": []}
    for kind in models:  # warm-up
        await _single(client, models[kind])
    before = base.run()
    for i in range(RUNS):
        for kind in ("batched", "serial") if i % 2 == 0 else ("serial", "batched"):
            r = await _single(client, models[kind])
            after = base.run()
            runs[kind].append(r)
            runs["in_process"].append(after)
            ratios[kind].append(r["tok_s"] / math.sqrt(before["tok_s"] * after["tok_s"]))
            extra_ttft[kind].append(r["ttft_s"] - (before["ttft_s"] + after["ttft_s"]) / 2)
            before = after
    out = {k: _median(v) for k, v in runs.items()}
    for kind in models:
        out[kind]["paired_ratio"] = statistics.median(ratios[kind])
        out[kind]["paired_ttft_extra_s"] = statistics.median(extra_ttft[kind])
    return out


async def status_rtt(client: SupervisorClient, n: int = 1000) -> list[float]:
    for _ in range(50):
        await client.status()
    rtts = []
    for _ in range(n):
        t0 = time.perf_counter()
        await client.status()
        rtts.append(time.perf_counter() - t0)
    return rtts


def zmq_floor(reply_bytes: int, n: int = 1000) -> list[float]:
    """REQ/REP over ipc in this process: the request and a reply the size of a status reply."""
    ctx = zmq.Context()
    path = Path(tempfile.mkdtemp()) / "floor.sock"
    rep = ctx.socket(zmq.REP)
    rep.bind(f"ipc://{path}")
    reply = b"x" * reply_bytes

    def serve() -> None:
        for _ in range(n + 50):
            rep.recv_multipart()
            rep.send_multipart([codec.PROTOCOL, reply])

    t = threading.Thread(target=serve)
    t.start()
    req = ctx.socket(zmq.REQ)
    req.connect(f"ipc://{path}")
    frames = codec.encode(StatusRequest("r1"))
    rtts = []
    for i in range(n + 50):
        t0 = time.perf_counter()
        req.send_multipart(frames)
        req.recv_multipart()
        if i >= 50:
            rtts.append(time.perf_counter() - t0)
    t.join()
    req.close(0)
    rep.close(0)
    ctx.term()
    return rtts


async def concurrent(client: SupervisorClient, model: str, n: int, sup: psutil.Process) -> dict:
    cpu0 = sum(sup.cpu_times()[:2])
    t0 = time.perf_counter()
    results = await asyncio.gather(*(_stream(client, model, STREAM_TOKENS) for _ in range(n)))
    wall = time.perf_counter() - t0
    cpu = sum(sup.cpu_times()[:2]) - cpu0
    tokens = sum(len(stamps) for _, stamps in results)
    gaps = [b - a for _, stamps in results for a, b in zip(stamps, stamps[1:]) if b > a]
    return {"streams": n, "tokens": tokens, "aggregate_tok_s": tokens / wall, "itl_p50_ms": _pct(gaps, 0.5) * 1e3,
            "itl_p99_ms": _pct(gaps, 0.99) * 1e3, "supervisor_cpu_us_per_token": cpu / tokens * 1e6}


def _config(path: Path, models: list[tuple[str, int]], warm_spares: int = 0) -> str:
    lines = ["[supervisor]", "max_requests_per_client = 1024", f"warm_spares = {warm_spares}",
             "[restart]", "quarantine_after = 1000", "backoff_initial_s = 0.0"]
    for model_id, batch in models:
        lines += ["[[models]]", f'id = "{model_id}"', f'path = "{path}"', f"max_batch_size = {batch}",
                  "max_queue = 256"]
    return "\n".join(lines) + "\n"


class Supervisor:
    def __init__(self, root: Path, config: str) -> None:
        root.mkdir(parents=True)
        (root / "lmx.toml").write_text(config)
        self.state = root / "state"
        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "run", "--config",
                                      str(root / "lmx.toml"), "--state-dir", str(self.state)],
                                     cwd=REPO, stderr=subprocess.DEVNULL)

    async def ready(self) -> None:
        await wait_ready(self.state, 300)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)


async def supervised(state: Path, sup: psutil.Process, base: InProcess) -> dict:
    async with SupervisorClient(state_dir=state, timeout_s=600) as client:
        singles = await single_streams(client, base)
        out = {"single_batched": singles["batched"], "single_serial": singles["serial"],
               "in_process": singles["in_process"]}
        rtts = await status_rtt(client)
        reply_bytes = len(codec.encode(await _status_reply(client))[1])
        out["status_rtt_ms"] = {"p50": _pct(rtts, 0.5) * 1e3, "p99": _pct(rtts, 0.99) * 1e3}
        out["reply_bytes"] = reply_bytes
        rounds = []
        for _ in range(CONCURRENCY_ROUNDS):
            rows = []
            for n in CONCURRENCY:
                batched = await concurrent(client, "tiny", n, sup)
                serial = await concurrent(client, "tiny1", n, sup)
                rows.append({"batched": batched, "serial": serial})
            one = rows[0]["batched"]["aggregate_tok_s"]
            for row in rows:
                row["batched"]["speedup"] = row["batched"]["aggregate_tok_s"] / one
            rounds.append(rows)
        out["concurrency"] = [{kind: _median([r[i][kind] for r in rounds]) for kind in ("batched", "serial")}
                              for i in range(len(CONCURRENCY))]
    return out


async def _status_reply(client: SupervisorClient):
    from protocol.messages import StatusReply

    s = await client.status()
    return StatusReply("r1", s["supervisor"], s["models"])


async def restart_to_ready(state: Path, kills: int = 5) -> list[float]:
    """SIGKILL the model's worker; time until its READY event (load + canary, + spawn when cold)."""
    out = []
    async with SupervisorClient(state_dir=state) as client:
        for _ in range(kills):
            while True:  # a warm pool refills between kills
                s = await client.status()
                spares = s["supervisor"]["warm_spares"]
                if s["models"][0]["state"] == "READY" and (spares is None or spares["ready"] >= 1):
                    break
                await asyncio.sleep(0.05)
            pid = s["models"][0]["worker_pid"]
            async with client.events("model.state") as events:
                await events.connected()
                t0 = time.perf_counter()
                os.kill(pid, signal.SIGKILL)
                while True:
                    ev = await events.next(120)
                    if ev["to"] == "READY":
                        out.append(time.perf_counter() - t0)
                        break
    return out


async def idle_cost(state: Path, sup: psutil.Process, seconds: float = 10.0) -> dict:
    cpu0 = sum(sup.cpu_times()[:2])
    await asyncio.sleep(seconds)
    cpu = sum(sup.cpu_times()[:2]) - cpu0
    return {"rss_mb": sup.memory_info().rss / 2**20, "idle_cpu_pct": cpu / seconds * 100}


def main() -> None:
    machine = f"{platform.system()} {platform.machine()} {os.cpu_count()} cpus"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny = write_tiny_llama(root / "tiny")
        base = InProcess(tiny)
        s = Supervisor(root / "a", _config(tiny, [("tiny", 64), ("tiny1", 1)]))
        try:
            asyncio.run(s.ready())
            proc = psutil.Process(s.proc.pid)
            sv = asyncio.run(supervised(s.state, proc, base))
        finally:
            s.stop()
        floor = zmq_floor(sv["reply_bytes"])
        restarts = {}
        for name, spares in (("cold", 0), ("warm_spare", 1)):
            r = Supervisor(root / f"r-{name}", _config(tiny, [("m", 8)], warm_spares=spares))
            try:
                asyncio.run(r.ready())
                restarts[name] = statistics.median(asyncio.run(restart_to_ready(r.state)))
            finally:
                r.stop()
        eight = Supervisor(root / "b", _config(tiny, [(f"idle{i}", 8) for i in range(8)]))
        try:
            asyncio.run(eight.ready())
            idle = asyncio.run(idle_cost(eight.state, psutil.Process(eight.proc.pid)))
        finally:
            eight.stop()

    single, baseline = sv["single_batched"], sv["in_process"]
    result = {
        "bench": "serving", "model": "tiny random llama", "machine": machine, "tokens": TOKENS,
        "in_process_tok_s": round(baseline["tok_s"], 1),
        "supervised_tok_s": round(single["tok_s"], 1),
        "supervised_serial_tok_s": round(sv["single_serial"]["tok_s"], 1),
        "throughput_ratio": round(single["paired_ratio"], 3),
        "throughput_ratio_serial": round(sv["single_serial"]["paired_ratio"], 3),
        "ttft_extra_ms": round(single["paired_ttft_extra_s"] * 1e3, 2),
        "ttft_extra_serial_ms": round(sv["single_serial"]["paired_ttft_extra_s"] * 1e3, 2),
        "in_process_ttft_ms": round(baseline["ttft_s"] * 1e3, 2),
        "supervised_ttft_ms": round(single["ttft_s"] * 1e3, 2),
        "supervised_serial_ttft_ms": round(sv["single_serial"]["ttft_s"] * 1e3, 2),
        "status_rtt_p50_ms": round(sv["status_rtt_ms"]["p50"], 3),
        "status_rtt_p99_ms": round(sv["status_rtt_ms"]["p99"], 3),
        "zmq_floor_p50_ms": round(_pct(floor, 0.5) * 1e3, 3),
        "zmq_floor_p99_ms": round(_pct(floor, 0.99) * 1e3, 3),
        "concurrency": [{k: {kk: round(vv, 2) for kk, vv in v.items()} for k, v in row.items()}
                        for row in sv["concurrency"]],
        "idle_8_workers": {k: round(v, 2) for k, v in idle.items()},
        "restart_to_ready_ms": {k: round(v * 1e3, 1) for k, v in restarts.items()},
    }
    print(json.dumps(result))
    print(f"tiny random llama, {machine}")
    print(f"{'figure':<44}{'supervised':>14}{'baseline':>14}")
    print(f"{'decode tok/s, 1 stream (batching on)':<44}{result['supervised_tok_s']:>14}{result['in_process_tok_s']:>14}")
    print(f"{'decode tok/s, 1 stream (max_batch_size 1)':<44}{result['supervised_serial_tok_s']:>14}"
          f"{result['in_process_tok_s']:>14}")
    print(f"{'time to first token ms (batching on)':<44}{result['supervised_ttft_ms']:>14}{result['in_process_ttft_ms']:>14}")
    print(f"{'time to first token ms (max_batch_size 1)':<44}{result['supervised_serial_ttft_ms']:>14}"
          f"{result['in_process_ttft_ms']:>14}")
    print(f"{'vs in-process either side: throughput ratio':<44}{result['throughput_ratio']:>14}"
          f"{result['throughput_ratio_serial']:>14}  (batching on / max_batch_size 1)")
    print(f"{'vs in-process either side: extra TTFT ms':<44}{result['ttft_extra_ms']:>14}"
          f"{result['ttft_extra_serial_ms']:>14}")
    print(f"{'status p50 / p99 ms (baseline: raw zmq)':<44}"
          f"{result['status_rtt_p50_ms']:>7}/{result['status_rtt_p99_ms']:<6}"
          f"{result['zmq_floor_p50_ms']:>7}/{result['zmq_floor_p99_ms']:<6}")
    print(f"\n{'streams':>7} {'batched tok/s':>14} {'serial tok/s':>13} {'speedup':>8} {'ITL p50/p99 ms (batched)':>26}"
          f" {'sup CPU us/token':>17}")
    for row in result["concurrency"]:
        b, s_ = row["batched"], row["serial"]
        print(f"{b['streams']:>7} {b['aggregate_tok_s']:>14} {s_['aggregate_tok_s']:>13} "
              f"{b['speedup']:>7.2f}x {b['itl_p50_ms']:>12}/{b['itl_p99_ms']:<13} "
              f"{b['supervisor_cpu_us_per_token']:>17}")
    r = result["restart_to_ready_ms"]
    print(f"\nrestart-to-READY after SIGKILL (median of 5): cold {r['cold']} ms, warm spare {r['warm_spare']} ms")
    i = result["idle_8_workers"]
    print(f"\nsupervisor with 8 idle workers: RSS {i['rss_mb']} MB, CPU {i['idle_cpu_pct']} % of a core")


if __name__ == "__main__":
    main()
