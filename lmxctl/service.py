"""`lmxctl service`: the launchd plist / systemd unit that runs the daemon — rendered, checked, installed."""

from __future__ import annotations

import argparse
import json
import os
import plistlib
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lmxctl.servicefile import (  # noqa: F401  (some are re-exported for tests)
    DEFAULT_LABEL,
    PLIST_TYPES,
    RESTART_DELAY_S,
    STOP_MARGIN_S,
    Target,
    UsageError,
    check,
    parse_unit,
    render,
    stop_budget_s,
)
from lmxctl.servicetarget import complete, place

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
QUERY_TIMEOUT_S = 30.0  # launchctl print / systemctl is-active
COMMAND_TIMEOUT_S = 600.0  # bootout / disable --now wait for the drain (ExitTimeOut / TimeoutStopSec)


# --- running commands, writing files ------------------------------------------------------------

class Report:
    """Says every command and file as it goes (or, with --json, once at the end, as one object)."""

    def __init__(self, as_json: bool, dry_run: bool = False, notes_to: Any = None) -> None:
        self.as_json, self.dry_run, self.notes_to = as_json, dry_run, notes_to
        self.data: dict[str, Any] = {"ok": True, "dry_run": dry_run, "commands": [], "files": [], "notes": []}

    def say(self, text: str, stream: Any = None) -> None:
        if not self.as_json:
            print(text, file=stream or sys.stdout, flush=True)

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.say(f"note: {text}", self.notes_to)

    def fail(self, message: str) -> int:
        self.data.update(ok=False, error=message)
        self.say(f"lmxctl service: {message}", sys.stderr)
        return EXIT_FAILED

    def run(self, argv: list[str], query: bool = False, echo: bool = False) -> subprocess.CompletedProcess:
        """Run one command (a read-only query runs in a dry run too); echo its output when it changed
        something, failed, or was asked for."""
        line = shlex.join(argv)
        if self.dry_run and not query:
            self.data["commands"].append({"argv": argv, "ran": False})
            self.say(f"would run: {line}")
            return subprocess.CompletedProcess(argv, 0, "", "")
        self.say(f"$ {line}")
        exe = shutil.which(argv[0])
        try:
            if exe is None:
                raise FileNotFoundError(f"{argv[0]}: not found")
            proc = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                  timeout=QUERY_TIMEOUT_S if query else COMMAND_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            proc = subprocess.CompletedProcess(argv, 127, "", str(exc))
        output = (proc.stdout + proc.stderr).strip()
        self.data["commands"].append({"argv": argv, "ran": True, "rc": proc.returncode, "output": output[-4000:]})
        if output and (echo or not query):
            self.say("\n".join(f"  {x}" for x in output.splitlines()))
        return proc

    def run_all(self, commands: list[list[str]]) -> bool:
        for argv in commands:
            if self.run(argv).returncode != 0:
                self.fail(f"`{shlex.join(argv)}` failed (exit {self.data['commands'][-1]['rc']})")
                return False
        return True

    def mkdir(self, path: Path, owner: tuple[int, int] | None) -> None:
        if path.is_dir():
            return
        self.data["files"].append({"path": str(path), "action": "mkdir", "done": not self.dry_run})
        if self.dry_run:
            self.say(f"would create {path}/ (0700)")
            return
        path.mkdir(mode=0o700, parents=True)
        if owner:
            os.chown(path, *owner)
        self.say(f"created {path}/")

    def write(self, path: Path, data: bytes, root_owned: bool) -> None:
        self.data["files"].append({"path": str(path), "action": "write", "bytes": len(data),
                                   "done": not self.dry_run})
        if self.dry_run:
            self.say(f"would write {path} ({len(data)} bytes):\n{data.decode()}")
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # launchd refuses a plist that is group/world-writable
        if root_owned:
            os.chown(tmp, 0, 0)
        os.replace(tmp, path)  # never a half-written file where the manager looks
        self.say(f"wrote {path} ({len(data)} bytes)")

    def remove(self, path: Path) -> None:
        if not path.exists():
            return
        self.data["files"].append({"path": str(path), "action": "remove", "done": not self.dry_run})
        if self.dry_run:
            self.say(f"would remove {path}")
            return
        path.unlink()
        self.say(f"removed {path}")


