"""`lmx-supervisor run`: the daemon in the foreground, as launchd runs it."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from protocol import endpoint as ep
from supervisor import config as cfg, logs
from supervisor.daemon import EXIT_SOFTWARE, EXIT_STORE_UNAVAILABLE, Supervisor
from supervisor.persistence.statedir import prepare_state_dir, StateDirError
from supervisor.persistence.storeguard import StoreUnavailable

EXIT_CONFIG = 78  # EX_CONFIG: launchd/systemd see a real failure, not a clean stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmx-supervisor")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the supervisor in the foreground")
    run.add_argument("--config", default=os.environ.get("LMX_CONFIG"), help="TOML config file")
    run.add_argument("--state-dir", default=None, help="state dir (default: LMX_STATE_DIR or platform)")
    run.add_argument("--log-level", default="info")
    run.add_argument("--stderr-level", default="debug",
                     choices=["debug", "info", "warning", "error", "critical", "off"],
                     help="what of the log also goes to stderr (the state dir's log gets everything); "
                          "launchd's plist uses error, since nobody rotates its StandardErrorPath")
    args = parser.parse_args(argv)

    state_dir = ep.resolve_state_dir(args.state_dir)
    if not args.config:
        print("lmx-supervisor: --config FILE is required (or set LMX_CONFIG)", file=sys.stderr)
        return 2
    try:
        config = cfg.load(args.config)
    except cfg.ConfigError as exc:
        print(f"lmx-supervisor: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        lock_fd = prepare_state_dir(state_dir)
    except (StateDirError, OSError) as exc:
        print(f"lmx-supervisor: {exc}", file=sys.stderr)
        return 1
    logs.configure(state_dir, args.log_level, stderr_level=args.stderr_level,
                   max_bytes=config.supervisor.log_max_bytes,
                   backups=config.supervisor.log_backups)
    try:
        return asyncio.run(Supervisor(config, state_dir).run())
    except StoreUnavailable as exc:  # never start from an empty store while the real one exists
        log = logs.get()
        log.critical("store.unavailable", path=str(exc.path), reason=exc.reason, error=exc.detail,
                     exit_code=EXIT_STORE_UNAVAILABLE)
        print(f"lmx-supervisor: refusing to start: {exc}", file=sys.stderr)
        return EXIT_STORE_UNAVAILABLE
    except Exception as exc:  # never a clean-looking exit after a failure: the manager must restart us
        logs.get().critical("supervisor.fatal", task="main", error=repr(exc),
                            exc_info=(type(exc), exc, exc.__traceback__))
        print(f"lmx-supervisor: fatal: {exc!r}", file=sys.stderr)
        return EXIT_SOFTWARE
    finally:
        os.close(lock_fd)


if __name__ == "__main__":
    raise SystemExit(main())
