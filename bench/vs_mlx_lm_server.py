"""lmx-supervisor + lmx-gateway against mlx_lm.server, the server a user would run instead: same
float32 tiny snapshot, same machine, one httpx client sending the same OpenAI chat-completions
streaming bodies (greedy), the servers taking turns (which goes first alternates every round):

1. one 256-token stream: tokens/s end to end, and beside it the same request through the
   supervisor's client library and in-process `mlx_lm.stream_generate` (first byte sent to final
   message), with the worker's own timings, to show where the end-to-end time goes;
2. 16 concurrent 128-token streams: aggregate tokens/s;
3. a six-turn chat over a ~2,700-token shared prefix: time to first token per turn, and the
   `cached_tokens` each server reports;
4. the same chat on the supervisor with its worker SIGKILLed between turns 3 and 4, once turn 3's
   prefix-cache entry is on disk: turn 4's time to first token against the warm turns.

Prints one JSON line, then a table. Run: `python bench/vs_mlx_lm_server.py [--rounds N] [--quick]`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.daemon import wait_ready  # noqa: E402
from bench.servers import (start_gateway, start_mlx_lm_server, start_supervisor, stop, stop_supervisor,  # noqa: E402
                           tiny_float32)
from bench.vs_report import report  # noqa: E402
from protocol.client import SupervisorClient  # noqa: E402

MODEL = "tiny"
SERVERS = {"lmx": MODEL, "mlx_lm": "default_model"}  # the id each server routes to the snapshot
SINGLE_TOKENS, CONC_TOKENS, CONC_STREAMS, TURNS, TURN_TOKENS = 256, 128, 16, 6, 32
STORY = [{"role": "user", "content": "Once upon a time"}]  # greedy on this snapshot: no EOS in 256 tokens
CONFIG = f"""
[[models]]
id = "{MODEL}"
path = "{{path}}"
[models.canary]
prompt = "Hello"
max_tokens = 2
"""
SENTENCES = [
    "The supervisor starts one worker per model and watches its heartbeats.",
    "A worker that dies takes only its own requests with it, and the client gets a typed error.",
    "Every request has a deadline, and a cancelled stream frees its memory at once.",
    "The quick brown fox jumps over the lazy dog while the weather turns to rain.",
    "Paris is a city on the river Seine, and the capital of France.",
    "Numbers such as 1, 2, 3, 42 and 2024 appear in the logs as often as words do.",
    "A model becomes routable only after its weights loaded and a canary passed.",
    "Knowledge is power, time is money, and a journey begins with a single step.",
]


async def sse_chat(http: httpx.AsyncClient, url: str, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat completion, timed from the first byte sent to the final message. A connection
    reset before the response starts is retried, as OpenAI's SDK does: mlx_lm.server listens with
    socketserver's backlog of 5, so a burst of 16 connections loses some. The retry's time counts."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    for retries in range(4):
        try:
            resp = await http.send(http.build_request("POST", url + "/v1/chat/completions", json=body), stream=True)
            break
        except (httpx.ReadError, httpx.ConnectError, httpx.RemoteProtocolError):
            if retries == 3:
                raise
            await asyncio.sleep(0.05 * (retries + 1))
    try:
        resp.raise_for_status()
        return {**await _read_sse(resp, t0), "retries": retries}
    finally:
        await resp.aclose()


async def _read_sse(resp: httpx.Response, t0: float) -> dict:
    text, usage, ttft, final = [], {}, None, None
    async for line in resp.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        usage = event.get("usage") or usage
        for choice in event.get("choices") or []:
            if content := (choice.get("delta") or {}).get("content"):
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                text.append(content)
            if choice.get("finish_reason"):
                final = time.perf_counter() - t0
    total = final or time.perf_counter() - t0
    return {"ttft_s": ttft or total, "total_s": total, "tokens": int(usage.get("completion_tokens", 0)),
            "text": "".join(text), "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens")}


class Bench:
    def __init__(self, http: httpx.AsyncClient, urls: dict[str, str], lib: SupervisorClient,
                 procs: dict[str, int], snapshot: Path) -> None:
        import mlx_lm

        self.http, self.urls, self.lib = http, urls, lib
        self.procs = {name: psutil.Process(pid) for name, pid in {**procs, "client": os.getpid()}.items()}
        self.mlx_lm = mlx_lm
        self.model, self.tok = mlx_lm.load(str(snapshot))

    async def http_chat(self, server: str, messages: list[dict], max_tokens: int) -> dict:
        return await sse_chat(self.http, self.urls[server], SERVERS[server], messages, max_tokens)

    async def library(self) -> dict:
        t0 = time.perf_counter()
        async with self.lib.generate(MODEL, messages=STORY, max_tokens=SINGLE_TOKENS) as stream:
            ttft = None
            async for _ in stream:
                ttft = ttft or time.perf_counter() - t0
            result = stream.result
        total = time.perf_counter() - t0
        return {"ttft_s": ttft, "total_s": total, "tokens": result.usage["completion_tokens"],
                "worker_first_token_s": result.timings.get("first_token_s"),
                "worker_total_s": result.timings.get("total_s")}

    def in_process(self) -> dict:
        # The text, as the servers get it: tokenizing and templating are inside the timing there too.
        t0 = time.perf_counter()
        prompt = self.tok.apply_chat_template(STORY, add_generation_prompt=True)
        ttft, n = None, 0
        for _ in self.mlx_lm.stream_generate(self.model, self.tok, prompt, max_tokens=SINGLE_TOKENS):
            ttft, n = ttft or time.perf_counter() - t0, n + 1
        return {"ttft_s": ttft, "total_s": time.perf_counter() - t0, "tokens": n}

    async def in_process_async(self) -> dict:
        return self.in_process()

    async def status(self) -> dict:
        return next(m for m in (await self.lib.status())["models"] if m["id"] == MODEL)

    def _cpu_s(self) -> dict[str, float]:
        out = {}
        for name, proc in self.procs.items():
            try:
                t = proc.cpu_times()
                out[name] = t.user + t.system
            except psutil.Error:  # a worker that a kill replaced
                pass
        return out

    async def timed(self, fn) -> dict:
        """`fn`'s result with the CPU each process spent meanwhile: on two cores, every ms another
        process runs is a ms the model's threads may wait."""
        c0 = self._cpu_s()
        result = await fn()
        c1 = self._cpu_s()
        return {**result, "cpu_ms": {k: round((c1[k] - c0[k]) * 1e3, 1) for k in c0.keys() & c1.keys()}}