# --- the manager --------------------------------------------------------------------------------

def _tool(t: Target) -> str:
    return "launchctl" if t.kind == "launchd" else "systemctl"


def _systemctl(t: Target) -> list[str]:
    return ["systemctl"] if t.system else ["systemctl", "--user"]


def query_running(t: Target, report: Report, echo: bool = False) -> bool | None:
    """launchd: loaded (`launchctl print` succeeds); systemd: active. None: cannot tell here."""
    if shutil.which(_tool(t)) is None:
        report.note(f"{_tool(t)} not found: cannot tell whether {t.label} is running")
        return None
    argv = ["launchctl", "print", t.service_target] if t.kind == "launchd" else [*_systemctl(t), "is-active", t.unit]
    proc = report.run(argv, query=True, echo=echo)
    if proc.returncode == 0:
        return True
    if "Failed to connect to bus" in proc.stderr:
        report.note(f"no systemd {'system' if t.system else 'user'} manager reachable: cannot tell whether "
                    f"{t.unit} is running")
        return None
    return False


def _wait_unloaded(t: Target, report: Report, timeout_s: float) -> bool:
    """bootout can return before launchd has forgotten the job, and bootstrapping a label that is
    still being torn down fails: poll `launchctl print` until it no longer knows it."""
    report.say(f"waiting for launchd to unload {t.service_target}")
    deadline = time.monotonic() + timeout_s
    argv = [shutil.which("launchctl") or "launchctl", "print", t.service_target]
    while subprocess.run(argv, capture_output=True, timeout=QUERY_TIMEOUT_S).returncode == 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def start_commands(t: Target, was_running: bool) -> list[list[str]]:
    if t.kind == "launchd":  # RunAtLoad starts it; enable clears an earlier `launchctl disable`
        return [["launchctl", "enable", t.service_target], ["launchctl", "bootstrap", t.domain, str(t.path)]]
    commands = [[*_systemctl(t), "daemon-reload"], [*_systemctl(t), "enable", "--now", t.unit]]
    if was_running:  # enable --now leaves a running unit on its old definition
        commands.append([*_systemctl(t), "restart", t.unit])
    return commands


def stop_commands(t: Target) -> list[list[str]]:
    if t.kind == "launchd":  # SIGTERM, ExitTimeOut for the drain, then SIGKILL
        return [["launchctl", "bootout", t.service_target]]
    return [[*_systemctl(t), "disable", "--now", t.unit]]  # SIGTERM, TimeoutStopSec, then SIGKILL


def _describe(t: Target) -> dict[str, Any]:
    return {"kind": t.kind, "system": t.system, "label": t.label, "user": t.user_name, "path": str(t.path),
            "target": t.service_target if t.kind == "launchd" else t.unit}


def _linger_note(t: Target, report: Report) -> None:
    if t.kind == "systemd" and not t.system and not Path(f"/var/lib/systemd/linger/{t.user_name}").exists():
        report.note(f"user services stop when {t.user_name}'s last session ends; "
                    f"`loginctl enable-linger {t.user_name}` keeps this one running")


# --- commands -----------------------------------------------------------------------------------

