"""`lmxctl`: the operator's CLI. Talks to the daemon only through protocol.client."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

from lmxctl import completion, keys, logview, service, view
from protocol import errors as E
from protocol.client import SupervisorClient
from protocol.keys import KeyFileError
from protocol.states import PENDING_STATES, is_state
from protocol.states import ModelState as S

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
# The states `load` waits through: those that reach READY by themselves.
WAIT_STATES = frozenset(s.value for s in PENDING_STATES)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=None, sort_keys=False, default=str))


def _error_obj(exc: E.LmxError) -> dict[str, Any]:
    return {"error": {"code": exc.code.code, "message": exc.message, "retryable": exc.retryable,
                      **({"details": exc.details} if exc.details else {})}}


async def _status(client: SupervisorClient, args: argparse.Namespace) -> int:
    status = await client.status()
    _print_json(status) if args.json else print(view.status_table(status, view.use_colour()))
    return EXIT_OK


async def _generate(client: SupervisorClient, args: argparse.Namespace) -> int:
    kwargs: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.chat:
        kwargs["messages"] = [{"role": "user", "content": args.prompt}]
        prompt = None
    else:
        prompt = args.prompt
    async with client.generate(args.model, prompt, **kwargs) as stream:
        async for chunk in stream:
            if not args.json:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    result = stream.result
    assert result is not None
    if args.json:
        _print_json({"text": result.text, "finish_reason": result.finish_reason, "usage": result.usage,
                     "timings": result.timings})
    else:
        sys.stdout.write("\n")
    return EXIT_OK


async def _load(client: SupervisorClient, args: argparse.Namespace) -> int:
    detail = await client.load(args.model, force=args.force)
    if args.no_wait:
        _print_json(detail) if args.json else print(f"{args.model}: {detail['state']}")
        return EXIT_OK
    start, last, colour = time.monotonic(), None, view.use_colour()

    def settled(model: dict) -> bool:  # each state it passes through is printed once
        nonlocal last
        if model["state"] != last and not args.json and not args.quiet:
            state = view.paint(model["state"], view.STATE_COLOUR.get(model["state"]), colour)
            print(f"{args.model}: {state} ({time.monotonic() - start:.1f}s)", flush=True)
        last = model["state"]
        return model["state"] not in WAIT_STATES or (is_state(model["state"], S.BACKOFF) and bool(model["last_error"]))

    model = await client.wait_state(args.model, settled, float("inf"))  # as long as it takes: Ctrl-C ends it
    if args.json:
        _print_json(model)
    if is_state(model["state"], S.READY):
        return EXIT_OK
    if is_state(model["state"], S.UNLOADED) and model.get("wanted") is False:  # a later unload: the last word
        print(f"{args.model}: unloaded by a later unload", file=sys.stderr) if not args.json else None
        return EXIT_OK
    err = model.get("last_error") or {}
    if not args.json:
        print(f"{args.model} did not become READY: {err.get('code')}: {err.get('message')}", file=sys.stderr)
        step = view.next_step(err.get("code") or "", args.model)
        if step:
            print(f"next: {step}", file=sys.stderr)
    return EXIT_FAILED


async def _unload(client: SupervisorClient, args: argparse.Namespace) -> int:
    detail = await client.unload(args.model)
    _print_json(detail) if args.json else print(f"{args.model}: {detail['state']}")
    return EXIT_OK


async def _history(client: SupervisorClient, args: argparse.Namespace) -> int:
    records = await client.history(args.model, limit=args.limit)
    if args.json:
        _print_json(records)
        return EXIT_OK
    if not records:
        print(f"{args.model}: no failures recorded")
    for r in records:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"]))
        how = r["signal"] or (f"exit {r['exit_code']}" if r["exit_code"] is not None else "-")
        victim = " (innocent victim, not counted)" if r["victim"] else ""
        print(f"{when}  {r['code']:<16} {how:<8} rev {r['revision']}  during {r['phase']}  "
              f"pid {r['worker_pid'] or '-'}{view.rank_of(r)}  {r['cause']}{victim}")
    return EXIT_OK


async def _repair_progress(client: SupervisorClient, model: str) -> None:
    """Byte progress of a repair, from the supervisor's model.repair_progress events (on stderr)."""
    try:
        async with client.events("model.repair_progress") as stream:
            async for ev in stream:
                if ev.get("model") == model:
                    pct = 100 * ev["done_bytes"] / max(1, ev["total_bytes"])
                    print(f"  {ev['file']}: {ev['done_bytes']:,}/{ev['total_bytes']:,} bytes ({pct:.0f}%)",
                          file=sys.stderr, flush=True)
    except E.LmxError:
        pass  # progress is a nicety; the repair's answer is what counts


