"""Embedding throughput on the real all-MiniLM-L6-v2 at batch 1, 8 and 64 (inputs/s, tokens/s):
through a real supervisor (SupervisorClient.embed) and through lmx-gateway (POST /v1/embeddings over
httpx, base64 as the openai SDKs ask), beside the in-process engine (worker/embed.py's EmbedEngine
called directly, in the passes the worker cuts: no supervisor, no wire) and, where it installs,
mlx-embeddings itself on the same snapshot. mlx-embeddings is no dependency of the project (it pulls
mlx-vlm, opencv, pandas, datasets): it goes into a throwaway venv under bench/ with --no-deps, that
sees the project's venv for mlx and transformers, and runs in a process of its own, timed inside it.
Each round runs every path at every batch, the order rotating, so drift of a shared machine hits all
alike. Prints JSON and a table. LMX_BENCH_ROUNDS (default 2) sets the rounds; --no-peer skips
mlx-embeddings. `python bench/embeddings.py --peer SNAPSHOT` is the peer process itself."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROUNDS = int(os.environ.get("LMX_BENCH_ROUNDS", "2"))
BATCHES = (1, 8, 64)
REPS = {1: 8, 8: 3, 64: 1}  # calls per path, batch and round
AGREE_BATCH = 8
PEER_VERSION = "0.1.0"
PEER_VENV = REPO / "bench" / ".mlx-embeddings-venv"

_WHO = ["The supervisor", "A tired engineer", "My neighbour", "The embedding model", "A small robot", "The night train",
        "Our new intern", "The old lighthouse"]
_WHAT = ["restarts the crashed worker", "reads the quarterly tax report", "plays a guitar on the corner",
         "turns text into vectors", "waits for the rain to stop", "finds the nearest passages",
         "orders a coffee by the window", "counts every token twice"]
# 64 distinct one-line sentences of 9-14 tokens: the length of a search query or a title. Inputs as
# long as a RAG chunk (hundreds of tokens) take minutes at batch 64 on mlx's CPU backend.
SENTENCES = [f"{_WHO[i % 8]} {_WHAT[(i // 8 + i) % 8]}." for i in range(64)]


# --- the peer: mlx-embeddings in its venv ---------------------------------------------------------

def _stub_mlx_vlm() -> None:
    """mlx_embeddings' package __init__ imports mlx_vlm.utils.sanitize_weights, which only its
    vision models call: a stand-in that says so, never used on BERT's path."""
    def sanitize_weights(*_: Any, **__: Any) -> Any:
        raise NotImplementedError("mlx-vlm is not installed here: vision models need it")

    pkg, utils = types.ModuleType("mlx_vlm"), types.ModuleType("mlx_vlm.utils")
    pkg.__path__ = []  # a package, so `mlx_vlm.utils` resolves to the module below
    utils.sanitize_weights = sanitize_weights  # type: ignore[attr-defined]
    pkg.utils = utils  # type: ignore[attr-defined]
    sys.modules.update({"mlx_vlm": pkg, "mlx_vlm.utils": utils})


def _peer_import() -> tuple[Any, str]:
    try:
        import mlx_embeddings
        return mlx_embeddings, ""
    except ImportError as exc:
        if not (exc.name or "").startswith("mlx_vlm"):
            raise
        missing = exc.name
    for name in [m for m in sys.modules if m.startswith("mlx_embeddings")]:
        del sys.modules[name]  # the half-imported package, imported again below
    _stub_mlx_vlm()
    import mlx_embeddings
    return mlx_embeddings, (f"`import mlx_embeddings` needs {missing} (its __init__ imports "
                            "mlx_vlm.utils.sanitize_weights, called for vision models only): stood in by a stub")


