"""Optional SHA-256 checks of every snapshot file against a manifest: one shipped beside the
snapshot (`sha256sums.txt`, `sha256sum` format) or the one recorded at first admission. Hashes are
cached by (path, size, mtime, inode), so an unchanged snapshot re-admits in milliseconds; but bit rot
changes none of those, so a caller that has reason to doubt the files (`fresh`: the admission after a
failure in LOADING or CANARY, a quarantine, a rollback, an operator's release or repair) reads every
file again."""

from __future__ import annotations

import hashlib
from pathlib import Path

from protocol import errors as E
from supervisor.admission.snapshot import Finding
from supervisor.persistence.store import Store

SHIPPED = "sha256sums.txt"
_CHUNK = 8 * 2**20


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_file() and p.name != SHIPPED and not p.name.startswith("."))


def file_hash(store: Store, path: Path, fresh: bool = False) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    cached = None if fresh else store.cached_hash(*key)
    if cached:
        return cached
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    store.cache_hash(*key, h.hexdigest())
    return h.hexdigest()


def _shipped(root: Path) -> dict[str, str] | None:
    try:
        lines = (root / SHIPPED).read_text().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2:
            out[parts[1].lstrip("*")] = parts[0].lower()
    return out


def verify(store: Store, path: str, fresh: bool = False) -> list[Finding]:
    """Blocking (hashes files): run it off the event loop."""
    root = Path(path)
    actual = {p.name: file_hash(store, p, fresh) for p in _files(root)}
    manifest = _shipped(root) or store.manifest(str(root.resolve()))
    if manifest is None:
        store.set_manifest(str(root.resolve()), actual)  # first admission: this is the reference
        return []
    findings = []
    for name, want in sorted(manifest.items()):
        got = actual.get(name)
        if got is None:
            findings.append(Finding(E.ErrorCode.SNAPSHOT_INCOMPLETE, name, "listed in the manifest, missing"))
        elif got != want:
            findings.append(Finding(E.ErrorCode.SNAPSHOT_CORRUPT, name,
                                    f"checksum mismatch: expected sha256 {want[:16]}…, found {got[:16]}…"))
    return findings