def _preflight(t: Target, data: bytes, config_error: Exception | None, args: argparse.Namespace,
               report: Report) -> tuple[bool, bool | None] | int:
    """Refusals before anything changes; else (needs_start, running)."""
    problems, notes = check(t, data)
    for n in notes:
        report.note(n)
    if problems:
        return report.fail("the rendered file fails its checks: " + "; ".join(problems))
    if config_error is not None:
        if not args.force:
            return report.fail(f"the config does not load ({config_error}): the service would exit 78 and be "
                               f"restarted every {RESTART_DELAY_S}s; fix it, or --force")
        report.note(f"installing with a config that does not load: {config_error}")
    manage = not args.no_start
    if manage and not args.dry_run and shutil.which(_tool(t)) is None:
        return report.fail(f"{_tool(t)} not found; --no-start writes the file without starting it")
    if t.system and not args.dry_run and os.geteuid() != 0:
        return report.fail(f"installing into {t.path.parent} needs root (sudo)")
    running = query_running(t, report)
    report.data["running"] = running
    if running is None and manage and not args.dry_run:
        return report.fail(f"cannot tell whether {t.label} runs; --no-start writes the file without starting it")
    existing = t.path.read_bytes() if t.path.exists() else None
    if existing == data and (running or not manage):
        report.say(f"{t.path} is up to date{' and running' if running else ''}; nothing to do")
        return EXIT_OK
    if (running or (existing is not None and existing != data)) and not args.force:
        what = "is running" if running else f"is installed at {t.path} with other content"
        return report.fail(f"{t.label} {what}; --force replaces it (a running copy is drained and stopped first)")
    return manage, running


def install(args: argparse.Namespace, report: Report) -> int:
    t, config_error = complete(place(args), args)
    data = render(t)
    report.data.update(_describe(t), content=data.decode(), command=list(t.argv))
    verdict = _preflight(t, data, config_error, args, report)
    if isinstance(verdict, int):
        return verdict
    manage, running = verdict
    if manage and running and t.kind == "launchd":
        if not report.run_all(stop_commands(t)):
            return EXIT_FAILED
        if not report.dry_run and not _wait_unloaded(t, report, t.stop_budget_s + 30):
            return report.fail(f"{t.service_target} still loaded after bootout")
    owner = (t.uid, t.gid) if t.system and os.geteuid() == 0 else None
    report.mkdir(t.state_dir, owner)  # prepare_state_dir wants it 0700 and ours
    report.mkdir(t.state_dir / "logs", owner)  # launchd opens StandardOutPath before the daemon runs
    report.write(t.path, data, root_owned=t.system and os.geteuid() == 0)
    if not manage:
        report.note(f"--no-start: {t.path} written, nothing started" + (" (the running copy keeps its old "
                    "definition until restarted)" if running else ""))
        return EXIT_OK
    if not report.run_all(start_commands(t, bool(running) and t.kind == "systemd")):
        return EXIT_FAILED
    _linger_note(t, report)
    return EXIT_OK


def uninstall(args: argparse.Namespace, report: Report) -> int:
    t = place(args, need_user=False)
    report.data.update(_describe(t))
    if t.system and not args.dry_run and os.geteuid() != 0:
        return report.fail(f"removing {t.path} needs root (sudo)")
    manage = not args.no_stop
    if manage and not args.dry_run and shutil.which(_tool(t)) is None:
        return report.fail(f"{_tool(t)} not found; --no-stop removes the file without stopping anything")
    running = query_running(t, report)
    report.data["running"] = running
    if not t.path.exists() and not running:
        report.say(f"{t.label} is not installed ({t.path} absent)")
        return EXIT_OK
    if manage and (running is not False or t.kind == "systemd") and not report.run_all(stop_commands(t)):
        return EXIT_FAILED
    report.remove(t.path)
    if manage and t.kind == "systemd" and not report.run_all([[*_systemctl(t), "daemon-reload"]]):
        return EXIT_FAILED
    return EXIT_OK


def _installed_command(t: Target) -> list[str] | None:
    try:
        if t.kind == "launchd":
            return list(plistlib.loads(t.path.read_bytes()).get("ProgramArguments", []))
        exec_start = parse_unit(t.path.read_text()).get("Service", {}).get("ExecStart", [""])[0]
        return shlex.split(exec_start.replace("%%", "%").replace("$$", "$"))
    except (OSError, ValueError, plistlib.InvalidFileException):
        return None


