"""`lmxctl service`: the rendered plist and unit, key by key; install/uninstall into a temp HOME (the
manager commands printed, or run against stand-in launchctl/systemctl); the real daemon started from the
rendered command line serves a request and exits 0 on SIGTERM."""

from __future__ import annotations

import json
import os
import plistlib
import pwd
import shlex
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from protocol.syncclient import SyncSupervisorClient
from lmxctl import cli, service
from supervisor import config as cfg_mod
from tests.harness import REPO, TEST_SUPERVISOR, render_config, wait_until, workers_of

pytestmark = pytest.mark.timeout(120)

FAKE_TOOL = """#!/bin/sh
# A stand-in launchctl/systemctl: logs its arguments; "running" is a file.
echo "$(basename "$0") $*" >> "$FAKE_DIR/calls"
case "$*" in
  *print*|*is-active*|*" status "*) [ -e "$FAKE_DIR/running" ] && exit 0; exit 3 ;;
  *bootout*|*disable*) rm -f "$FAKE_DIR/running" ;;
  *bootstrap*|*"enable --now"*|*restart*) touch "$FAKE_DIR/running" ;;
esac
exit 0
"""


@pytest.fixture(autouse=True)
def home(monkeypatch: pytest.MonkeyPatch):
    """A temp HOME; nothing from the caller's environment steers where files go. Short, under /tmp:
    the default state dir inside it must leave room for a unix socket path (104 bytes on macOS)."""
    with tempfile.TemporaryDirectory(prefix="lmx-svc-", dir="/tmp") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        monkeypatch.setenv("HOME", str(home))
        for name in ("XDG_CONFIG_HOME", "XDG_STATE_HOME", "LMX_STATE_DIR", "LMX_CONFIG", "SUDO_USER"):
            monkeypatch.delenv(name, raising=False)
        yield home


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "lmx.toml"
    path.write_text(render_config([{"id": "tiny", "path": str(tmp_path / "snapshot")}],
                                  {"supervisor": {"drain_grace_s": 40.0, "stop_timeout_s": 7.0}}))
    return path


@pytest.fixture
def fake_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """launchctl and systemctl stand-ins first on PATH; returns their dir (calls log, running flag)."""
    fake = tmp_path / "fake"
    fake.mkdir()
    for tool in ("launchctl", "systemctl"):
        (fake / tool).write_text(FAKE_TOOL)
        (fake / tool).chmod(0o755)
    monkeypatch.setenv("FAKE_DIR", str(fake))
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    return fake


