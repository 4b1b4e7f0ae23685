"""Where `lmxctl service` puts the service and for whom: the manager, the account, the file's path,
then the daemon command line and stop budget it runs with."""

from __future__ import annotations

import argparse
import dataclasses
import os
import pwd
import sys
from pathlib import Path

from lmxctl.servicefile import DEFAULT_LABEL, Target, UsageError, daemon_argv, stop_budget_s
from protocol import endpoint as ep
# The stop budget comes from the daemon's own config parser, so the unit waits as long as the daemon drains.
from supervisor import config as cfg_mod

def place(args: argparse.Namespace, need_user: bool = True) -> Target:
    """Which manager, whose service, where its file goes. `need_user`: --system must name the account
    it runs as (uninstall and status only need the path)."""
    kind = args.kind or {"darwin": "launchd", "linux": "systemd"}.get(sys.platform)
    if kind is None:
        raise UsageError(f"no service manager known for {sys.platform}; pass --kind launchd|systemd")
    if args.user_name and not args.system:
        raise UsageError("--user-name goes with --system (a user agent/unit runs as you)")
    if args.system:
        name = args.user_name or os.environ.get("SUDO_USER")
        if not name and not need_user:
            name = pwd.getpwuid(os.getuid()).pw_name
        if not name:
            raise UsageError("--system needs --user-name NAME: the account the supervisor runs as")
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise UsageError(f"no such user {name!r}") from None
        if pw.pw_uid == 0 and need_user:
            raise UsageError("refusing to run the supervisor as root: name an unprivileged --user-name")
        home = Path(pw.pw_dir)
    else:
        pw = pwd.getpwuid(os.getuid())
        home = Path.home()  # honours HOME
    label = args.label or DEFAULT_LABEL[kind]
    if not label or not all(c.isalnum() or c in "-_." for c in label):
        raise UsageError(f"--label: letters, digits, '-', '_', '.' only, got {label!r}")
    if kind == "launchd":
        folder = Path("/Library/LaunchDaemons") if args.system else home / "Library" / "LaunchAgents"
        path = folder / f"{label}.plist"
    elif args.system:
        path = Path("/etc/systemd/system") / f"{label}.service"
    else:
        xdg = os.environ.get("XDG_CONFIG_HOME")
        path = (Path(xdg) if xdg else home / ".config") / "systemd" / "user" / f"{label}.service"
    return Target(kind, bool(args.system), label, pw.pw_name, pw.pw_uid, pw.pw_gid, home, path)


def _state_dir(t: Target, explicit: str | None) -> Path:
    if explicit:
        return Path(os.path.abspath(os.path.expanduser(explicit)))
    if not t.system:
        return Path(os.path.abspath(ep.default_state_dir()))  # LMX_STATE_DIR, else this platform's default
    if t.kind == "launchd":
        return t.home / "Library" / "Application Support" / "lmx-supervisor"
    return t.home / ".local" / "state" / "lmx-supervisor"


def complete(t: Target, args: argparse.Namespace) -> tuple[Target, cfg_mod.ConfigError | None]:
    """Add what the service runs; a config that does not load leaves the default stop budget."""
    config = args.config or os.environ.get("LMX_CONFIG")
    if not config:
        raise UsageError("--config FILE is required (or set LMX_CONFIG)")
    config_path = Path(config).expanduser().resolve()
    state_dir = _state_dir(t, args.service_state_dir or getattr(args, "state_dir", None))
    try:
        settings, error = cfg_mod.load(config_path).supervisor, None
    except cfg_mod.ConfigError as exc:
        settings, error = cfg_mod.SupervisorSettings(), exc
    return dataclasses.replace(t, argv=daemon_argv(config_path, state_dir, t.kind), state_dir=state_dir,
                               stop_budget_s=stop_budget_s(settings)), error
