"""The service definition itself: the launchd plist and the systemd unit that run the daemon, rendered
for one target (manager, user, paths) and checked (plistlib / plutil, systemd-analyze), with the why
of each key in docs/service.md. `lmxctl/service.py` installs what this renders."""

from __future__ import annotations

import math
import os
import plistlib
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol import endpoint as ep
# The stop budget comes from the daemon's own settings, so the manager waits as long as the daemon drains.
from supervisor import config as cfg_mod

DEFAULT_LABEL = {"launchd": "local.lmx-supervisor", "systemd": "lmx-supervisor"}
RESTART_DELAY_S = 10  # ThrottleInterval / RestartSec: a crash loop costs one start per 10 s, not a spin
NOFILE = 8192  # launchd's default soft limit is 256: a busy ROUTER socket plus SQLite plus logs outgrow it
STOP_MARGIN_S = 15  # after the last rung: store close, context term, interpreter exit
QUERY_TIMEOUT_S = 30.0  # plutil / systemd-analyze
SOCKET_PATH_MAX = {"launchd": 103, "systemd": 107}  # sun_path: 104 bytes on macOS, 108 on Linux, NUL included
PLIST_TYPES: dict[str, type] = {
    "Label": str, "ProgramArguments": list, "RunAtLoad": bool, "KeepAlive": dict, "ThrottleInterval": int,
    "ExitTimeOut": int, "ProcessType": str, "StandardOutPath": str, "StandardErrorPath": str,
    "EnvironmentVariables": dict, "SoftResourceLimits": dict, "HardResourceLimits": dict, "UserName": str,
}
UNIT_KEYS = ("Type", "ExecStart", "Restart", "RestartSec", "TimeoutStopSec", "KillMode", "KillSignal",
             "LimitNOFILE", "StandardOutput", "StandardError", "Environment")


class UsageError(Exception):
    pass


@dataclass(frozen=True)
class Target:
    """One service definition: which manager, whose, where its file goes, and what it runs."""

    kind: str  # "launchd" | "systemd"
    system: bool  # LaunchDaemon / system unit running as user_name, else the user's agent / user unit
    label: str
    user_name: str
    uid: int
    gid: int
    home: Path
    path: Path  # where the plist / unit file is installed
    argv: tuple[str, ...] = ()  # the daemon's whole command line, absolute paths only
    state_dir: Path | None = None
    stop_budget_s: int = 0  # ExitTimeOut / TimeoutStopSec

    @property
    def domain(self) -> str:
        return "system" if self.system else f"gui/{self.uid}"

    @property
    def service_target(self) -> str:
        return f"{self.domain}/{self.label}"

    @property
    def unit(self) -> str:
        return f"{self.label}.service"


# --- what to run --------------------------------------------------------------------------------

def daemon_argv(config: Path, state_dir: Path, kind: str = "systemd") -> tuple[str, ...]:
    """The installed `lmx-supervisor` script beside this interpreter, else this interpreter with -m.
    sys.executable is not resolved: a venv's python is a symlink, and resolving it leaves the venv.
    Under launchd, stderr gets errors only: StandardErrorPath is a file nobody rotates, and the full
    log is in the state dir (rotated). journald rotates what systemd collects, so it gets it all."""
    python = os.path.abspath(sys.executable)
    script = os.path.join(os.path.dirname(python), "lmx-supervisor")
    head = [script] if os.access(script, os.X_OK) else [python, "-m", "supervisor.cli"]
    tail = ("--stderr-level", "error") if kind == "launchd" else ()
    return (*head, "run", "--config", str(config), "--state-dir", str(state_dir), *tail)


def stop_budget_s(settings: cfg_mod.SupervisorSettings) -> int:
    """Longest clean shutdown: every model drains (drain_grace_s) and then climbs the stop ladder
    (ask, SIGTERM, SIGKILL: stop_timeout_s each) concurrently with the others, plus a margin."""
    return math.ceil(settings.drain_grace_s + 3 * settings.stop_timeout_s) + STOP_MARGIN_S


def environment(t: Target) -> dict[str, str]:
    bin_dir = os.path.dirname(t.argv[0])  # the environment's bin/ first: worker_command names resolve there
    tail = ["/usr/local/bin", "/opt/homebrew/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"]
    if t.kind == "systemd":
        tail = ["/usr/local/bin", "/usr/bin", "/bin"]
    env = {"LMX_STATE_DIR": str(t.state_dir), "PATH": ":".join([bin_dir, *tail])}
    if t.system:
        env["HOME"] = str(t.home)
    return env


# --- rendering ----------------------------------------------------------------------------------

def plist_dict(t: Target) -> dict[str, Any]:
    logs = t.state_dir / "logs"
    d: dict[str, Any] = {
        "Label": t.label,
        "ProgramArguments": list(t.argv),
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},  # restart after a crash or a failure, not after a drain
        "ThrottleInterval": RESTART_DELAY_S,
        "ExitTimeOut": t.stop_budget_s,
        "ProcessType": "Interactive",  # Standard is lightly throttled, Background heavily: tokens are interactive
        "StandardOutPath": str(logs / "launchd.stdout.log"),
        "StandardErrorPath": str(logs / "launchd.stderr.log"),
        "EnvironmentVariables": environment(t),
        "SoftResourceLimits": {"NumberOfFiles": NOFILE},
        "HardResourceLimits": {"NumberOfFiles": NOFILE},
    }
    if t.system:
        d["UserName"] = t.user_name  # its primary group follows (launchd.plist(5): GroupName)
    return d


