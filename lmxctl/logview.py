"""`lmxctl logs`: read, filter and follow STATE_DIR/logs/supervisor.log and its rotated files.
Reads files only, so it works whether or not the daemon is running."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from protocol import endpoint as ep
# The daemon owns the log file's name; one constant, so reader and writer cannot drift apart.
from supervisor.logs import LOG_FILE

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
DEFAULT_LINES = 50  # without -f and without --since
DEFAULT_FOLLOW_LINES = 10  # -f: a little context, then what comes
POLL_S = 0.1
COLOURS = {"debug": "\033[2m", "info": "\033[36m", "warning": "\033[33m", "error": "\033[31m",
           "critical": "\033[1;31m"}
RESET = "\033[0m"
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SHOWN = ("ts", "level", "event", "model", "exception")  # placed by the line layout, not as key=value
_BARE = re.compile(r"^[^\s\"'=]+$")


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`30s`, `10m`, `2h`, `1d` back from now, or an ISO date/time (no zone: local time)."""
    m = _RELATIVE.match(text)
    if m:
        now = now or datetime.now(timezone.utc)
        return now - timedelta(seconds=float(m.group(1)) * _UNIT_S[m.group(2)])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since wants an ISO time (2024-05-01T12:00) or a duration (30s, 10m, 2h, 1d), not {text!r}") from None
    return when if when.tzinfo else when.astimezone()


def record_time(record: dict[str, Any]) -> datetime | None:
    ts = record.get("ts")
    try:
        if isinstance(ts, (int, float)) and not isinstance(ts, bool):
            return datetime.fromtimestamp(ts, timezone.utc)
        if isinstance(ts, str):
            when = datetime.fromisoformat(ts)
            return when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    except (ValueError, OverflowError, OSError):
        pass
    return None


def parse(line: str) -> dict[str, Any] | None:
    """The record on a log line, or None for a line that is not a JSON object."""
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


@dataclass(frozen=True)
class Filter:
    model: str | None = None
    min_level: str | None = None
    since: datetime | None = None

    def matches(self, line: str) -> bool:
        record = parse(line)
        if record is None:
            return True  # not ours to judge: shown as-is, so nothing in the file is ever hidden by accident
        if self.model is not None and record.get("model") != self.model:
            return False
        if self.min_level is not None:
            level = LEVELS.get(str(record.get("level", "info")).lower(), LEVELS["info"])
            if level < LEVELS[self.min_level]:
                return False
        if self.since is not None:
            when = record_time(record)
            if when is None or when < self.since:
                return False
        return True


def _value(v: Any) -> str:
    if isinstance(v, str) and _BARE.match(v):
        return v
    return json.dumps(v, default=str, ensure_ascii=False)


def format_line(line: str, colour: bool = False) -> str:
    """`HH:MM:SS.mmm LEVEL model event key=value ...` (local time); a traceback on the lines below."""
    record = parse(line)
    if record is None:
        return line
    when = record_time(record)
    clock = when.astimezone().strftime("%H:%M:%S.%f")[:-3] if when else "--:--:--.---"
    level = str(record.get("level", "info")).lower()
    shown = f"{level.upper():<7}"
    if colour and level in COLOURS:
        shown = f"{COLOURS[level]}{shown}{RESET}"
    fields = " ".join(f"{k}={_value(v)}" for k, v in record.items() if k not in _SHOWN)
    text = f"{clock} {shown} {record.get('model') or '-'} {record.get('event', '-')}"
    text += f" {fields}" if fields else ""
    if record.get("exception"):
        text += "\n" + "\n".join("    " + x for x in str(record["exception"]).rstrip("\n").splitlines())
    return text


def log_files(log_dir: Path) -> list[Path]:
    """supervisor.log and its rotated files, newest first (.1 is the most recent rotation)."""
    files = [log_dir / LOG_FILE]
    n = 1
    while (log_dir / f"{LOG_FILE}.{n}").exists():
        files.append(log_dir / f"{LOG_FILE}.{n}")
        n += 1
    return files


def _lines(data: bytes) -> list[str]:
    return [raw.decode("utf-8", "replace").rstrip("\r") for raw in data.split(b"\n") if raw.strip()]


def _starts_before(lines: list[str], since: datetime) -> bool:
    for line in lines:
        record = parse(line)
        when = record_time(record) if record else None
        if when is not None:
            return when < since
    return False


