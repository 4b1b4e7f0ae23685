"""The cost of a group (docs/distributed.md): one model served by a 2-rank tensor-parallel group on
this machine (ring over 127.0.0.1) against the same model in one worker (max_batch_size = 1, so
both serve one request at a time), through one supervisor. Greedy, same prompt, same token count;
runs alternate between the two so drift of a shared machine hits both alike. Two snapshots: the
tiny random llama (where the per-step collective's overhead shows most) and a wider one (hidden
1024, 8 layers, where compute is split). Prints one JSON line and a table.

Run: python bench/group.py [--runs N] [--tokens N]"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.daemon import wait_ready  # noqa: E402
from protocol.client import SupervisorClient  # noqa: E402
from tests.snapshots import write_tiny_llama  # noqa: E402

PROMPT = "Hello world, the capital of France is a city on the river"
WIDE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
        "num_key_value_heads": 8}


def _snapshot(root: Path, name: str, shape: dict) -> Path:
    return write_tiny_llama(root / name, dtype="float32", scale=0.05, shape=shape)


def _config(models: dict[str, Path]) -> str:
    lines = ["[supervisor]", "heartbeat_interval_s = 0.5", "stop_timeout_s = 3.0"]
    for name, path in models.items():
        lines += ["[[models]]", f'id = "{name}-one"', f'path = "{path}"', "max_batch_size = 1",
                  "prefix_cache_bytes = 0",
                  "[[models]]", f'id = "{name}-group"', f'path = "{path}"',
                  "[models.group]", 'hosts = ["local", "local"]', 'parallel = "tensor"']
    return "\n".join(lines) + "\n"


async def _one(client: SupervisorClient, model: str, tokens: int) -> dict:
    t0 = time.perf_counter()
    stamps = []
    async for chunk in client.generate(model, PROMPT, max_tokens=tokens):
        stamps.extend([time.perf_counter()] * max(1, chunk.tokens))
    n = len(stamps)
    return {"ttft_s": stamps[0] - t0, "decode_tok_s": (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else 0.0}


async def _measure(state: Path, names: list[str], runs: int, tokens: int) -> dict:
    out: dict = {}
    async with SupervisorClient(state_dir=state) as client:
        for name in names:
            one, group = [], []
            for _ in range(2):  # warm-up: compile the samplers' graphs on both
                await _one(client, f"{name}-one", tokens)
                await _one(client, f"{name}-group", tokens)
            for _ in range(runs):
                one.append(await _one(client, f"{name}-one", tokens))
                group.append(await _one(client, f"{name}-group", tokens))
            med = {k: {key: statistics.median(r[key] for r in rs) for key in ("ttft_s", "decode_tok_s")}
                   for k, rs in (("one", one), ("group", group))}
            med["ratio"] = med["group"]["decode_tok_s"] / med["one"]["decode_tok_s"]
            out[name] = med
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = {"tiny": _snapshot(root, "tiny", {}), "wide": _snapshot(root, "wide", WIDE)}
        (root / "lmx.toml").write_text(_config(models))
        proc = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "run", "--config", str(root / "lmx.toml"),
                                 "--state-dir", str(root / "state")], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=open(root / "stderr", "wb"))
        try:
            asyncio.run(wait_ready(root / "state"))
            result = asyncio.run(_measure(root / "state", list(models), args.runs, args.tokens))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    print(json.dumps({"bench": "group", "runs": args.runs, "tokens": args.tokens, **result}))
    print(f"{'model':<6} {'one worker tok/s':>17} {'2-rank group tok/s':>19} {'ratio':>6} {'ttft one / group ms':>20}")
    for name, r in result.items():
        print(f"{name:<6} {r['one']['decode_tok_s']:>17.1f} {r['group']['decode_tok_s']:>19.1f} {r['ratio']:>6.2f} "
              f"{1000 * r['one']['ttft_s']:>9.1f} / {1000 * r['group']['ttft_s']:.1f}")


if __name__ == "__main__":
    main()
