"""Fetching for `lmxctl repair` (the operation is supervisor/operations/repair.py): only the missing
or corrupt files of a snapshot, from its source — a configured local mirror directory, or the Hugging
Face hub (repo id + revision, only when downloads are enabled) — after checking free disk against the
bytes needed, each written atomically (temp file + rename)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Protocol

from protocol import errors as E
from supervisor.admission.snapshot import Finding

_REPAIRABLE = (E.ErrorCode.SNAPSHOT_INCOMPLETE, E.ErrorCode.SNAPSHOT_CORRUPT, E.ErrorCode.CONFIG_INVALID)
# What a hub repo of an mlx-lm model may ship for its tokenizer; absent ones are skipped.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt")
_TEMP_DIR = ".lmx-repair"  # inside the snapshot: same filesystem, so the final rename is atomic

Progress = Callable[[str, int], None]  # (file name, bytes written so far in all)


class Source(Protocol):
    description: str

    def size(self, name: str) -> int | None:
        """The file's size at the source, or None when the source does not have it."""

    def tokenizer_names(self) -> list[str]: ...

    def fetch(self, name: str, into: Path) -> Path:
        """Write `name` somewhere under `into` (a temp dir on the snapshot's filesystem); return it."""


class MirrorSource:
    def __init__(self, mirror: Path) -> None:
        self.mirror = mirror
        self.description = f"mirror {mirror}"

    def size(self, name: str) -> int | None:
        p = self.mirror / name
        return p.stat().st_size if p.is_file() else None

    def tokenizer_names(self) -> list[str]:
        return [p.name for p in self.mirror.iterdir() if p.name.startswith("tokenizer")]

    def fetch(self, name: str, into: Path) -> Path:
        dest = into / name
        shutil.copyfile(self.mirror / name, dest)
        return dest


class HubSource:
    """huggingface_hub against `endpoint` (default: the library's, which honours HF_ENDPOINT). The
    revision is pinned by config, so a repair never pulls a newer upload than the one admitted."""

    def __init__(self, repo: str, revision: str, endpoint: str | None) -> None:
        self.repo, self.revision, self.endpoint = repo, revision, endpoint or None
        self.description = f"hub {repo}@{revision}" + (f" via {endpoint}" if endpoint else "")

    def size(self, name: str) -> int | None:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import EntryNotFoundError, RemoteEntryNotFoundError

        url = hf_hub_url(self.repo, name, revision=self.revision, endpoint=self.endpoint)
        try:
            return get_hf_file_metadata(url, endpoint=self.endpoint).size
        except (EntryNotFoundError, RemoteEntryNotFoundError):
            return None

    def tokenizer_names(self) -> list[str]:
        return list(_TOKENIZER_FILES)

    def fetch(self, name: str, into: Path) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(self.repo, name, revision=self.revision, local_dir=into,
                                    endpoint=self.endpoint))


def wanted_files(snapshot: Path, findings: list[Finding], source: Source) -> dict[str, int]:
    """The files the findings name that the source can supply, with their sizes there. A missing
    tokenizer names no file: then the source's tokenizer files that the snapshot lacks."""
    wanted: dict[str, int] = {}
    for f in findings:
        if f.code not in _REPAIRABLE:
            continue
        candidates = [n.strip() for n in f.file.split(",")]
        if f.message.startswith("no tokenizer file"):
            candidates = [n for n in source.tokenizer_names() if not (snapshot / n).exists()]
        for name in candidates:
            if name and name not in wanted and "/" not in name and not name.startswith("."):
                size = source.size(name)
                if size is not None:
                    wanted[name] = size
    return wanted


def fetch(snapshot: Path, source: Source, wanted: dict[str, int], progress: Progress | None = None) -> int:
    """Blocking: fetch `wanted` into the snapshot; returns bytes written. Refuses before writing
    anything when the disk cannot hold them."""
    need = sum(wanted.values())
    free = shutil.disk_usage(snapshot).free
    if need > free:
        raise E.SnapshotIncomplete(f"repair needs {need:,} bytes, {free:,} free on {snapshot}",
                                   need_bytes=need, free_bytes=free)
    tmp = snapshot / _TEMP_DIR
    done = 0
    try:
        tmp.mkdir(exist_ok=True)
        for name, size in wanted.items():
            got = source.fetch(name, tmp)
            os.replace(got, snapshot / name)  # atomic: a reader sees the old file or the whole new one
            done += size
            if progress:
                progress(name, done)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return done


def source_for(model, supervisor) -> Source:  # (ModelConfig, SupervisorSettings)
    """The mirror when one is configured, else the hub when the model names a repo and revision and
    downloads are enabled; else a BAD_REQUEST that says what to configure."""
    if model.mirror:
        return MirrorSource(Path(model.mirror))
    if model.hub_repo:
        if not supervisor.hub_downloads:
            raise E.BadRequest(f"model {model.id} names hub repo {model.hub_repo}, but downloads are off: "
                               "set supervisor.hub_downloads = true to repair from the hub")
        return HubSource(model.hub_repo, model.hub_revision or "", supervisor.hub_endpoint)
    raise E.BadRequest(f"model {model.id} has no repair source: configure mirror, or hub_repo + hub_revision")
