"""Path confinement: what a snapshot directory may contain, and (with `supervisor.model_roots`) where
model paths may lead. Paths resolve with symlinks followed; FIFOs, devices and sockets are refused
wherever they sit in a snapshot, since opening one blocks the reader or reads something else.
A kernel module (stdlib only): the config checks model paths at load, admission and remote
placement check them again at use."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

# A snapshot is a few dozen files; a tree this large is not one (and walking it must stay cheap).
MAX_ENTRIES = 10_000
MAX_DEPTH = 8
_INDEX = "model.safetensors.index.json"
_MAX_INDEX_BYTES = 64 * 1024 * 1024
_SPECIAL = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
            (stat.S_ISSOCK, "a socket"))


class Refused(Exception):
    """A path the supervisor will not use: `name` is the offending entry, relative to the snapshot."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name, self.problem = name, problem


def real_roots(roots: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return tuple(os.path.realpath(os.path.expanduser(r)) for r in roots)


def within(real: str, roots: tuple[str, ...]) -> bool:
    """`real` (already resolved) is one of `roots` (resolved) or below one."""
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def special(mode: int) -> str | None:
    return next((what for test, what in _SPECIAL if test(mode)), None)


def check_path(path: str, roots: tuple[str, ...]) -> str:
    """The resolved path; Refused when it leads outside every root (roots empty: anywhere)."""
    if "\x00" in path:
        raise Refused(path[:200], "contains a NUL byte")
    real = os.path.realpath(os.path.expanduser(path))
    if roots and not within(real, real_roots(roots)):
        raise Refused(path, f"resolves to {real}, outside supervisor.model_roots {list(roots)}")
    return real


def check_tree(top: str | os.PathLike, roots: tuple[str, ...] = ()) -> None:
    """Every entry below `top`: no FIFO, device or socket (through symlinks too); with roots, no
    symlink that leads out of them; no index naming a shard outside the snapshot. A missing `top`
    passes (admission reports SNAPSHOT_NOT_FOUND)."""
    top = Path(top)
    try:
        mode = os.stat(top).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    what = special(mode)
    if what:
        raise Refused(str(top), f"is {what}, not a snapshot directory")
    if not stat.S_ISDIR(mode):
        return
    resolved = real_roots(roots)
    seen = {os.path.realpath(top)}
    stack: list[tuple[Path, str, int]] = [(top, "", 0)]
    count = 0
    while stack:
        directory, prefix, depth = stack.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    count += 1
                    if count > MAX_ENTRIES:
                        raise Refused(str(top), f"holds more than {MAX_ENTRIES} entries: not a snapshot")
                    name = prefix + entry.name
                    sub = _check_entry(Path(entry.path), name, resolved)
                    if sub is not None and sub not in seen and depth < MAX_DEPTH:
                        seen.add(sub)
                        stack.append((Path(entry.path), name + "/", depth + 1))
        except OSError as exc:
            raise Refused(prefix.rstrip("/") or str(top), f"unreadable: {exc.strerror or exc}") from None
    _check_index(top)


def config_problems(roots: tuple[str, ...], models: tuple) -> list[tuple[str, str]]:
    """(key, problem) for each model path or mirror that model_roots refuses, at config load."""
    problems = [("supervisor.model_roots", f"expected absolute paths, got {r!r}") for r in roots
                if not os.path.isabs(os.path.expanduser(r))]
    if problems or not roots:
        return problems
    for i, m in enumerate(models):
        for key in ("path", "mirror"):
            value = getattr(m, key)
            if not value:
                continue
            try:
                check_tree(check_path(value, roots), roots)
            except Refused as exc:
                problems.append((f"models[{i}].{key}", str(exc)))
    return problems


def _check_entry(path: Path, name: str, roots: tuple[str, ...]) -> str | None:
    """Refused for a bad entry; the resolved path of a directory to descend into, else None."""
    lmode = os.lstat(path).st_mode
    what = special(lmode)
    if what:
        raise Refused(name, f"is {what}")
    if stat.S_ISLNK(lmode):
        real = os.path.realpath(path)
        if roots and not within(real, roots):
            raise Refused(name, f"is a symlink to {real}, outside supervisor.model_roots")
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return None  # dangling: the snapshot checks report a missing blob
        what = special(mode)
        if what:
            raise Refused(name, f"is a symlink to {what} ({real})")
        return real if stat.S_ISDIR(mode) else None
    return os.path.realpath(path) if stat.S_ISDIR(lmode) else None


def _check_index(top: Path) -> None:
    """The index names shard files the supervisor opens: plain names inside the snapshot only."""
    index = top / _INDEX
    try:
        if not index.is_file() or index.stat().st_size > _MAX_INDEX_BYTES:
            return
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (OSError, ValueError, AttributeError):
        return  # unreadable: the snapshot checks report it
    if not isinstance(weight_map, dict):
        return
    for shard in {str(s) for s in weight_map.values()}:
        parts = Path(shard).parts
        if not parts or os.path.isabs(shard) or ".." in parts or "\x00" in shard:
            raise Refused(_INDEX, f"names shard {shard[:200]!r} outside the snapshot")
