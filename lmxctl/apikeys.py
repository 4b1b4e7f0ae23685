"""`lmxctl keys api new|list|revoke`: the gateway's API keys (gateway/apikeys.py), in the state dir
the gateway reads them from. `new` prints the key once: only its digest is stored."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from gateway import apikeys
from protocol import endpoint as ep


def add_parser(ksub: Any, json_flag: argparse.ArgumentParser) -> None:
    api = ksub.add_parser("api", help="API keys for lmx-gateway (stored hashed in the state dir)")
    asub = api.add_subparsers(dest="api_command", required=True)
    new = asub.add_parser("new", parents=[json_flag], help="create a key; it is printed once")
    new.add_argument("name")
    new.add_argument("--model", action="append", default=[], metavar="ID",
                     help="a model it may use (repeatable; default: every model)")
    new.add_argument("--scope", action="append", choices=apikeys.SCOPES, default=[],
                     help="inference (default) and/or admin (the gateway's /metrics)")
    new.add_argument("--rpm", type=int, help="requests per minute (default: no limit)")
    new.add_argument("--tpm", type=int, help="tokens per minute, prompt and completion (default: no limit)")
    new.add_argument("--concurrency", type=int, help="requests at once (default: no limit)")
    new.add_argument("--priority", choices=apikeys.PRIORITIES, default="interactive")
    asub.add_parser("list", parents=[json_flag], help="the keys (never the keys themselves)")
    revoke = asub.add_parser("revoke", parents=[json_flag], help="revoke a key (the gateway stops taking it within 1 s)")
    revoke.add_argument("name")


def _positive(name: str, v: int | None) -> int | None:
    if v is not None and v < 1:
        raise apikeys.KeyStoreError(f"--{name} must be at least 1")
    return v


def main(args: argparse.Namespace) -> int:
    path = apikeys.path_in(ep.resolve_state_dir(args.state_dir))
    try:
        if args.api_command == "new":
            entry, key = apikeys.create(
                path, args.name, models=tuple(args.model), scopes=tuple(args.scope or ["inference"]),
                requests_per_minute=_positive("rpm", args.rpm), tokens_per_minute=_positive("tpm", args.tpm),
                concurrency=_positive("concurrency", args.concurrency), priority=args.priority)
            if args.json:
                print(json.dumps({**entry.public(), "key": key}))
            else:
                print(key)
                print(f"created key {entry.name!r} (id {entry.key_id}); it is shown only now", file=sys.stderr)
            return 0
        if args.api_command == "list":
            keys = [k.public() for k in apikeys.read(path).values()]
            if args.json:
                print(json.dumps(keys))
            for k in keys if not args.json else ():
                limits = ", ".join(f"{n}={k[n]}" for n in ("requests_per_minute", "tokens_per_minute", "concurrency")
                                   if k[n] is not None) or "no limits"
                print(f"{k['name']}\t{k['key_id']}\t{','.join(k['scopes'])}\t{','.join(k['models']) or '*'}\t"
                      f"{k['priority']}\t{limits}")
            return 0
        if not apikeys.revoke(path, args.name):
            print(f"lmxctl keys api: no key named {args.name!r}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps({"revoked": args.name}))
        return 0
    except (apikeys.KeyStoreError, OSError) as exc:
        print(f"lmxctl keys api: {exc}", file=sys.stderr)
        return 1