def history(log_dir: Path, filt: Filter, limit: int | None) -> tuple[list[str], IO[bytes] | None]:
    """Matching lines, oldest first (the last `limit` of them when given), and the current file
    left open at the point read up to, so that following continues without a gap or a repeat."""
    chunks: list[list[str]] = []
    found, current = 0, None
    for path in log_files(log_dir):
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            continue
        data = fh.read()
        cut = data.rfind(b"\n") + 1  # a half-written last line is left for the follower
        if path.name == LOG_FILE:
            fh.seek(cut)
            current = fh
        else:
            fh.close()
        lines = _lines(data[:cut] if path.name == LOG_FILE else data)
        chunks.append([x for x in lines if filt.matches(x)])
        found += len(chunks[-1])
        if limit is not None and found >= limit and filt.since is None:
            break
        if filt.since is not None and _starts_before(lines, filt.since):
            break  # every older file is older still
    out = [x for chunk in reversed(chunks) for x in chunk]
    if limit is not None:
        out = out[-limit:] if limit else []
    return out, current


def follow(path: Path, fh: IO[bytes] | None, poll_s: float = POLL_S) -> Iterator[str]:
    """Complete lines appended to `path`, forever. Survives rotation (a new inode: the old file
    is drained, then the new one is read from its start) and truncation (read again from 0)."""
    pending = b""
    while True:
        if fh is None:
            try:
                fh = open(path, "rb")
            except FileNotFoundError:
                time.sleep(poll_s)
                continue
        chunk = fh.read()
        if chunk:
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                if raw.strip():
                    yield raw.decode("utf-8", "replace").rstrip("\r")
            continue
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        if st is None or st.st_ino != os.fstat(fh.fileno()).st_ino:
            rest = pending + fh.read()  # what was written between our last read and the rename
            fh.close()
            fh, pending = None, b""
            for raw in rest.split(b"\n"):
                if raw.strip():
                    yield raw.decode("utf-8", "replace").rstrip("\r")
        elif st.st_size < fh.tell():
            fh.seek(0)
            pending = b""
        else:
            time.sleep(poll_s)


def add_parser(sub: Any, json_flag: argparse.ArgumentParser) -> None:
    lg = sub.add_parser("logs", parents=[json_flag], help="the supervisor's log, filtered (no daemon needed)")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing new lines (survives rotation)")
    lg.add_argument("--model", help="only this model's events")
    lg.add_argument("--level", choices=list(LEVELS), help="minimum level")
    lg.add_argument("--since", type=parse_since, help="ISO time, or a duration back from now: 30s, 10m, 2h, 1d")
    lg.add_argument("-n", "--lines", type=int, metavar="N", default=None,
                    help=f"the last N matching lines (default {DEFAULT_LINES}, {DEFAULT_FOLLOW_LINES} with -f, "
                         "all with --since)")


def _write(out: IO[str], lines: Iterable[str], raw: bool, colour: bool, filt: Filter | None = None,
           flush_each: bool = False) -> None:
    for line in lines:
        if filt is None or filt.matches(line):
            out.write((line if raw else format_line(line, colour)) + "\n")
            if flush_each:
                out.flush()
    out.flush()


def main(args: argparse.Namespace) -> int:
    """`lmxctl logs`: exit 0 on success and on Ctrl-C or a closed pipe, 1 when there is no log."""
    log_dir = ep.resolve_state_dir(args.state_dir) / "logs"
    filt = Filter(args.model, args.level, args.since)
    limit = args.lines
    if limit is None and args.since is None:
        limit = DEFAULT_FOLLOW_LINES if args.follow else DEFAULT_LINES
    if limit is not None and limit < 0:
        print("lmxctl logs: -n must be >= 0", file=sys.stderr)
        return 2
    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    fh = None
    try:
        lines, fh = history(log_dir, filt, limit)
        if fh is None and not lines and not args.follow:
            print(f"lmxctl logs: no log at {log_dir / LOG_FILE}", file=sys.stderr)
            return 1
        _write(sys.stdout, lines, args.json, colour)
        if args.follow:
            if fh is None:
                print(f"lmxctl logs: waiting for {log_dir / LOG_FILE}", file=sys.stderr)
            _write(sys.stdout, follow(log_dir / LOG_FILE, fh), args.json, colour, filt, flush_each=True)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep the interpreter's final flush
        # of stdout from raising again at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    finally:
        if fh is not None and not fh.closed:
            fh.close()
    return 0