def peer(snapshot: str) -> None:
    """Answers one JSON line per command line on stdin: {"op": "time", "batch", "reps"} -> the
    seconds of each call of mlx_embeddings.generate (tokenize, forward, pool), {"op": "vectors"}."""
    out, sys.stdout = sys.stdout, sys.stderr  # the libraries' prints stay off the reply channel

    def reply(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    try:
        lib, note = _peer_import()
        import mlx.core as mx

        model, tok = lib.load(snapshot)
    except Exception as exc:  # reported by the parent as why mlx-embeddings was not measured
        reply({"error": f"{type(exc).__name__}: {exc}"[:600]})
        return

    def run(texts: list[str]) -> Any:
        vectors = lib.generate(model, tok, texts=texts).text_embeds
        mx.eval(vectors)
        return vectors

    reply({"version": lib.__version__, "note": note})
    for line in sys.stdin:
        cmd = json.loads(line)
        texts = SENTENCES[:cmd["batch"]]
        if cmd["op"] == "vectors":
            reply({"vectors": np.array(run(texts)).tolist()})
            continue
        times = []
        for _ in range(cmd["reps"]):
            start = time.perf_counter()
            run(texts)
            times.append(time.perf_counter() - start)
        reply({"times": times})


def peer_python() -> tuple[Path | None, str]:
    """The throwaway venv's python with mlx-embeddings installed (--no-deps), made on first use;
    or None and why not."""
    py = PEER_VENV / "bin" / "python"
    try:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(PEER_VENV)], check=True,
                           capture_output=True, timeout=120)
            (PEER_VENV / ".gitignore").write_text("*\n")  # never part of the repository
        site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True, timeout=60).stdout.strip()
        ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
        (Path(site) / "lmx_project.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))  # mlx, transformers, pip
        have = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('mlx-embeddings'))"],
                              capture_output=True, text=True, timeout=60).stdout.strip()
        if have != PEER_VERSION:
            got = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps",
                                  f"mlx-embeddings=={PEER_VERSION}"], capture_output=True, text=True, timeout=600)
            if got.returncode != 0:
                why = " ".join(got.stderr.strip().splitlines()[-2:])[-400:]
                return None, f"pip install --no-deps mlx-embeddings=={PEER_VERSION} failed: {why}"
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"no venv for mlx-embeddings under bench/: {exc}"
    return py, ""