def lmxctl(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(["service", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def calls(fake: Path) -> list[str]:
    path = fake / "calls"
    return path.read_text().splitlines() if path.exists() else []


def unprivileged_user() -> str:
    """Us, unless we are root (a container): then some account that is neither root nor nobody
    (systemd-analyze calls User=nobody unsafe)."""
    me = pwd.getpwuid(os.getuid())
    if me.pw_uid != 0:
        return me.pw_name
    return next(p.pw_name for p in pwd.getpwall() if 0 < p.pw_uid < 65534 and p.pw_name != "nobody")


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*"))


# --- the plist ----------------------------------------------------------------------------------

def test_plist_renders_on_linux_with_every_key_typed_and_set(capsys, config: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    rc, out, _ = lmxctl(capsys, "render", "--kind", "launchd", "--config", str(config), "--state-dir", str(state))
    assert rc == 0
    plist = plistlib.loads(out.encode())
    assert plist["Label"] == "local.lmx-supervisor"
    argv = plist["ProgramArguments"]
    assert all(isinstance(a, str) for a in argv)
    # stderr gets errors only: launchd writes it to a file nobody rotates (the state dir's log is full)
    assert argv[1:] == ["run", "--config", str(config.resolve()), "--state-dir", str(state),
                        "--stderr-level", "error"]
    assert os.path.isabs(argv[0]) and os.access(argv[0], os.X_OK), argv[0]  # never a bare `python`
    assert Path(argv[0]).name in ("lmx-supervisor", "python", "python3") and Path(argv[0]).exists()
    assert Path(argv[3]).is_file() and os.path.isabs(argv[5])
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert type(plist["ThrottleInterval"]) is int and plist["ThrottleInterval"] >= 10
    assert type(plist["ExitTimeOut"]) is int and plist["ExitTimeOut"] > 40.0 + 7.0
    assert plist["ExitTimeOut"] >= 40 + 3 * 7  # the drain, then every rung of the stop ladder
    assert plist["ProcessType"] in ("Interactive", "Standard") and plist["ProcessType"] != "Background"
    assert plist["StandardOutPath"] == str(state / "logs" / "launchd.stdout.log")
    assert plist["StandardErrorPath"] == str(state / "logs" / "launchd.stderr.log")
    env = plist["EnvironmentVariables"]
    assert env["LMX_STATE_DIR"] == str(state)
    assert env["PATH"].split(":")[0] == os.path.dirname(argv[0]) and "/usr/bin" in env["PATH"].split(":")
    for limits in ("SoftResourceLimits", "HardResourceLimits"):
        assert plist[limits] == {"NumberOfFiles": 8192}
    assert "UserName" not in plist
    assert set(plist) <= set(service.PLIST_TYPES)


def test_exit_timeout_follows_the_config_and_falls_back_to_defaults(capsys, tmp_path: Path) -> None:
    slow = tmp_path / "slow.toml"
    slow.write_text("[supervisor]\ndrain_grace_s = 300\nstop_timeout_s = 20\n")
    rc, out, _ = lmxctl(capsys, "render", "--kind", "launchd", "--config", str(slow), "--state-dir", str(tmp_path))
    assert rc == 0 and plistlib.loads(out.encode())["ExitTimeOut"] == 300 + 3 * 20 + service.STOP_MARGIN_S
    broken = tmp_path / "broken.toml"
    broken.write_text("[supervisor]\nno_such_key = 1\n")
    rc, out, err = lmxctl(capsys, "render", "--kind", "systemd", "--config", str(broken))
    assert rc == 0 and "does not load" in err
    defaults = cfg_mod.SupervisorSettings()
    timeout = int(service.parse_unit(out)["Service"]["TimeoutStopSec"][0])
    assert timeout > defaults.drain_grace_s + defaults.stop_timeout_s
    # ... and install will not put a service that would crash-loop on exit 78 in place.
    rc, _, err = lmxctl(capsys, "install", "--kind", "systemd", "--config", str(broken), "--no-start")
    assert rc == 1 and "does not load" in err


def test_launch_daemon_variant_runs_as_a_user_in_the_system_domain(capsys, config: Path) -> None:
    user = unprivileged_user()
    pw = pwd.getpwnam(user)
    rc, out, _ = lmxctl(capsys, "install", "--kind", "launchd", "--system", "--user-name", user,
                        "--config", str(config), "--dry-run", "--json")
    assert rc == 0
    report = json.loads(out)
    assert report["path"] == "/Library/LaunchDaemons/local.lmx-supervisor.plist"
    plist = plistlib.loads(report["content"].encode())
    assert plist["UserName"] == user
    assert plist["EnvironmentVariables"]["HOME"] == pw.pw_dir
    state = f"{pw.pw_dir}/Library/Application Support/lmx-supervisor"
    assert plist["ProgramArguments"][-4:-2] == ["--state-dir", state]
    assert [c["argv"] for c in report["commands"] if not c["ran"]] == [
        ["launchctl", "enable", "system/local.lmx-supervisor"],
        ["launchctl", "bootstrap", "system", "/Library/LaunchDaemons/local.lmx-supervisor.plist"],
    ]
    assert not Path(state).exists()
    # Removing one needs no account name: only the path and the domain.
    rc, out, _ = lmxctl(capsys, "uninstall", "--kind", "launchd", "--system", "--dry-run", "--json")
    assert rc == 0 and json.loads(out)["path"] == "/Library/LaunchDaemons/local.lmx-supervisor.plist"


def test_systemd_system_unit_runs_as_a_user_from_multi_user_target(capsys, config: Path) -> None:
    user = unprivileged_user()
    rc, out, _ = lmxctl(capsys, "install", "--kind", "systemd", "--system", "--user-name", user,
                        "--config", str(config), "--dry-run", "--json")
    assert rc == 0
    report = json.loads(out)
    assert report["path"] == "/etc/systemd/system/lmx-supervisor.service"
    sections = service.parse_unit(report["content"])
    assert sections["Service"]["User"] == [user]
    assert sections["Install"]["WantedBy"] == ["multi-user.target"]
    assert [c["argv"] for c in report["commands"] if not c["ran"]] == [
        ["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", "lmx-supervisor.service"]]


def test_dry_run_prints_the_launchctl_commands_and_writes_nothing(capsys, config: Path, home: Path) -> None:
    rc, out, _ = lmxctl(capsys, "install", "--kind", "launchd", "--config", str(config), "--dry-run")
    assert rc == 0
    uid = os.getuid()
    plist_path = home / "Library" / "LaunchAgents" / "local.lmx-supervisor.plist"
    assert f"would run: launchctl enable gui/{uid}/local.lmx-supervisor" in out
    assert f"would run: launchctl bootstrap gui/{uid} {plist_path}" in out
    assert f"would write {plist_path}" in out and "<key>KeepAlive</key>" in out
    assert files_under(home) == []
    rc, out, _ = lmxctl(capsys, "uninstall", "--kind", "launchd", "--dry-run")
    assert rc == 0 and "not installed" in out


# --- the systemd unit ---------------------------------------------------------------------------

def verify_with_systemd_analyze(unit: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    run = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    if "Failed to initialize manager" in output:
        pytest.skip(f"systemd-analyze cannot run here: {output.strip()[:200]}")
    assert run.returncode == 0 and unit.name not in output, output


def test_systemd_user_unit_installs_into_the_temp_home(capsys, config: Path, home: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    unit = home / ".config" / "systemd" / "user" / "lmx-supervisor.service"
    args = ("install", "--kind", "systemd", "--config", str(config), "--state-dir", str(state))
    rc, out, _ = lmxctl(capsys, *args, "--dry-run")
    assert rc == 0 and f"would write {unit}" in out
    assert "would run: systemctl --user daemon-reload" in out
    assert "would run: systemctl --user enable --now lmx-supervisor.service" in out
    assert files_under(home) == [] and not state.exists()

    rc, out, _ = lmxctl(capsys, *args, "--no-start")
    assert rc == 0 and f"wrote {unit}" in out
    assert oct(unit.stat().st_mode & 0o777) == "0o644"
    assert oct(state.stat().st_mode & 0o777) == "0o700" and (state / "logs").is_dir()
    sections = service.parse_unit(unit.read_text())
    svc = sections["Service"]
    argv = shlex.split(svc["ExecStart"][0])
    assert os.path.isabs(argv[0]) and os.access(argv[0], os.X_OK)
    # everything on stderr: journald collects and rotates it
    assert argv[1:] == ["run", "--config", str(config.resolve()), "--state-dir", str(state)]
    assert svc["Restart"] == ["on-failure"] and int(svc["RestartSec"][0]) >= 1
    assert int(svc["TimeoutStopSec"][0]) > 40 + 7
    assert svc["KillMode"] == ["mixed"] and svc["KillSignal"] == ["SIGTERM"]
    assert f"LMX_STATE_DIR={state}" in svc["Environment"]
    assert svc["LimitNOFILE"] == ["8192"]
    assert svc["StandardOutput"] == ["journal"] and svc["StandardError"] == ["journal"]
    assert sections["Install"]["WantedBy"] == ["default.target"]
    verify_with_systemd_analyze(unit)


def test_xdg_config_home_moves_the_unit(capsys, config: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    rc, out, _ = lmxctl(capsys, "install", "--kind", "systemd", "--config", str(config), "--dry-run", "--json")
    assert rc == 0
    assert json.loads(out)["path"] == str(tmp_path / "xdg" / "systemd" / "user" / "lmx-supervisor.service")


def test_a_path_with_spaces_and_specifiers_survives_the_unit(capsys, tmp_path: Path) -> None:
    odd = tmp_path / "my 100% $HOME dir"
    odd.mkdir()
    config = odd / "lmx.toml"
    config.write_text("")
    rc, out, _ = lmxctl(capsys, "render", "--kind", "systemd", "--config", str(config), "--state-dir", str(odd / "s"))
    assert rc == 0
    line = service.parse_unit(out)["Service"]["ExecStart"][0]
    assert shlex.split(line.replace("%%", "%").replace("$$", "$"))[3] == str(config)


# --- refusing, replacing, removing --------------------------------------------------------------

def test_refuses_to_replace_an_installed_copy_without_force(capsys, config: Path, home: Path, tmp_path: Path) -> None:
    base = ("install", "--kind", "systemd", "--config", str(config), "--no-start")
    assert lmxctl(capsys, *base, "--state-dir", str(tmp_path / "one"))[0] == 0
    unit = home / ".config" / "systemd" / "user" / "lmx-supervisor.service"
    before = unit.read_text()
    rc, out, _ = lmxctl(capsys, *base, "--state-dir", str(tmp_path / "one"))
    assert rc == 0 and "up to date" in out  # the same file again: nothing to do
    rc, _, err = lmxctl(capsys, *base, "--state-dir", str(tmp_path / "two"))
    assert rc == 1 and "--force" in err and unit.read_text() == before
    rc, _, _ = lmxctl(capsys, *base, "--state-dir", str(tmp_path / "two"), "--force")
    assert rc == 0 and str(tmp_path / "two") in unit.read_text()


def test_refuses_to_install_over_a_running_copy_without_force(capsys, config: Path, fake_tools: Path) -> None:
    (fake_tools / "running").touch()
    rc, _, err = lmxctl(capsys, "install", "--kind", "systemd", "--config", str(config))
    assert rc == 1 and "is running" in err
    assert calls(fake_tools) == ["systemctl --user is-active lmx-supervisor.service"]
    rc, out, _ = lmxctl(capsys, "install", "--kind", "systemd", "--config", str(config), "--dry-run")
    assert rc == 1 and "would run" not in out  # a dry run gives the same verdict
    rc, out, _ = lmxctl(capsys, "install", "--kind", "systemd", "--config", str(config), "--force")
    assert rc == 0
    assert calls(fake_tools)[-3:] == ["systemctl --user daemon-reload",
                                      "systemctl --user enable --now lmx-supervisor.service",
                                      "systemctl --user restart lmx-supervisor.service"]
    assert "$ systemctl --user restart lmx-supervisor.service" in out


def test_launchd_install_replace_and_uninstall_run_the_right_commands(capsys, config: Path, home: Path,
                                                                     fake_tools: Path) -> None:
    uid, label = os.getuid(), "local.lmx-supervisor"
    plist = home / "Library" / "LaunchAgents" / f"{label}.plist"
    rc, out, _ = lmxctl(capsys, "install", "--kind", "launchd", "--config", str(config))
    assert rc == 0 and plistlib.loads(plist.read_bytes())["Label"] == label
    assert calls(fake_tools) == [f"launchctl print gui/{uid}/{label}", f"launchctl enable gui/{uid}/{label}",
                                 f"launchctl bootstrap gui/{uid} {plist}"]
    assert f"$ launchctl bootstrap gui/{uid} {plist}" in out
    rc, out, _ = lmxctl(capsys, "status", "--kind", "launchd")
    assert rc == 0 and "running: yes" in out
    rc, _, err = lmxctl(capsys, "install", "--kind", "launchd", "--config", str(config), "--label", label,
                        "--state-dir", str(home / "elsewhere"))
    assert rc == 1 and "--force" in err
    (fake_tools / "calls").unlink()
    rc, _, _ = lmxctl(capsys, "install", "--kind", "launchd", "--config", str(config), "--force",
                      "--state-dir", str(home / "elsewhere"))
    assert rc == 0
    assert [c for c in calls(fake_tools) if "print" not in c] == [
        f"launchctl bootout gui/{uid}/{label}", f"launchctl enable gui/{uid}/{label}",
        f"launchctl bootstrap gui/{uid} {plist}"]  # drained and unloaded before the new definition loads
    (fake_tools / "calls").unlink()
    rc, out, _ = lmxctl(capsys, "uninstall", "--kind", "launchd", "--json")
    assert rc == 0 and not plist.exists()
    assert calls(fake_tools) == [f"launchctl print gui/{uid}/{label}", f"launchctl bootout gui/{uid}/{label}"]
    assert json.loads(out)["files"] == [{"path": str(plist), "action": "remove", "done": True}]
    rc, out, _ = lmxctl(capsys, "status", "--kind", "launchd")
    assert rc == 1 and "not installed" in out


def test_systemd_uninstall_disables_then_removes(capsys, config: Path, home: Path, fake_tools: Path) -> None:
    assert lmxctl(capsys, "install", "--kind", "systemd", "--config", str(config))[0] == 0
    unit = home / ".config" / "systemd" / "user" / "lmx-supervisor.service"
    rc, out, _ = lmxctl(capsys, "uninstall", "--kind", "systemd", "--dry-run")
    assert rc == 0 and "would run: systemctl --user disable --now lmx-supervisor.service" in out
    assert unit.exists()
    (fake_tools / "calls").unlink()
    rc, _, _ = lmxctl(capsys, "uninstall", "--kind", "systemd")
    assert rc == 0 and not unit.exists()
    assert calls(fake_tools) == ["systemctl --user is-active lmx-supervisor.service",
                                 "systemctl --user disable --now lmx-supervisor.service",
                                 "systemctl --user daemon-reload"]


def test_a_missing_manager_fails_unless_told_to_only_write(capsys, config: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    rc, _, err = lmxctl(capsys, "install", "--kind", "launchd", "--config", str(config))
    assert rc == 1 and "launchctl not found" in err
    rc, _, _ = lmxctl(capsys, "install", "--kind", "launchd", "--config", str(config), "--no-start")
    assert rc == 0


@pytest.mark.parametrize("argv", [
    ("install", "--user-name", "nobody", "--config", "x.toml"),  # a user name belongs to --system
    ("install", "--system", "--config", "x.toml"),  # --system without an account to run as
    ("install", "--system", "--user-name", "root", "--config", "x.toml"),
    ("render", "--kind", "systemd"),  # no config
    ("render", "--kind", "launchd", "--label", "a/b", "--config", "x.toml"),
])
def test_usage_errors_exit_2(capsys, argv: tuple[str, ...]) -> None:
    assert lmxctl(capsys, *argv, "--dry-run" if argv[0] == "install" else "--json")[0] == 2


EXAMPLES = {"agent.plist.example": ("launchd", False), "daemon.plist.example": ("launchd", True),
            "systemd-user.service.example": ("systemd", False)}


def example(name: str) -> bytes:
    """What install renders, with placeholder paths and the default config."""
    kind, system = EXAMPLES[name]
    home = Path("/Users/you") if kind == "launchd" else Path("/home/you")
    state = home / ("Library/Application Support" if kind == "launchd" else ".local/state") / "lmx-supervisor"
    argv = ("/opt/lmx-supervisor/.venv/bin/lmx-supervisor", "run", "--config", str(home / "lmx.toml"),
            "--state-dir", str(state), *(("--stderr-level", "error") if kind == "launchd" else ()))
    t = service.Target(kind, system, service.DEFAULT_LABEL[kind], "you", 501, 20, home, Path(os.devnull), argv,
                       state, service.stop_budget_s(cfg_mod.SupervisorSettings()))
    return service.render(t)


def write_examples() -> None:
    for name in EXAMPLES:
        (REPO / "launchd" / name).write_bytes(example(name))


def test_the_reference_copies_in_launchd_match_what_install_renders() -> None:
    for name in EXAMPLES:
        assert (REPO / "launchd" / name).read_bytes() == example(name), (
            f"launchd/{name} is stale; rewrite with: "
            ".venv/bin/python -c 'from tests.test_service import write_examples; write_examples()'")


# --- the real daemon, from the rendered command line --------------------------------------------

def test_the_daemon_started_from_the_rendered_program_arguments_serves_and_exits_0(
        capsys, tmp_path: Path, home: Path, tiny_model: Path) -> None:
    config = tmp_path / "lmx.toml"
    config.write_text(render_config([{"id": "tiny", "path": str(tiny_model)}], {"supervisor": TEST_SUPERVISOR}))
    state = tmp_path / "state"
    rc, _, _ = lmxctl(capsys, "install", "--kind", "launchd", "--config", str(config), "--state-dir", str(state),
                      "--no-start")
    assert rc == 0
    plist = plistlib.loads((home / "Library" / "LaunchAgents" / "local.lmx-supervisor.plist").read_bytes())
    # As launchd would: its small environment plus the plist's, cwd /, output to the plist's paths.
    env = {"HOME": str(home), "USER": pwd.getpwuid(os.getuid()).pw_name, **plist["EnvironmentVariables"]}
    with open(plist["StandardOutPath"], "ab") as out, open(plist["StandardErrorPath"], "ab") as err:
        proc = subprocess.Popen(plist["ProgramArguments"], env=env, cwd="/", stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err)
    client = None
    try:
        wait_until(lambda: (state / "control.sock").exists() or proc.poll() is not None, 30, "the control socket")
        assert proc.poll() is None, Path(plist["StandardErrorPath"]).read_text()[-2000:]
        client = SyncSupervisorClient(state_dir=state, timeout_s=60.0)
        wait_until(lambda: client.status()["models"][0]["state"] == "READY", 90, "tiny READY")
        result = client.complete("tiny", "Hello", max_tokens=4)
        assert result.usage["completion_tokens"] >= 1 and result.finish_reason in ("length", "stop")
        client.close()
        client = None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not workers_of(state)
        assert '"event": "supervisor.stopped"' in (state / "logs" / "supervisor.log").read_text()
        assert '"level": "info"' not in Path(plist["StandardErrorPath"]).read_text()  # errors only there
    finally:
        if client is not None:
            client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in workers_of(state):
            os.kill(pid, signal.SIGKILL)
