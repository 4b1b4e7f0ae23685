"""Figures of bench/vs_mlx_lm_server.py from its raw runs: one JSON line, then a table. Ratios are
taken within a round (both servers measured minutes apart at most) and their median reported, so
the drift of a shared machine hits both sides of each ratio alike."""

from __future__ import annotations

import json
from statistics import median

WARM = (1, 2, 4, 5)  # turns 2, 3, 5 and 6 of the kill run: warm turns either side of the restart


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def _tok_s(run: dict) -> float:
    return run["tokens"] / run["total_s"]


def single(rounds: list[dict]) -> dict:
    out: dict = {}
    for path in rounds[0]:
        runs = [r[path] for r in rounds]
        out[path] = {"tokens": sorted({r["tokens"] for r in runs}), "total_ms": _r(median(r["total_s"] for r in runs) * 1e3, 1),
                     "ttft_ms": _r(median(r["ttft_s"] for r in runs) * 1e3, 2),
                     "tok_s": _r(median(_tok_s(r) for r in runs), 1),
                     "decode_tok_s": _r(median((r["tokens"] - 1) / (r["total_s"] - r["ttft_s"]) for r in runs), 1),
                     "cpu_ms": {k: _r(median(r["cpu_ms"].get(k, 0.0) for r in runs), 1) for k in runs[0]["cpu_ms"]}}
    out["ratio_lmx_to_mlx_lm"] = _r(median(_tok_s(r["lmx"]) / _tok_s(r["mlx_lm"]) for r in rounds))
    # End to end against the bare library call, per token so a different count cannot skew it.
    out["e2e_vs_in_process"] = {p: _r(median(_tok_s(r[p]) / _tok_s(r["in_process"]) for r in rounds))
                                for p in ("library", "lmx", "mlx_lm")}
    out["breakdown_ms"] = _breakdown(rounds)
    return out


def _breakdown(rounds: list[dict]) -> dict:
    """Where one request's time goes: medians of differences within a rotation (the client library's
    against the worker's own timing: within one request)."""
    def med(f) -> float | None:
        return _r(median(f(r) for r in rounds) * 1e3, 1)
    return {"in_process_total": med(lambda r: r["in_process"]["total_s"]),
            "worker_own_total": med(lambda r: r["library"]["worker_total_s"]),
            "worker_vs_in_process": med(lambda r: r["library"]["worker_total_s"] - r["in_process"]["total_s"]),
            "supervisor_ipc_client": med(lambda r: r["library"]["total_s"] - r["library"]["worker_total_s"]),
            "gateway_http_sse": med(lambda r: r["lmx"]["total_s"] - r["library"]["total_s"]),
            "worker_first_token": med(lambda r: r["library"]["worker_first_token_s"])}


def concurrent(runs: dict[str, list[dict]]) -> dict:
    out = {s: {"tok_s": _r(median(r["tok_s"] for r in v), 1), "tok_s_rounds": [_r(r["tok_s"], 1) for r in v],
               "tokens": [r["tokens"] for r in v],
               "connection_retries": sum(r["retries"] for r in v)}
           for s, v in runs.items()}
    out["ratio_lmx_to_mlx_lm"] = _r(median(a["tok_s"] / b["tok_s"] for a, b in zip(runs["lmx"], runs["mlx_lm"])))
    return out


def conversation(rounds: list[dict]) -> dict:
    turns = range(len(rounds[0]["lmx"]))
    out: dict = {}
    for s in ("lmx", "mlx_lm"):
        out[s] = {"ttft_ms": [_r(median(r[s][t]["ttft_s"] for r in rounds) * 1e3, 1) for t in turns],
                  "prompt_tokens": [rounds[-1][s][t]["prompt_tokens"] for t in turns],
                  "cached_tokens": [rounds[-1][s][t]["cached_tokens"] for t in turns]}
    pairs = [r["lmx"][t]["ttft_s"] / r["mlx_lm"][t]["ttft_s"] for r in rounds for t in turns]
    out["ttft_ratio_per_turn"] = [_r(median(r["lmx"][t]["ttft_s"] / r["mlx_lm"][t]["ttft_s"] for r in rounds), 2)
                                  for t in turns]
    out["ttft_ratio_turns_2_6"] = _r(median(pairs[i] for i in range(len(pairs)) if i % len(turns) > 0), 2)
    return out


