"""Repair: fetch only the missing or corrupt files of a snapshot from its configured local mirror,
after checking free disk, each written atomically (temp file + rename), then verify again."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from protocol import errors as E
from supervisor.snapshot import Finding

_REPAIRABLE = (E.ErrorCode.SNAPSHOT_INCOMPLETE, E.ErrorCode.SNAPSHOT_CORRUPT, E.ErrorCode.CONFIG_INVALID)


def wanted_files(findings: list[Finding], mirror: Path) -> list[str]:
    """The files the findings name that the mirror can supply (a finding may name several)."""
    names: list[str] = []
    for f in findings:
        if f.code not in _REPAIRABLE:
            continue
        candidates = [n.strip() for n in f.file.split(",")]
        if f.message.startswith("no tokenizer file"):
            candidates = [p.name for p in mirror.iterdir() if p.name.startswith("tokenizer")]
        names += [n for n in candidates if n and (mirror / n).is_file() and n not in names]
    return names


def fetch(snapshot: Path, mirror: Path, names: list[str]) -> int:
    """Blocking: copy `names` from the mirror; returns bytes written. Refuses before writing anything
    when the disk cannot hold them."""
    need = sum((mirror / n).stat().st_size for n in names)
    free = shutil.disk_usage(snapshot).free
    if need > free:
        raise E.SnapshotIncomplete(f"repair needs {need:,} bytes, {free:,} free on {snapshot}",
                                   need_bytes=need, free_bytes=free)
    for name in names:
        tmp = snapshot / f".{name}.lmx-repair"
        shutil.copyfile(mirror / name, tmp)
        os.replace(tmp, snapshot / name)  # atomic: a reader sees the old file or the whole new one
    return need