def render_plist(t: Target) -> bytes:
    return plistlib.dumps(plist_dict(t), fmt=plistlib.FMT_XML, sort_keys=False)


def _sd_quote(arg: str, dollar: bool = True) -> str:
    """One word for a systemd unit: % is a specifier, $ expands in ExecStart, quotes group words."""
    text = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    if dollar:
        text = text.replace("$", "$$")
    plain = arg and not any(c.isspace() or c in "\"'\\;" for c in arg)
    return text if plain else f'"{text}"'


def render_unit(t: Target) -> str:
    env = "".join(f"Environment={_sd_quote(f'{k}={v}', dollar=False)}\n" for k, v in environment(t).items())
    user = f"User={t.user_name}\n" if t.system else ""
    return (
        "# Rendered by `lmxctl service install`; docs/service.md says why each key is set as it is.\n"
        "[Unit]\nDescription=lmx-supervisor: MLX inference workers supervised over ZeroMQ\n\n"
        "[Service]\nType=exec\n"
        f"ExecStart={' '.join(_sd_quote(a) for a in t.argv)}\n{user}{env}"
        f"Restart=on-failure\nRestartSec={RESTART_DELAY_S}\nTimeoutStopSec={t.stop_budget_s}\n"
        # mixed: SIGTERM to the supervisor alone (it drains and stops its workers by the ladder);
        # the SIGKILL after TimeoutStopSec reaches the whole cgroup, workers' own sessions included.
        "KillMode=mixed\nKillSignal=SIGTERM\n"
        f"LimitNOFILE={NOFILE}\nStandardOutput=journal\nStandardError=journal\nSyslogIdentifier={t.label}\n\n"
        f"[Install]\nWantedBy={'multi-user.target' if t.system else 'default.target'}\n"
    )


def render(t: Target) -> bytes:
    return render_plist(t) if t.kind == "launchd" else render_unit(t).encode()


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """[Section] -> key -> every value (Environment= repeats)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


# --- checks -------------------------------------------------------------------------------------

def _common_problems(t: Target) -> list[str]:
    problems = []
    if not (os.path.isabs(t.argv[0]) and os.access(t.argv[0], os.X_OK)):
        problems.append(f"program {t.argv[0]} is not an absolute path to an executable")
    sock = str(t.state_dir / ep.WORKER_SOCKET)
    if len(sock.encode()) > SOCKET_PATH_MAX[t.kind]:
        problems.append(f"state dir too long for a unix socket path ({len(sock.encode())} > "
                        f"{SOCKET_PATH_MAX[t.kind]} bytes): {sock}")
    return problems


def check_plist(t: Target, data: bytes) -> tuple[list[str], list[str]]:
    """(problems, notes): plistlib round trip, key types, plutil -lint where there is one."""
    problems, notes = _common_problems(t), []
    parsed = plistlib.loads(data)
    if parsed != plist_dict(t):
        problems.append("the plist does not parse back to what was rendered")
    for key, value in parsed.items():
        kind = PLIST_TYPES.get(key)
        if kind is None or type(value) is not kind:
            problems.append(f"plist key {key}: unexpected key or type {type(value).__name__}")
    if parsed.get("ProcessType") not in ("Interactive", "Standard"):
        problems.append("ProcessType must not throttle the job (Interactive or Standard)")
    plutil = shutil.which("plutil")
    if plutil is None:
        notes.append("plutil not found: lint skipped (plistlib round trip only)")
        return problems, notes
    with tempfile.NamedTemporaryFile(suffix=".plist") as f:
        f.write(data)
        f.flush()
        lint = subprocess.run([plutil, "-lint", f.name], capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    if lint.returncode != 0:
        problems.append(f"plutil -lint: {(lint.stdout + lint.stderr).strip()}")
    else:
        notes.append("plutil -lint: OK")
    return problems, notes


def check_unit(t: Target, text: str) -> tuple[list[str], list[str]]:
    """(problems, notes): our own parse, then `systemd-analyze verify` where there is one."""
    problems, notes = _common_problems(t), []
    service = parse_unit(text).get("Service", {})
    problems += [f"unit lacks {key}=" for key in UNIT_KEYS if key not in service]
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        notes.append("systemd-analyze not found: verify skipped")
        return problems, notes
    with tempfile.TemporaryDirectory() as tmp:
        unit = Path(tmp) / t.unit
        unit.write_text(text)
        # System mode: --user needs a running user manager, which a build machine may not have.
        run = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    output = (run.stdout + run.stderr).strip()
    mine = [line for line in output.splitlines() if t.unit in line]
    if mine or (run.returncode != 0 and "Failed to initialize manager" not in output):
        problems.append(f"systemd-analyze verify: {output}")
    else:
        notes.append("systemd-analyze verify: " + ("OK" if run.returncode == 0 else "skipped: " + output[:200]))
    return problems, notes


def check(t: Target, data: bytes) -> tuple[list[str], list[str]]:
    return check_plist(t, data) if t.kind == "launchd" else check_unit(t, data.decode())