def _order(names: list[str], rnd: int) -> list[str]:
    k = rnd % len(names)
    return names[k:] + names[:k]


async def single_round(b: Bench, rnd: int) -> dict[str, dict]:
    b.procs["worker"] = psutil.Process((await b.status())["worker_pid"])
    paths = {"lmx": lambda: b.http_chat("lmx", STORY, SINGLE_TOKENS),
             "mlx_lm": lambda: b.http_chat("mlx_lm", STORY, SINGLE_TOKENS),
             "library": b.library, "in_process": b.in_process_async}
    return {name: await b.timed(paths[name]) for name in _order(list(paths), rnd)}


async def concurrent_round(b: Bench, server: str) -> dict:
    t0 = time.perf_counter()
    runs = await asyncio.gather(*(b.http_chat(server, [{"role": "user", "content": f"Story {i}: once upon a time"}],
                                              CONC_TOKENS) for i in range(CONC_STREAMS)))
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in runs)
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "retries": sum(r["retries"] for r in runs)}


def long_prefix(tok, salt: int, target_tokens: int) -> str:
    """Distinct per salt from its first token on, so no conversation can reuse another's entries."""
    parts, k = [f"Conversation {salt}. You are a careful assistant; here is the background."], salt
    while len(tok.encode(" ".join(parts))) < target_tokens:
        parts += [SENTENCES[(k + i * 3) % len(SENTENCES)] for i in range(8)]
        k += 1
    return " ".join(parts)


class Conversation:
    """A chat client's view: every turn resends the history, its answers included."""

    def __init__(self, b: Bench, server: str, prefix: str) -> None:
        self.b, self.server = b, server
        self.messages = [{"role": "system", "content": prefix}]

    async def turn(self) -> dict:
        k = sum(m["role"] == "user" for m in self.messages) + 1
        self.messages.append({"role": "user", "content": f"Question {k}: and what happened next?"})
        r = await self.b.http_chat(self.server, self.messages, TURN_TOKENS)
        self.messages.append({"role": "assistant", "content": r["text"]})
        return {key: r[key] for key in ("ttft_s", "total_s", "prompt_tokens", "cached_tokens")}


async def conversation_round(b: Bench, rnd: int, prefix_tokens: int) -> dict[str, list[dict]]:
    prefix = long_prefix(b.tok, rnd, prefix_tokens)
    convs = {s: Conversation(b, s, prefix) for s in SERVERS}
    turns: dict[str, list[dict]] = {s: [] for s in SERVERS}
    for _ in range(TURNS):
        for server in _order(list(SERVERS), rnd):
            turns[server].append(await convs[server].turn())
    return turns


async def _poll(timeout_s: float, check) -> tuple[object, float]:
    """Polls `check` (async, returns a truthy value when done) until the deadline."""
    t0 = time.monotonic()
    while True:
        value = await check()
        if value or time.monotonic() - t0 > timeout_s:
            return value, time.monotonic() - t0
        await asyncio.sleep(0.05)


def _disk_mark(model: dict) -> tuple | None:
    pc = model.get("prefix_cache")
    return None if pc is None else (pc.get("disk_writes"), pc.get("disk_entries"), pc.get("disk_bytes"))


