"""`lmx-gateway`: parse arguments, bind the listening socket, run the app on uvicorn until SIGTERM."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import logging
import resource
import signal
import socket
import sys
import time

import structlog
import uvicorn

from gateway import apikeys
from gateway.app import GatewayConfig, create_app
from gateway.connections import ConnectionLimits, protocol_class
from protocol import endpoint as ep

EXIT_OK, EXIT_USAGE, EXIT_BIND = 0, 2, 3  # argparse exits 2 on a usage error too


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmx-gateway", description="OpenAI-compatible HTTP gateway over lmx-supervisor.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1). Anything but loopback needs API keys "
                        "(lmxctl keys api new NAME), or --no-auth")
    p.add_argument("--no-auth", action="store_true",
                   help="listen beyond loopback without API keys (only behind something that authenticates)")
    p.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one (printed)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--state-dir", default=None, help="the supervisor's state dir (else LMX_STATE_DIR, else "
                                                         "the platform default)")
    where.add_argument("--endpoint", default=None, help="the supervisor's control endpoint, e.g. ipc:///path/control.sock")
    p.add_argument("--request-timeout-s", type=float, default=300.0, help="deadline of each generation")
    p.add_argument("--require-model", action="append", default=[], metavar="ID",
                   help="/readyz: these models must be READY (repeatable; default: every model that should run)")
    p.add_argument("--drain-grace-s", type=float, default=5.0,
                   help="on SIGTERM, how long responses in flight may finish before they are cancelled")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="a browser origin allowed to call the gateway, e.g. http://localhost:5173 (repeatable; "
                        "CORS is off without it)")
    p.add_argument("--responses-max-count", type=int, default=10_000, metavar="N",
                   help="stored Responses (store: true) kept in <state-dir>/gateway/responses.sqlite; the oldest go first")
    p.add_argument("--responses-max-age-days", type=float, default=30.0, metavar="DAYS",
                   help="stored Responses older than this are dropped")
    d = ConnectionLimits()
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="open connections at once; past it a new one gets 503 (default %(default)s)")
    p.add_argument("--max-header-bytes", type=int, default=d.max_header_bytes,
                   help="a request line and headers; past it 431 (default %(default)s)")
    p.add_argument("--header-timeout-s", type=float, default=d.header_timeout_s,
                   help="a request's headers must arrive within this; past it 408 (default %(default)s)")
    p.add_argument("--keep-alive-s", type=float, default=d.keep_alive_s,
                   help="an idle kept-alive connection is closed after this (default %(default)s)")
    p.add_argument("--body-timeout-s", type=float, default=GatewayConfig.body_timeout_s,
                   help="a request's body must arrive within this after its headers (default %(default)s)")
    p.add_argument("--max-in-flight", type=int, default=GatewayConfig.max_in_flight,
                   help="requests served at once; past it 429 with Retry-After (default %(default)s)")
    p.add_argument("--access-log", action="store_true", help="one uvicorn access-log line per request")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


class _UvicornJSON(logging.Formatter):
    """uvicorn's own records as JSON lines like ours: an access line (--access-log) as
    `gateway.access` with its fields, anything else uvicorn says as `uvicorn` with its message."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + "Z", "level": record.levelname.lower()}
        args = record.args if isinstance(record.args, tuple) else ()
        if record.name == "uvicorn.access" and len(args) == 5:
            client, method, path, version, status = args
            out.update(event="gateway.access", client=str(client), method=method, path=str(path)[:512],
                       http_version=version, status=status)
        else:
            out.update(event="uvicorn", message=record.getMessage()[:2000])
        return json.dumps(out)


def _configure_logging(level: str) -> None:
    """JSON lines on stderr, like the supervisor's; uvicorn's too (uvicorn's own logging config is
    not used: main passes log_config=None)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("lmx")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    uv = logging.StreamHandler(sys.stderr)
    uv.setFormatter(_UvicornJSON())
    uv.formatter.converter = time.gmtime  # type: ignore[union-attr]
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [uv] if name != "uvicorn.error" else []
        logger.setLevel(level.upper())
        logger.propagate = name == "uvicorn.error"  # to "uvicorn", whose handler writes it once
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
                    structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
    )


def _bind(host: str, port: int) -> socket.socket:
    # We bind, not uvicorn, so that --port 0 has a port to print before the first request.
    # proto must say TCP: asyncio sets TCP_NODELAY only on sockets that do, and without it Nagle
    # holds each response's body behind its headers until the client's delayed ACK (40 ms).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _auth_problem(args: argparse.Namespace) -> str | None:
    """Beyond loopback, the gateway starts only with API keys to require (or --no-auth)."""
    if _loopback(args.host) or args.no_auth:
        return None
    try:
        keys = apikeys.read(apikeys.path_in(ep.resolve_state_dir(args.state_dir)))
    except apikeys.KeyStoreError as exc:
        return f"cannot read the API keys: {exc}"
    if not keys:
        return (f"refusing to listen on {args.host} without API keys: create one with `lmxctl keys api new NAME`, "
                f"or pass --no-auth if something in front of the gateway authenticates")
    return None


def _raise_fd_limit(connections: int) -> None:
    """Each connection is a descriptor, and the supervisor socket, logs and the responses store a few
    more: raise the soft limit toward what --max-connections needs (never past the hard limit),
    so the connection cap, not EMFILE, is what a crowd of clients meets."""
    need = connections + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if now != resource.RLIM_INFINITY and now < need:
        structlog.get_logger("lmx.gateway").warning("gateway.fd_limit_low", soft=now, needed=need)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _configure_logging(args.log_level)
    config = GatewayConfig(endpoint=args.endpoint, state_dir=args.state_dir, request_timeout_s=args.request_timeout_s,
                           required_models=tuple(args.require_model), cors_origins=tuple(args.cors_origin),
                           responses_max_count=args.responses_max_count,
                           responses_max_age_s=args.responses_max_age_days * 86_400.0,
                           body_timeout_s=args.body_timeout_s, max_in_flight=args.max_in_flight)
    limits = ConnectionLimits(max_connections=args.max_connections, max_header_bytes=args.max_header_bytes,
                              header_timeout_s=args.header_timeout_s, keep_alive_s=args.keep_alive_s)
    _raise_fd_limit(limits.max_connections)
    problem = _auth_problem(args)
    if problem:
        print(f"lmx-gateway: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if not _loopback(args.host) and not args.no_auth:
        config = dataclasses.replace(config, auth_required=True)
    try:
        sock = _bind(args.host, args.port)
    except OSError as exc:
        print(f"lmx-gateway: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return EXIT_BIND
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    # One line on stdout, the only one: scripts and tests read the URL from it.
    print(f"lmx-gateway listening on http://{url_host}:{port}", flush=True)
    server = uvicorn.Server(uvicorn.Config(
        create_app(config), log_level=args.log_level, access_log=args.access_log, lifespan="on", log_config=None,
        timeout_graceful_shutdown=args.drain_grace_s, http=protocol_class(limits),
        timeout_keep_alive=max(1, round(limits.keep_alive_s)),
    ))
    # uvicorn handles SIGINT/SIGTERM: stop accepting, let responses in flight end (those still
    # running after --drain-grace-s are cancelled, which cancels their generations), run the
    # lifespan's exit.
    # Then it raises the signal again for the handler it found; with these no-ops a stop on
    # request is exit 0 (launchd and scripts read anything else as a failure).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