def kill(run: dict) -> dict:
    ttft = [t["ttft_s"] for t in run["turns"]]
    warm = median(ttft[i] for i in WARM)
    return {"disk": run["disk"], "disk_wait_s": _r(run["disk_wait_s"], 2), "kill_to_ready_s": _r(run["kill_to_ready_s"], 2),
            "ttft_ms": [_r(x * 1e3, 1) for x in ttft], "cached_tokens": [t["cached_tokens"] for t in run["turns"]],
            "turn4_ms": _r(ttft[3] * 1e3, 1), "warm_ms": _r(warm * 1e3, 1), "turn4_vs_warm": _r(ttft[3] / warm, 2),
            "turn4_vs_cold_turn1": _r(ttft[3] / ttft[0], 2),
            "prefix_cache_before_kill": run["prefix_cache_before_kill"], "prefix_cache_after": run["prefix_cache_after"]}


def report(raw: dict, head: dict) -> None:
    res = {**head, "single": single(raw["single"]), "concurrent": concurrent(raw["concurrent"]),
           "conversation": conversation(raw["conversation"]), "kill": kill(raw["kill"])}
    print(json.dumps(res))
    table(res)


def table(res: dict) -> None:
    s, c, v, k = res["single"], res["concurrent"], res["conversation"], res["kill"]
    print(f"\n{res['machine']}; {res['rounds']} rounds ({res['single_rotations']} single-stream rotations); medians; "
          "lmx = lmx-gateway + supervisor")
    print(f"{'':44}{'lmx':>12}{'mlx_lm':>12}{'ratio':>8}")
    print(f"{'1 stream, 256 tokens: tok/s end to end':44}{s['lmx']['tok_s']:>12}{s['mlx_lm']['tok_s']:>12}"
          f"{s['ratio_lmx_to_mlx_lm']:>8}")
    print(f"{'  tokens generated (per round)':44}{str(s['lmx']['tokens']):>12}{str(s['mlx_lm']['tokens']):>12}")
    print(f"{'16 concurrent x 128 tokens: aggregate tok/s':44}{c['lmx']['tok_s']:>12}{c['mlx_lm']['tok_s']:>12}"
          f"{c['ratio_lmx_to_mlx_lm']:>8}")
    print(f"{'  connections reset and retried':44}{c['lmx']['connection_retries']:>12}{c['mlx_lm']['connection_retries']:>12}")
    print("\nlong-prefix chat, time to first token (ms) [cached_tokens]; ratio lmx / mlx_lm")
    for t, (a, b, q) in enumerate(zip(v["lmx"]["ttft_ms"], v["mlx_lm"]["ttft_ms"], v["ttft_ratio_per_turn"])):
        ca, cb = v["lmx"]["cached_tokens"][t], v["mlx_lm"]["cached_tokens"][t]
        print(f"  turn {t + 1} ({v['lmx']['prompt_tokens'][t]} tokens){'':18}{a:>8} [{ca}]{b:>8} [{cb}]{q:>6}")
    print(f"  turns 2-6 ratio: {v['ttft_ratio_turns_2_6']} (target <= 1.5)")
    print(f"\nworker SIGKILLed after turn 3 ({k['disk']}, waited {k['disk_wait_s']} s; READY again in "
          f"{k['kill_to_ready_s']} s)")
    print(f"  ttft ms per turn {k['ttft_ms']}, cached_tokens {k['cached_tokens']}")
    print(f"  turn 4 {k['turn4_ms']} ms vs warm turns {k['warm_ms']} ms: {k['turn4_vs_warm']}x (target <= 3); "
          f"vs cold turn 1: {k['turn4_vs_cold_turn1']}x")
    b = s["breakdown_ms"]
    e = s["e2e_vs_in_process"]
    print(f"\none 256-token request end to end, tok/s vs in-process stream_generate: library {e['library']}, "
          f"lmx-gateway {e['lmx']}, mlx_lm.server {e['mlx_lm']}")
    print(f"  in-process {b['in_process_total']} ms; the worker's own total {b['worker_own_total']} ms "
          f"({b['worker_vs_in_process']:+} ms); supervisor + IPC + client library {b['supervisor_ipc_client']:+} ms; "
          f"gateway + HTTP + SSE {b['gateway_http_sse']:+} ms (medians of paired differences)")
    print("  CPU ms per request, by process:")
    for path in ("in_process", "library", "lmx", "mlx_lm"):
        cpu = ", ".join(f"{k} {v}" for k, v in sorted(s[path]["cpu_ms"].items()) if v)
        print(f"    {path:<12}{s[path]['total_ms']:>8} ms wall: {cpu}")
