"""Snapshot integrity, checked cheaply in the supervisor (headers, sizes, names; never whole weight
files, never mlx): every finding carries its error code and the file it names."""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from protocol import errors as E
from supervisor import confinement

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model", "vocab.json")
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.safetensors$")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors itself refuses headers above 100 MB


@dataclass(frozen=True)
class Finding:
    code: E.ErrorCode
    file: str
    message: str

    def to_dict(self) -> dict:
        return {"code": self.code.code, "file": self.file, "message": self.message}

    def to_exc(self, more: int = 0) -> E.LmxError:
        tail = f" (+{more} more findings: lmxctl verify)" if more else ""
        return E.error_class(self.code)(f"{self.file}: {self.message}{tail}", file=self.file)


def _config(root: Path, findings: list[Finding]) -> dict | None:
    path = root / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        findings.append(Finding(E.ErrorCode.SNAPSHOT_INCOMPLETE, "config.json", "missing"))
        return None
    except (OSError, ValueError) as exc:
        findings.append(Finding(E.ErrorCode.CONFIG_INVALID, "config.json", f"unparsable: {exc}"))
        return None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        findings.append(Finding(E.ErrorCode.CONFIG_INVALID, "config.json", "no model_type"))
        return None
    return config


def _header(path: Path, name: str, findings: list[Finding]) -> set[str] | None:
    """Tensor names of one safetensors file, after checking its header and exact length."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {n} does not fit in the file's {size} bytes")
            header = json.loads(f.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        findings.append(Finding(E.ErrorCode.SNAPSHOT_CORRUPT, name, f"unreadable safetensors header: {exc}"))
        return None
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        findings.append(Finding(E.ErrorCode.SNAPSHOT_CORRUPT, name,
                                f"size mismatch: expected {expected} bytes, found {size}"))
    return {k for k in header if k != "__metadata__"}


def _weights(root: Path, findings: list[Finding]) -> None:
    index_path = root / "model.safetensors.index.json"
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (OSError, ValueError, KeyError, AssertionError) as exc:
            findings.append(Finding(E.ErrorCode.SNAPSHOT_CORRUPT, index_path.name, f"unreadable index: {exc}"))
            return
        shards: dict[str, set[str]] = {}
        for tensor, shard in weight_map.items():
            shards.setdefault(str(shard), set()).add(tensor)
        missing = sorted(s for s in shards if not (root / s).is_file())
        if missing:
            m = _SHARD.search(missing[0])
            of = f" ({len(shards) - len(missing)} of {int(m.group(2))} shards present)" if m else ""
            findings.append(Finding(E.ErrorCode.SNAPSHOT_INCOMPLETE, ", ".join(missing), f"missing shard(s){of}"))
        for shard in sorted(set(shards) - set(missing)):
            names = _header(root / shard, shard, findings)
            absent = sorted(shards[shard] - names) if names is not None else []
            if absent:
                findings.append(Finding(E.ErrorCode.SNAPSHOT_CORRUPT, shard,
                                        f"{len(absent)} tensor(s) named by the index are not in it: {absent[:3]}"))
        return
    files = sorted(p.name for p in root.glob("*.safetensors"))
    if not files:
        findings.append(Finding(E.ErrorCode.SNAPSHOT_INCOMPLETE, "model.safetensors", "no weights found"))
    for name in files:
        _header(root / name, name, findings)


def _hub_cache(root: Path, findings: list[Finding]) -> None:
    """Hugging Face cache layouts: snapshots/<rev>/ links into ../../blobs, maybe half-downloaded."""
    for entry in sorted(root.iterdir()):
        if entry.is_symlink() and not entry.exists():
            findings.append(Finding(E.ErrorCode.SNAPSHOT_INCOMPLETE, entry.name,
                                    f"symlink to a missing blob {os.readlink(entry)}"))
    blobs = root.parent.parent / "blobs"
    if root.parent.name == "snapshots" and blobs.is_dir():
        for blob in sorted(blobs.glob("*.incomplete")):
            findings.append(Finding(E.ErrorCode.SNAPSHOT_INCOMPLETE, f"blobs/{blob.name}", "unfinished download"))


def verify(path: str | os.PathLike) -> list[Finding]:
    """Every finding, not just the first. Empty means the snapshot may be loaded."""
    root = Path(path)
    if not root.is_dir():
        return [Finding(E.ErrorCode.SNAPSHOT_NOT_FOUND, str(root), "model path does not exist")]
    try:  # before any open: a FIFO named config.json would block the supervisor forever
        confinement.check_tree(root)
    except confinement.Refused as exc:
        return [Finding(E.ErrorCode.SNAPSHOT_CORRUPT, exc.name, exc.problem)]
    findings: list[Finding] = []
    _hub_cache(root, findings)
    _config(root, findings)
    _weights(root, findings)
    if not any((root / name).exists() for name in TOKENIZER_FILES):
        findings.append(Finding(E.ErrorCode.SNAPSHOT_INCOMPLETE, "tokenizer.json",
                                f"no tokenizer file (one of {', '.join(TOKENIZER_FILES)})"))
    return findings


def model_type(path: str | os.PathLike) -> str | None:
    try:
        value = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