async def _admin(client: SupervisorClient, args: argparse.Namespace) -> int:
    if args.command == "reload":
        detail = await client.reload()
    elif args.command == "release":
        detail = await client.release(args.model)
    elif args.command == "swap":
        detail = await client.swap(args.old, args.new)
    elif args.command == "probe":
        detail = await client.probe(os.path.abspath(args.path))
        if not args.json:
            err = detail["last_error"]
            print(f"{detail['path']}: {detail['state']}" + (f" ({err['code']}: {err['message']})" if err else ""))
            return EXIT_OK if is_state(detail["state"], S.READY) else EXIT_FAILED
    elif args.command == "repair":
        follow = None if args.json else asyncio.create_task(_repair_progress(client, args.model))
        try:
            detail = await client.repair(args.model)
        finally:
            if follow is not None:
                follow.cancel()
        if not args.json:
            print(f"{args.model}: fetched {len(detail['fetched'])} file(s), {detail['bytes']:,} bytes: "
                  f"{', '.join(detail['fetched']) or '-'}")
            for f in detail["findings"]:
                print(f"still {f['code']} {f['file']}: {f['message']}")
            print(f"{args.model}: {detail['state']}")
            return EXIT_FAILED if detail["findings"] else EXIT_OK
    else:
        detail = await client.rollback(args.model, args.revision)
    _print_json(detail) if args.json else print(f"{args.command}: " + ", ".join(f"{k}={v}" for k, v in detail.items()))
    failed = detail.get("findings") or (args.command == "probe" and not is_state(detail["state"], S.READY))
    return EXIT_FAILED if failed else EXIT_OK


async def _verify(client: SupervisorClient, args: argparse.Namespace) -> int:
    if os.path.sep in args.target or os.path.isdir(args.target):
        # A path: the same checks, here, without a supervisor. The daemon's own snapshot checks, not a
        # copy, so a path and a model id get the same verdict (they never import mlx).
        from supervisor.admission import snapshot

        detail = {"path": os.path.abspath(args.target),
                  "findings": [f.to_dict() for f in snapshot.verify(args.target)]}
    else:
        detail = await client.verify(args.target)
    if args.json:
        _print_json(detail)
    else:
        for f in detail["findings"]:
            print(f"{f['code']:<22} {f['file']}: {f['message']}")
        print(f"{detail['path']}: " + (f"{len(detail['findings'])} finding(s)" if detail["findings"] else "ok"))
    return EXIT_FAILED if detail["findings"] else EXIT_OK


async def _compat(client: SupervisorClient, args: argparse.Namespace) -> int:
    reg = await client.compat()
    rows = reg["rows"]
    if args.json:
        _print_json(reg)
        return EXIT_OK
    backends = sorted({r["backend"] for r in rows} | {reg["backend"]})
    models = sorted({r["model"] for r in rows})
    cell = {(r["model"], r["backend"]): r for r in rows}

    def show(m: str, b: str) -> str:
        r = cell.get((m, b))
        if r is None:
            return "-"
        tps = (r["evidence"].get("canary") or {}).get("decode_tokens_per_s")
        crashes = sum(r["evidence"].get("crashes", {}).values())
        return r["outcome"] + (f" {tps:.1f} tok/s" if tps else "") + (f" {crashes} crash(es)" if crashes else "")

    if args.markdown:
        print("| model | " + " | ".join(backends) + " |")
        print("|---" * (len(backends) + 1) + "|")
        for m in models:
            print(f"| {m} | " + " | ".join(show(m, b) for b in backends) + " |")
    else:
        for b in backends:
            print(f"== {b}{'  (this stack)' if b == reg['backend'] else ''}")
            for m in models:
                print(f"  {m:<24} {show(m, b)}")
    return EXIT_OK


