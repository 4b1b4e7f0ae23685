"""`lmxctl keys new NAME [--dir DIR]`: a CURVE keypair for the tcp control endpoint (the server's,
or a client's to list under [[clients]]); and the lmxctl options that pick the keys of a session."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from lmxctl import apikeys
from protocol.keys import KeyFileError, new_keypair

ENV_SERVER_KEY = "LMX_SERVER_KEY"  # the server's public .key file
ENV_CLIENT_CERT = "LMX_CLIENT_CERT"  # this client's .key_secret file
ENV_ENDPOINT = "LMX_ENDPOINT"


def add_global_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server-key", default=os.environ.get(ENV_SERVER_KEY),
                   help=f"tcp endpoint: the server's public key file (.key; env {ENV_SERVER_KEY})")
    p.add_argument("--client-cert", default=os.environ.get(ENV_CLIENT_CERT),
                   help=f"tcp endpoint: this client's secret key file (.key_secret; env {ENV_CLIENT_CERT})")


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """SupervisorClient keyword arguments for the session's endpoint and keys."""
    endpoint = args.endpoint or os.environ.get(ENV_ENDPOINT) or None
    opts: dict[str, Any] = {"endpoint": endpoint}
    if args.server_key or args.client_cert:
        opts.update(server_key_file=args.server_key, client_cert=args.client_cert)
    return opts


def add_parser(sub: Any, json_flag: argparse.ArgumentParser) -> None:
    k = sub.add_parser("keys", help="CURVE keys for the tcp control endpoint; API keys for lmx-gateway")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    new = ksub.add_parser("new", parents=[json_flag], help="write NAME.key (public) and NAME.key_secret (0600)")
    new.add_argument("name")
    new.add_argument("--dir", default=".", help="where to write them (default: the current directory)")
    apikeys.add_parser(ksub, json_flag)


def main(args: argparse.Namespace) -> int:
    if args.keys_command == "api":
        return apikeys.main(args)
    try:
        public_file, secret_file, public = new_keypair(args.name, args.dir)
    except (KeyFileError, OSError) as exc:
        print(f"lmxctl keys: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"name": args.name, "public_key": public, "public_key_file": str(public_file),
                          "secret_key_file": str(secret_file)}))
    else:
        print(public)
        print(f"wrote {public_file} (public: list it under [[clients]], or give it to clients if this is the "
              f"server's) and {secret_file} (secret, 0600: never copy it anywhere)", file=sys.stderr)
    return 0