def status(args: argparse.Namespace, report: Report) -> int:
    """Exit 0 when installed and running (launchd: loaded), 1 otherwise."""
    t = place(args, need_user=False)
    installed = t.path.exists()
    report.data.update(_describe(t), installed=installed, command=_installed_command(t) if installed else None)
    report.say(f"{t.kind} {'system' if t.system else 'user'} service {t.label}: "
               f"{'installed at ' + str(t.path) if installed else 'not installed (' + str(t.path) + ' absent)'}")
    running = query_running(t, report, echo=t.kind == "launchd")
    if t.kind == "systemd" and running is not None:
        report.run([*_systemctl(t), "status", "--no-pager", t.unit], query=True, echo=True)
    report.data["running"] = running
    report.say(f"running: {'unknown' if running is None else 'yes' if running else 'no'}")
    return EXIT_OK if installed and running else EXIT_FAILED


def render_command(args: argparse.Namespace, report: Report) -> int:
    t, config_error = complete(place(args), args)
    data = render(t)
    report.data.update(_describe(t), content=data.decode(), command=list(t.argv))
    if config_error is not None:
        report.note(f"the config does not load ({config_error}); ExitTimeOut/TimeoutStopSec use the defaults")
    problems, notes = check(t, data)
    for n in notes:
        report.note(n)
    if not report.as_json:
        sys.stdout.write(data.decode())
    return report.fail("; ".join(problems)) if problems else EXIT_OK


def add_parser(sub: Any, json_flag: argparse.ArgumentParser) -> None:
    svc = sub.add_parser("service", help="install lmx-supervisor as a launchd agent/daemon or systemd unit")
    verbs = svc.add_subparsers(dest="service_command", required=True)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--kind", choices=("launchd", "systemd"), help="default: launchd on macOS, systemd on Linux")
    where.add_argument("--system", action="store_true",
                       help="a LaunchDaemon (system domain) / system unit running as --user-name")
    where.add_argument("--user-name", help="with --system: the account it runs as (default: SUDO_USER)")
    where.add_argument("--label", help=f"launchd label / unit name (default: {', '.join(DEFAULT_LABEL.values())})")
    what = argparse.ArgumentParser(add_help=False)
    what.add_argument("--config", help="TOML config the daemon runs with (default: LMX_CONFIG)")
    what.add_argument("--state-dir", dest="service_state_dir", help="state dir (default: LMX_STATE_DIR or platform)")
    ins = verbs.add_parser("install", parents=[json_flag, where, what], help="render, check, write, start")
    ins.add_argument("--force", action="store_true", help="replace an installed or running copy")
    ins.add_argument("--dry-run", action="store_true", help="print the file and the commands; change nothing")
    ins.add_argument("--no-start", action="store_true", help="write the file; run no launchctl/systemctl command")
    un = verbs.add_parser("uninstall", parents=[json_flag, where], help="stop (with a drain) and remove")
    un.add_argument("--dry-run", action="store_true", help="print the commands; change nothing")
    un.add_argument("--no-stop", action="store_true", help="remove the file; run no launchctl/systemctl command")
    verbs.add_parser("status", parents=[json_flag, where], help="installed? running? (exit 0 only if both)")
    verbs.add_parser("render", parents=[json_flag, where, what], help="print the rendered plist/unit")


def main(args: argparse.Namespace) -> int:
    dry_run = getattr(args, "dry_run", False)
    report = Report(args.json, dry_run, notes_to=sys.stderr if args.service_command == "render" else None)
    handler = {"install": install, "uninstall": uninstall, "status": status, "render": render_command}
    try:
        rc = handler[args.service_command](args, report)
    except UsageError as exc:
        report.data.update(ok=False, error=str(exc))
        report.say(f"lmxctl service: {exc}", sys.stderr)
        rc = EXIT_USAGE
    except OSError as exc:
        rc = report.fail(str(exc))
    report.data["ok"] = rc == EXIT_OK
    if args.json:
        print(json.dumps(report.data, default=str))
    return rc