def _import_gguf(args: argparse.Namespace) -> int:
    # The import needs mlx, and only worker processes import mlx: the worker's own entry does the work
    # and prints what lmxctl always printed (progress on stderr, the result or the error), on our stdio.
    cmd = [sys.executable, "-m", "worker.gguf", args.gguf, args.dest] + (["--json"] if args.json else [])
    proc = subprocess.Popen(cmd)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached the child too (one process group); it removes its temp dir before it exits.
        proc.wait()
        return 130
    return 128 - rc if rc < 0 else rc


async def _events(client: SupervisorClient, args: argparse.Namespace) -> int:
    """Follow lifecycle events until Ctrl-C (or --count events, or --idle-timeout without one)."""
    colour = view.use_colour()
    seen = 0
    async with client.events(*args.prefix) as stream:
        await stream.connected()
        print(f"following events from {client.events_endpoint} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        while args.count is None or seen < args.count:
            ev = await stream.next(args.idle_timeout) if args.idle_timeout else await stream.__anext__()
            if args.model and ev.get("model") != args.model:
                continue
            seen += 1
            if args.json:
                _print_json(ev)
                continue
            when = time.strftime("%H:%M:%S", time.localtime(ev["ts"]))
            name = ev["event"]
            rest = {k: v for k, v in ev.items() if k not in ("event", "ts", "seq", "model")}
            if name == "model.state":
                to = rest.pop("to")
                line = (f"{rest.pop('from')} -> {view.paint(to, view.STATE_COLOUR.get(to), colour)} "
                        f"({rest.pop('reason')})")
            else:
                line = ""
            line += " " + " ".join(f"{k}={v}" for k, v in rest.items() if v not in (None, "", [], {}))
            print(f"{when} {name:<20} {ev.get('model') or '-':<12} {line.strip()}", flush=True)
    return EXIT_OK


async def _cache(client: SupervisorClient, args: argparse.Namespace) -> int:
    detail = await client.clear_cache(args.model)
    if args.json:
        _print_json(detail)
    else:
        print(f"prefix cache cleared for {', '.join(detail['models']) or 'no model'}: "
              f"{detail['files']} file(s), {detail['bytes']:,} bytes on disk")
    return EXIT_OK


async def _metrics(client: SupervisorClient, args: argparse.Namespace) -> int:
    text = await client.metrics()
    _print_json({"text": text}) if args.json else sys.stdout.write(text)
    return EXIT_OK


COMMANDS = {"status": _status, "generate": _generate, "load": _load, "unload": _unload,
            "history": _history, "release": _admin, "rollback": _admin, "reload": _admin, "verify": _verify,
            "repair": _admin, "probe": _admin, "swap": _admin,
            "compat": _compat, "events": _events, "metrics": _metrics, "cache": _cache}


def _add_model_commands(sub: argparse._SubParsersAction, json_flag: argparse.ArgumentParser) -> None:
    """The commands that read or drive a model's lifecycle (status, generate, load ... swap, cache)."""
    sub.add_parser("status", parents=[json_flag], help="supervisor and per-model state")
    g = sub.add_parser("generate", parents=[json_flag], help="stream a generation")
    g.add_argument("model")
    g.add_argument("prompt")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--chat", action="store_true", help="send the prompt through the chat template")
    for name in ("load", "unload"):
        c = sub.add_parser(name, parents=[json_flag], help=f"{name} a model")
        c.add_argument("model")
        if name == "load":
            c.add_argument("--wait", dest="no_wait", action="store_false", default=False,
                           help="follow the model until READY or a failure code (the default)")
            c.add_argument("--no-wait", dest="no_wait", action="store_true", help="return once the load has started")
            c.add_argument("-q", "--quiet", action="store_true", help="print nothing; the exit status says it")
            c.add_argument("--force", action="store_true", help="load even if the registry knows it failed here")
    h = sub.add_parser("history", parents=[json_flag], help="crash records of a model, newest first")
    h.add_argument("model")
    h.add_argument("--limit", type=int, default=20)
    r = sub.add_parser("release", parents=[json_flag], help="lift a quarantine and start the model again")
    r.add_argument("model")
    rb = sub.add_parser("rollback", parents=[json_flag], help="run a known revision (default: last-known-good)")
    rb.add_argument("model")
    rb.add_argument("revision", nargs="?")
    sub.add_parser("reload", parents=[json_flag], help="re-read the config file (like SIGHUP)")
    sw = sub.add_parser("swap", parents=[json_flag], help="NEW takes over OLD's requests (NEW READY first if memory allows)")
    sw.add_argument("old")
    sw.add_argument("new")
    cc = sub.add_parser("cache", parents=[json_flag], help="the prefix KV cache: `cache clear [MODEL]`")
    cc.add_argument("action", choices=["clear"])
    cc.add_argument("model", nargs="?", help="one model (default: every model)")


def _add_snapshot_commands(sub: argparse._SubParsersAction, json_flag: argparse.ArgumentParser) -> None:
    """Commands about snapshots on disk and what can run them (probe, repair, compat, verify, import-gguf)."""
    pr = sub.add_parser("probe", parents=[json_flag], help="admit, load and canary a snapshot in a throwaway worker")
    pr.add_argument("path")
    rp = sub.add_parser("repair", parents=[json_flag], help="fetch missing/corrupt files from the model's mirror or hub")
    rp.add_argument("model")
    cp = sub.add_parser("compat", parents=[json_flag], help="the compatibility registry: models x backends")
    cp.add_argument("--markdown", action="store_true", help="a markdown table")
    v = sub.add_parser("verify", parents=[json_flag], help="check a model's (or a path's) snapshot, every finding")
    v.add_argument("target", help="model id, or a snapshot directory")
    i = sub.add_parser("import-gguf", parents=[json_flag], help="write an MLX snapshot from a llama GGUF")
    i.add_argument("gguf")
    i.add_argument("dest")


def _add_observe_commands(sub: argparse._SubParsersAction, json_flag: argparse.ArgumentParser) -> None:
    """The commands that watch the supervisor without changing it (events, metrics)."""
    ev = sub.add_parser("events", parents=[json_flag], help="follow lifecycle events (state changes, crashes, ...)")
    ev.add_argument("prefix", nargs="*", help="only events whose name starts with one of these (e.g. model.)")
    ev.add_argument("--model", help="only this model's events")
    ev.add_argument("--count", type=int, help="exit after this many events")
    ev.add_argument("--idle-timeout", type=float, help="fail (exit 1) when no event comes within this many seconds")
    sub.add_parser("metrics", parents=[json_flag], help="Prometheus metrics (text exposition)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmxctl", description="Operate lmx-supervisor.")
    p.add_argument("--state-dir", help="supervisor state dir (default: LMX_STATE_DIR or platform)")
    p.add_argument("--endpoint", help="control endpoint URL, e.g. tcp://host:5555 with CURVE keys (overrides "
                   f"--state-dir; env {keys.ENV_ENDPOINT})")
    keys.add_global_options(p)
    p.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds")
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="command", required=True)
    # The order of the groups is the order of `lmxctl --help` and of the completion scripts.
    _add_model_commands(sub, json_flag)
    _add_snapshot_commands(sub, json_flag)
    _add_observe_commands(sub, json_flag)
    logview.add_parser(sub, json_flag)
    completion.add_parser(sub)
    service.add_parser(sub, json_flag)
    keys.add_parser(sub, json_flag)
    return p


async def _run(args: argparse.Namespace) -> int:
    client = SupervisorClient(state_dir=args.state_dir, timeout_s=args.timeout, **keys.client_options(args))
    try:
        return await COMMANDS[args.command](client, args)
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "import-gguf":
        return _import_gguf(args)
    if args.command == "completion":
        print(completion.script(_parser(), args.shell), end="")
        return EXIT_OK
    if args.command == "logs":
        return logview.main(args)
    if args.command == "service":
        return service.main(args)
    if args.command == "keys":
        return keys.main(args)
    try:
        return asyncio.run(_run(args))
    except E.LmxError as exc:
        if getattr(args, "json", False):
            _print_json(_error_obj(exc))
        else:
            print(f"lmxctl: {exc.code.code}: {exc.message}", file=sys.stderr)
            step = view.next_step(exc.code.code, getattr(args, "model", None))
            if step:
                print(f"next: {step}", file=sys.stderr)
        return EXIT_UNREACHABLE if exc.code is E.ErrorCode.SUPERVISOR_UNAVAILABLE else EXIT_FAILED
    except KeyFileError as exc:
        print(f"lmxctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