class Peer:
    """The mlx-embeddings process: one command line in, one JSON line out, each with a deadline."""

    def __init__(self, py: Path, snapshot: Path) -> None:
        self.proc = subprocess.Popen([str(py), str(Path(__file__).resolve()), "--peer", str(snapshot)], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        self.hello = self._read(180)

    def _read(self, timeout_s: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ""  # type: ignore[union-attr]
        if not line:
            return {"error": f"no answer within {timeout_s:.0f} s (exit {self.proc.poll()})"}
        return json.loads(line)

    def ask(self, cmd: dict, timeout_s: float = 300) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        answer = self._read(timeout_s)
        if "error" in answer:
            raise SystemExit(f"mlx-embeddings peer: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


# --- the paths measured ---------------------------------------------------------------------------

class Paths:
    """Each path's timed(batch, reps) -> seconds per call, and vectors(batch) for the agreement check."""

    def __init__(self, engine: Any, client: Any, http: Any, peer_proc: Peer | None) -> None:
        self.engine, self.client, self.http, self.peer = engine, client, http, peer_proc
        self.names = ["in-process", "supervisor", "gateway", *(["mlx-embeddings"] if peer_proc else [])]

    def _engine(self, texts: list[str]) -> np.ndarray:
        from worker.embed import batches

        ids = self.engine.tokens(texts)
        vectors = np.zeros((len(ids), self.engine.dims), dtype=np.float32)
        for part in batches([len(s) for s in ids]):  # the passes the worker would cut
            vectors[part] = self.engine.embed([ids[i] for i in part])
        return vectors

    async def _supervisor(self, texts: list[str]) -> np.ndarray:
        return np.array((await self.client.embed("emb", texts)).vectors, dtype=np.float32)

    def _gateway(self, texts: list[str]) -> np.ndarray:
        r = self.http.post("/v1/embeddings", json={"model": "emb", "input": texts, "encoding_format": "base64"})
        assert r.status_code == 200, r.text[:300]
        return np.array([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in r.json()["data"]])

    async def call(self, name: str, texts: list[str]) -> np.ndarray:
        if name == "supervisor":
            return await self._supervisor(texts)
        if name == "gateway":
            return self._gateway(texts)  # blocking is fine: nothing else runs on the loop meanwhile
        if name == "mlx-embeddings":
            assert self.peer is not None
            return np.array(self.peer.ask({"op": "vectors", "batch": len(texts)})["vectors"], dtype=np.float32)
        return self._engine(texts)

    async def timed(self, name: str, batch: int, reps: int) -> list[float]:
        if name == "mlx-embeddings":  # timed inside its process: no pipe in its figure
            assert self.peer is not None
            return self.peer.ask({"op": "time", "batch": batch, "reps": reps})["times"]
        out = []
        for _ in range(reps):
            start = time.perf_counter()
            await self.call(name, SENTENCES[:batch])
            out.append(time.perf_counter() - start)
        return out


async def measure(paths: Paths) -> dict:
    """Per path and batch, every call's seconds over ROUNDS rounds, the order rotating per round."""
    times: dict = {name: {b: [] for b in BATCHES} for name in paths.names}
    round_medians: dict = {name: {b: [] for b in BATCHES} for name in paths.names}
    for r in range(ROUNDS):
        for i, batch in enumerate(BATCHES):
            k = (r + i) % len(paths.names)
            for name in paths.names[k:] + paths.names[:k]:
                print(f"round {r + 1}/{ROUNDS}: batch {batch}, {name}", file=sys.stderr, flush=True)
                got = await paths.timed(name, batch, REPS[batch])
                times[name][batch] += got
                round_medians[name][batch].append(statistics.median(got))
    return {"times": times, "round_medians": round_medians}


async def agreement(paths: Paths) -> dict:
    """The lowest cosine of each path's vectors against the in-process engine's, at batch 8 (which
    warms every path: sockets hot, buffers allocated)."""
    want = await paths.call("in-process", SENTENCES[:AGREE_BATCH])
    out = {}
    for name in paths.names[1:]:
        got = await paths.call(name, SENTENCES[:AGREE_BATCH])
        cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        out[name] = round(float(cos.min()), 6)
    return out


def summarise(raw: dict, tokens: dict[int, int], names: list[str]) -> dict:
    rows: dict = {}
    for name in names:
        for batch in BATCHES:
            median = statistics.median(raw["times"][name][batch])
            ratios = [m / base for m, base in zip(raw["round_medians"]["in-process"][batch],
                                                  raw["round_medians"][name][batch])]
            rows.setdefault(name, {})[batch] = {
                "median_ms": round(median * 1000, 3), "inputs_per_s": round(batch / median, 1),
                "tokens_per_s": round(tokens[batch] / median, 1), "calls": len(raw["times"][name][batch]),
                "vs_in_process": round(statistics.median(ratios), 3),
                "vs_in_process_rounds": [round(x, 3) for x in ratios]}
    return rows


def matmul_gflops(rows: int = 704) -> dict:
    """GFLOP/s of one feed-forward matmul of MiniLM (rows x 384 @ 384 x 1536, float32) in mlx and
    in numpy, best of 3: the floor under every path above is the array library's matmul."""
    import mlx.core as mx

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((rows, 384), np.float32), rng.standard_normal((384, 1536), np.float32)
    ma, mb = mx.array(a), mx.array(b)
    mx.eval(ma, mb)
    out = {}
    for name, fn in (("mlx", lambda: mx.eval(ma @ mb)), ("numpy", lambda: a @ b)):
        best = min(_seconds(fn) for _ in range(3))
        out[name] = round(2 * rows * 384 * 1536 / best / 1e9, 1)
    return out


def _seconds(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- running it -----------------------------------------------------------------------------------

async def _run(engine: Any, state: Path, url: str, peer_proc: Peer | None) -> dict:
    import httpx

    from protocol.client import SupervisorClient

    async with SupervisorClient(state_dir=state) as client:
        with httpx.Client(base_url=url, timeout=120) as http:
            paths = Paths(engine, client, http, peer_proc)
            tokens = {b: sum(len(s) for s in engine.tokens(SENTENCES[:b])) for b in BATCHES}
            assert (await client.embed("emb", SENTENCES[:8])).prompt_tokens == tokens[8]  # the worker counts alike
            agree = await agreement(paths)
            raw = await measure(paths)
    return {"tokens": tokens, "agreement_min_cosine": agree, "paths": summarise(raw, tokens, paths.names),
            "matmul_gflops": matmul_gflops(tokens[64])}


def _start_peer(snapshot: Path, wanted: bool) -> tuple[Peer | None, dict]:
    if not wanted:
        return None, {"measured": False, "why": "--no-peer"}
    py, why = peer_python()
    if py is None:
        return None, {"measured": False, "why": why}
    proc = Peer(py, snapshot)
    if "error" in proc.hello:
        proc.close()
        return None, {"measured": False, "why": proc.hello["error"]}
    return proc, {"measured": True, "version": proc.hello["version"], "how": proc.hello["note"] or "imported as is"}


def main() -> None:
    from bench.servers import start_gateway, stop
    from tests.harness import RunningSupervisor
    from tests.snapshots import write_minilm
    from worker.embed import EmbedEngine

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a `timeout` still stops what we started
    root = Path(tempfile.mkdtemp(prefix="lmx-bench-embed-"))
    snapshot = write_minilm(root / "minilm")
    peer_proc, peer_info = _start_peer(snapshot, "--no-peer" not in sys.argv)
    if not peer_info["measured"]:
        print(f"mlx-embeddings not measured: {peer_info['why']}", file=sys.stderr)
    engine = EmbedEngine()
    engine.load(str(snapshot))
    sup = RunningSupervisor(root / "sup", [{"id": "emb", "path": str(snapshot)}]).start(timeout_s=120)
    gw, url = start_gateway(sup.state_dir)
    try:
        result = asyncio.run(_run(engine, sup.state_dir, url, peer_proc))
    finally:
        stop(gw)
        sup.cleanup()
        if peer_proc is not None:
            peer_proc.close()
        shutil.rmtree(root, ignore_errors=True)  # the unpacked snapshot is 88 MB
    result = {"bench": "embeddings", "model": "all-MiniLM-L6-v2 (float32)", "rounds": ROUNDS,
              "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
              "mlx_embeddings": peer_info, **result}
    print(json.dumps(result))
    _table(result)


def _table(result: dict) -> None:
    print(f"\n{'batch':>5}{'tokens':>8}  {'path':<16}{'median ms':>11}{'inputs/s':>11}{'tokens/s':>11}"
          f"{'x in-process':>14}")
    for batch in BATCHES:
        for name, rows in result["paths"].items():
            r = rows[batch]
            print(f"{batch:>5}{result['tokens'][batch]:>8}  {name:<16}{r['median_ms']:>11.2f}{r['inputs_per_s']:>11.1f}"
                  f"{r['tokens_per_s']:>11.0f}{r['vs_in_process']:>14.3f}")
    print(f"\nlowest cosine to the in-process vectors (batch {AGREE_BATCH}): {result['agreement_min_cosine']}")
    print(f"one MiniLM feed-forward matmul ({result['tokens'][64]} x 384 @ 384 x 1536), GFLOP/s: "
          f"{result['matmul_gflops']}")
    peer_info = result["mlx_embeddings"]
    told = [peer_info.get("version"), peer_info.get("how") or f"not measured: {peer_info.get('why')}"]
    print("mlx-embeddings:", " ".join(t for t in told if t))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peer":
        peer(sys.argv[2])
    else:
        main()