async def _turn_then_disk(b: Bench, conv: Conversation, timeout_s: float, last: bool) -> tuple[dict, str, float]:
    """A turn, then a wait until the status's disk figures move: a longer entry supersedes the last
    one's file, so disk_entries alone can stay flat. Waiting after every turn leaves no earlier write
    pending, so the move seen after turn 3 is turn 3's entry."""
    before = _disk_mark(await b.status())
    turn = await conv.turn()
    if before is None:
        if not last:
            return turn, "", 0.0
        _, waited = await _poll(min(timeout_s, 3.0), lambda: _has_prefix_cache(b))
        return turn, "absent: status has no prefix_cache (no prefix cache in this tree)", waited

    async def moved() -> bool:
        return _disk_mark(await b.status()) != before
    found, waited = await _poll(timeout_s, moved)
    return turn, "on disk" if found else f"not on disk after {timeout_s:.0f}s", waited


async def _has_prefix_cache(b: Bench) -> bool:
    return "prefix_cache" in await b.status()


async def _kill_worker(b: Bench) -> float:
    """SIGKILL the worker; seconds until the model is READY again on a new pid."""
    old = (await b.status())["worker_pid"]
    t_kill = time.monotonic()
    os.kill(old, signal.SIGKILL)

    async def back() -> bool:
        m = await b.status()
        return m["state"] == "READY" and m.get("worker_pid") not in (None, old)
    ready, _ = await _poll(120.0, back)
    if not ready:
        raise SystemExit("the worker did not come back READY within 120 s of its SIGKILL")
    return time.monotonic() - t_kill


async def kill_run(b: Bench, prefix_tokens: int, disk_timeout_s: float) -> dict:
    conv = Conversation(b, "lmx", long_prefix(b.tok, 1000, prefix_tokens))
    turns = []
    for k in range(3):
        turn, disk, waited = await _turn_then_disk(b, conv, disk_timeout_s, last=k == 2)
        turns.append(turn)
    out = {"disk": disk, "disk_wait_s": waited, "prefix_cache_before_kill": (await b.status()).get("prefix_cache")}
    out["kill_to_ready_s"] = await _kill_worker(b)
    turns += [await conv.turn() for _ in range(3)]
    out["prefix_cache_after"] = (await b.status()).get("prefix_cache")
    out["turns"] = turns
    return out


async def run(b: Bench, args: argparse.Namespace) -> dict:
    for server in SERVERS:  # warm-up: first requests compile and allocate
        await b.http_chat(server, STORY, 8)
    b.in_process()
    out: dict = {"single": [], "concurrent": {s: [] for s in SERVERS}, "conversation": []}
    for rnd in range(args.rounds):
        for rep in range(args.reps):
            out["single"].append(await single_round(b, rnd * args.reps + rep))
        for server in _order(list(SERVERS), rnd):
            out["concurrent"][server].append(await concurrent_round(b, server))
    for rnd in range(args.rounds):
        out["conversation"].append(await conversation_round(b, rnd, args.prefix_tokens))
    out["kill"] = await kill_run(b, args.prefix_tokens, args.disk_timeout_s)
    return out


async def _main_async(tmp: Path, args: argparse.Namespace) -> dict:
    snapshot = tiny_float32(tmp / "tiny32")
    (tmp / "lmx.toml").write_text(CONFIG.format(path=snapshot))
    state, procs = tmp / "state", []
    sup = start_supervisor(tmp / "lmx.toml", state, tmp / "supervisor.log")
    try:
        mlx, mlx_url = start_mlx_lm_server(snapshot, tmp / "mlx_lm_server.log")
        procs.append(mlx)
        gw, gw_url = start_gateway(state, tmp / "gateway.log")
        procs.append(gw)
        await wait_ready(state, 180)
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=300, limits=limits) as http, SupervisorClient(state_dir=state) as lib:
            b = Bench(http, {"lmx": gw_url, "mlx_lm": mlx_url}, lib,
                      {"supervisor": sup.pid, "gateway": gw.pid, "mlx_lm": mlx.pid}, snapshot)
            return await run(b, args)
    finally:
        for proc in procs:
            stop(proc)
        stop_supervisor(sup, state)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds of each interleaved comparison (default 3)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 1 rotation, a ~700-token prefix")
    # One 256-token run scatters by +-30 % on a shared 2-CPU machine: several rotations per round.
    p.add_argument("--reps", type=int, default=4, help="single-stream rotations of the four paths per round")
    p.add_argument("--prefix-tokens", type=int, default=2700, help="shared conversation prefix, in tokens")
    p.add_argument("--disk-timeout-s", type=float, default=30.0, help="wait for turn 3's entry on disk")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.reps, args.prefix_tokens, args.disk_timeout_s = 1, 1, 700, 10.0
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lmx-vs-") as tmp:
        raw = asyncio.run(_main_async(Path(tmp), args))
    # Others' work on a shared machine moves every figure: the load either side says how much.
    machine = (f"{platform.system()} {platform.machine()} {os.cpu_count()} cpus, "
               f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    report(raw, {"bench": "vs_mlx_lm_server", "model": "tiny random llama, float32", "machine": machine,
                 "rounds": args.rounds, "single_rotations": args.rounds * args.reps,
                 "prefix_tokens": args.prefix_tokens})


if __name__ == "__main__":
    main()
