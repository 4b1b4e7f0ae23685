"""The SQLite store in the state dir: failure ledger, crash records, quarantine, revisions and
last-known-good, which models should run, and the supervisor's own boots. One writer (us)."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

from supervisor import logs
from supervisor.config import CanarySettings, ModelConfig
from supervisor.policy import Failure

STORE_FILE = "store.sqlite3"
SCHEMA = """
CREATE TABLE IF NOT EXISTS failures(
  id INTEGER PRIMARY KEY, model TEXT NOT NULL, revision TEXT NOT NULL, at REAL NOT NULL,
  code TEXT NOT NULL, counted INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS crashes(
  id INTEGER PRIMARY KEY, model TEXT NOT NULL, revision TEXT NOT NULL, at REAL NOT NULL,
  code TEXT NOT NULL, cause TEXT, victim INTEGER NOT NULL, signal TEXT, exit_code INTEGER,
  phase TEXT, request_id TEXT, worker_pid INTEGER, memory TEXT, stderr_tail TEXT);
CREATE TABLE IF NOT EXISTS models(
  model TEXT PRIMARY KEY, quarantined INTEGER NOT NULL DEFAULT 0, quarantine TEXT,
  lkg_revision TEXT, running_revision TEXT, configured_revision TEXT, wanted INTEGER);
CREATE TABLE IF NOT EXISTS revisions(
  model TEXT NOT NULL, revision TEXT NOT NULL, section TEXT NOT NULL, first_seen REAL NOT NULL,
  PRIMARY KEY(model, revision));
CREATE TABLE IF NOT EXISTS workers(
  model TEXT PRIMARY KEY, pid INTEGER NOT NULL, start_time REAL NOT NULL, token TEXT NOT NULL,
  revision TEXT NOT NULL, socket TEXT NOT NULL, boot_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS compat(
  fingerprint TEXT NOT NULL, backend TEXT NOT NULL, model TEXT NOT NULL, outcome TEXT NOT NULL,
  evidence TEXT NOT NULL, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
  PRIMARY KEY(fingerprint, backend));
CREATE TABLE IF NOT EXISTS canary_outputs(
  fingerprint TEXT NOT NULL, backend TEXT NOT NULL, template TEXT NOT NULL, prompt TEXT NOT NULL,
  output_sha256 TEXT NOT NULL, text TEXT NOT NULL, PRIMARY KEY(fingerprint, backend, template, prompt));
CREATE TABLE IF NOT EXISTS file_hashes(
  path TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL,
  sha256 TEXT NOT NULL, PRIMARY KEY(path));
CREATE TABLE IF NOT EXISTS manifests(snapshot TEXT PRIMARY KEY, files TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS boots(id INTEGER PRIMARY KEY, at REAL NOT NULL, clean INTEGER NOT NULL DEFAULT 0);
"""


def _copy_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """Callers may change what they get (the quarantine summary too); the cache must not change."""
    q = flags["quarantine"]
    return {**flags, "quarantine": dict(q) if q else None}


def section_json(model: ModelConfig) -> str:
    return json.dumps(dataclasses.asdict(model), sort_keys=True)


def section_from_json(text: str) -> ModelConfig:
    d = json.loads(text)
    d["canary"] = CanarySettings(**d["canary"])
    if d.get("worker_command") is not None:
        d["worker_command"] = tuple(d["worker_command"])
    return ModelConfig(**d)


_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")


class _TimedConnection:
    """The sqlite3 connection, with every write statement's latency reported to `on_write`."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.on_write: Callable[[float], None] | None = None

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        if self.on_write is None or not sql.lstrip().upper().startswith(_WRITES):
            return self._db.execute(sql, params)
        start = time.perf_counter()
        try:
            return self._db.execute(sql, params)
        finally:
            self.on_write(time.perf_counter() - start)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


class Store:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STORE_FILE
        self.log = logs.get()
        self._flags: dict[str, dict[str, Any]] = {}  # model -> its models row (read cache)
        self._failures: dict[str, tuple[float, list[Failure]]] = {}  # model -> (since, failures since)
        try:
            self.db = self._open()
        except sqlite3.DatabaseError as exc:
            # Never silently reset what operators rely on (quarantine, history): keep the bad
            # file for inspection and say so loudly.
            aside = self.path.with_name(f"{STORE_FILE}.corrupt-{int(time.time())}")
            self.path.rename(aside)
            self.log.error("store.corrupt_moved_aside", path=str(self.path), moved_to=str(aside),
                           error=str(exc))
            self.db = self._open()

    def _open(self) -> _TimedConnection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        db.execute("SELECT count(*) FROM models").fetchone()  # a garbage file fails here, not later
        self.path.chmod(0o600)
        return _TimedConnection(db)

    def close(self) -> None:
        self.db.close()

    # --- failures and crash records ------------------------------------------------------------

    def add_failure(self, model: str, f: Failure) -> None:
        self._failures.pop(model, None)
        self.db.execute("INSERT INTO failures(model, revision, at, code, counted) VALUES (?,?,?,?,?)",
                        (model, f.revision, f.at, f.code, int(f.counted)))

    def failures(self, model: str, since: float) -> list[Failure]:
        """Read through a per-model cache (status asks on every call; we are the only writer)."""
        cached = self._failures.get(model)
        if cached is None or cached[0] > since:
            rows = self.db.execute(
                "SELECT at, revision, code, counted FROM failures WHERE model=? AND at>=? ORDER BY at",
                (model, since)).fetchall()
            cached = (since, [Failure(at, rev, code, bool(counted)) for at, rev, code, counted in rows])
            self._failures[model] = cached
        return [f for f in cached[1] if f.at >= since]

    def add_crash(self, record: dict[str, Any]) -> None:
        cols = ("model", "revision", "at", "code", "cause", "victim", "signal", "exit_code", "phase",
                "request_id", "worker_pid", "memory", "stderr_tail")
        values = [record.get(c) for c in cols]
        values[cols.index("memory")] = json.dumps(record.get("memory") or {})
        values[cols.index("stderr_tail")] = "\n".join(record.get("stderr_tail") or [])
        values[cols.index("victim")] = int(bool(record.get("victim")))
        self.db.execute(f"INSERT INTO crashes({','.join(cols)}) VALUES ({','.join('?' * len(cols))})", values)

    def crashes(self, model: str, limit: int = 50) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT * FROM crashes WHERE model=? ORDER BY at DESC, id DESC LIMIT ?",
                              (model, limit))
        names = [d[0] for d in cur.description]
        out = []
        for row in cur.fetchall():
            rec = dict(zip(names, row))
            rec["memory"] = json.loads(rec["memory"] or "{}")
            rec["stderr_tail"] = rec["stderr_tail"].split("\n") if rec["stderr_tail"] else []
            rec["victim"] = bool(rec["victim"])
            out.append(rec)
        return out

    # --- per-model flags -----------------------------------------------------------------------

    def _model_row(self, model: str) -> None:
        """Every write to a model's row comes through here first: the read cache forgets it."""
        self._flags.pop(model, None)
        self.db.execute("INSERT OR IGNORE INTO models(model) VALUES (?)", (model,))

    def model_flags(self, model: str) -> dict[str, Any]:
        cached = self._flags.get(model)
        if cached is not None:
            return _copy_flags(cached)
        row = self.db.execute(
            "SELECT quarantined, quarantine, lkg_revision, running_revision, configured_revision, wanted"
            " FROM models WHERE model=?", (model,)).fetchone()
        if row is None:
            row = (0, None, None, None, None, None)
        flags = {"quarantined": bool(row[0]), "quarantine": json.loads(row[1]) if row[1] else None,
                 "lkg_revision": row[2], "running_revision": row[3], "configured_revision": row[4],
                 "wanted": None if row[5] is None else bool(row[5])}
        self._flags[model] = flags
        return _copy_flags(flags)

    def set_quarantine(self, model: str, summary: dict[str, Any] | None) -> None:
        self._model_row(model)
        self.db.execute("UPDATE models SET quarantined=?, quarantine=? WHERE model=?",
                        (int(summary is not None), json.dumps(summary) if summary else None, model))

    def set_wanted(self, model: str, wanted: bool | None, running: str | None, configured: str) -> None:
        """What should run after a restart: whether (None: as the config says) and which revision."""
        self._model_row(model)
        self.db.execute(
            "UPDATE models SET wanted=?, running_revision=?, configured_revision=? WHERE model=?",
            (None if wanted is None else int(wanted), running, configured, model))

    def clear_failures(self, model: str) -> None:
        self._failures.pop(model, None)
        self.db.execute("DELETE FROM failures WHERE model=?", (model,))

    # --- revisions -----------------------------------------------------------------------------

    def remember_revision(self, model: ModelConfig) -> None:
        self.db.execute("INSERT OR IGNORE INTO revisions(model, revision, section, first_seen) VALUES (?,?,?,?)",
                        (model.id, model.revision, section_json(model), time.time()))

    def revision(self, model: str, revision: str) -> ModelConfig | None:
        row = self.db.execute("SELECT section FROM revisions WHERE model=? AND revision=?",
                              (model, revision)).fetchone()
        return section_from_json(row[0]) if row else None

    def set_lkg(self, model: ModelConfig) -> None:
        self.remember_revision(model)
        self._model_row(model.id)
        self.db.execute("UPDATE models SET lkg_revision=? WHERE model=?", (model.revision, model.id))

    # --- compatibility registry ---------------------------------------------------------------

    def compat_record(self, fingerprint: str, backend: str, model: str, outcome: str | None,
                      evidence: dict[str, Any]) -> None:
        """Merge `evidence` into the (model x backend) row; `outcome` None keeps the current one."""
        now = time.time()
        row = self.db.execute("SELECT outcome, evidence FROM compat WHERE fingerprint=? AND backend=?",
                              (fingerprint, backend)).fetchone()
        if row is None:
            self.db.execute("INSERT INTO compat VALUES (?,?,?,?,?,?,?)",
                            (fingerprint, backend, model, outcome or "unknown", json.dumps(evidence), now, now))
            return
        merged = {**json.loads(row[1]), **evidence}
        self.db.execute("UPDATE compat SET outcome=?, evidence=?, model=?, last_seen=? WHERE fingerprint=? AND backend=?",
                        (outcome or row[0], json.dumps(merged), model, now, fingerprint, backend))

    def compat(self, fingerprint: str | None = None, backend: str | None = None) -> list[dict[str, Any]]:
        cur = self.db.execute(
            "SELECT fingerprint, backend, model, outcome, evidence, first_seen, last_seen FROM compat"
            " WHERE (?1 IS NULL OR fingerprint=?1) AND (?2 IS NULL OR backend=?2) ORDER BY model, backend",
            (fingerprint, backend))
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, r)) for r in cur.fetchall()]
        for r in rows:
            r["evidence"] = json.loads(r["evidence"])
        return rows

    def canary_outputs(self, fingerprint: str, template: str, prompt: str) -> dict[str, str]:
        """backend -> sha256 of the greedy canary text, for this model, chat template and prompt."""
        rows = self.db.execute("SELECT backend, output_sha256 FROM canary_outputs WHERE fingerprint=? AND template=?"
                               " AND prompt=?", (fingerprint, template, prompt)).fetchall()
        return dict(rows)

    def set_canary_output(self, fingerprint: str, backend: str, template: str, prompt: str, text: str) -> None:
        import hashlib

        self.db.execute("INSERT OR REPLACE INTO canary_outputs VALUES (?,?,?,?,?,?)",
                        (fingerprint, backend, template, prompt, hashlib.sha256(text.encode()).hexdigest(), text))

    # --- checksums ----------------------------------------------------------------------------

    def cached_hash(self, path: str, size: int, mtime_ns: int, inode: int) -> str | None:
        row = self.db.execute("SELECT sha256 FROM file_hashes WHERE path=? AND size=? AND mtime_ns=? AND inode=?",
                              (path, size, mtime_ns, inode)).fetchone()
        return row[0] if row else None

    def cache_hash(self, path: str, size: int, mtime_ns: int, inode: int, sha256: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO file_hashes VALUES (?,?,?,?,?)", (path, size, mtime_ns, inode, sha256))

    def manifest(self, snapshot: str) -> dict[str, str] | None:
        row = self.db.execute("SELECT files FROM manifests WHERE snapshot=?", (snapshot,)).fetchone()
        return json.loads(row[0]) if row else None

    def set_manifest(self, snapshot: str, files: dict[str, str]) -> None:
        self.db.execute("INSERT OR REPLACE INTO manifests VALUES (?,?,?)", (snapshot, json.dumps(files), time.time()))

    # --- live workers (for adoption by the next supervisor run) ---------------------------------

    def set_worker(self, model: str, record: dict[str, Any] | None) -> None:
        if record is None:
            self.db.execute("DELETE FROM workers WHERE model=?", (model,))
            return
        self.db.execute(
            "INSERT OR REPLACE INTO workers(model, pid, start_time, token, revision, socket, boot_id)"
            " VALUES (?,?,?,?,?,?,?)",
            (model, record["pid"], record["start_time"], record["token"], record["revision"],
             record["socket"], record["boot_id"]))

    def worker(self, model: str) -> dict[str, Any] | None:
        cur = self.db.execute("SELECT * FROM workers WHERE model=?", (model,))
        row = cur.fetchone()
        return dict(zip([d[0] for d in cur.description], row)) if row else None

    # --- the supervisor's boots (crash-loop detection) -----------------------------------------

    def boot(self) -> int:
        self.boot_id = int(self.db.execute("INSERT INTO boots(at) VALUES (?)", (time.time(),)).lastrowid)
        return self.boot_id

    def clean_shutdown(self, boot_id: int) -> None:
        self.db.execute("UPDATE boots SET clean=1 WHERE id=?", (boot_id,))

    def unclean_boots_since(self, since: float) -> int:
        """Boots since `since` not followed by a clean shutdown, counting back to the last clean one."""
        rows = self.db.execute("SELECT clean FROM boots WHERE at>=? ORDER BY id DESC", (since,)).fetchall()
        n = 0
        for (clean,) in rows[1:]:  # rows[0] is this boot
            if clean:
                break
            n += 1
        return n
