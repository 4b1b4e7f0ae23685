"""The SQLite store in the state dir: failure ledger, crash records, quarantine, revisions and
last-known-good, which models should run, and the supervisor's own boots. One writer (us)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from supervisor import logs

from supervisor.config import CanarySettings, Config, ModelConfig
from supervisor.persistence import storeguard
from supervisor.persistence.records import CRASH_COLUMNS, CrashRecord, Failure, ModelFlags, WorkerRecord

STORE_FILE = "store.sqlite3"
PRUNE_EVERY = 100  # history rows written between two prunes
CLOSE_WAIT_S = 5.0  # at shutdown, how long queued writes may still wait for the store


def section_json(model: ModelConfig) -> str:
    return json.dumps(dataclasses.asdict(model), sort_keys=True)


def section_from_json(text: str) -> ModelConfig:
    d = json.loads(text)
    d["canary"] = CanarySettings(**d["canary"])
    if d.get("worker_command") is not None:
        d["worker_command"] = tuple(d["worker_command"])
    return ModelConfig(**d)


@dataclasses.dataclass
class Retention:
    """History kept: rows younger than max_age_s, at most max_rows per model (boots: in all), and
    never what the restart window or crash-loop detection still reads (floor_s)."""
    max_age_s: float = 30 * 86400.0
    max_rows: int = 1000
    floor_s: float = 0.0

    @classmethod
    def of(cls, config: Config) -> "Retention":
        sup = config.supervisor
        # Never prune what the restart policy or crash-loop detection still counts.
        return cls(sup.history_retention_s, sup.history_max_rows, max(config.restart.window_s, sup.crash_loop_window_s))


class Store:
    """Reads come from the database or, for what decides safety (flags, failures, crash records,
    revisions), from caches that already hold every write, queued or not; writes go through
    storeguard.Writes, so a locked or full disk never fails (or blocks) the caller."""

    def __init__(self, state_dir: Path, lock_wait_s: float = 0.0, retention: Retention | None = None) -> None:
        self.path = state_dir / STORE_FILE
        self.log = logs.get()
        self.lock_wait_s = lock_wait_s
        self.retention = retention or Retention()
        self._flags: dict[str, ModelFlags] = {}  # model -> its models row, writes applied
        self._failures: dict[str, tuple[float, list[Failure]]] = {}  # model -> (since, failures since)
        self._unflushed_failures: dict[str, list[Failure]] = {}  # queued, not yet in the database
        self._unflushed_crashes: list[CrashRecord] = []
        self._revisions: dict[tuple[str, str], str] = {}  # remembered by this run
        self._history_writes = 0
        self.db = storeguard.TimedConnection(self._open())
        self.db.execute(f"PRAGMA busy_timeout={int(storeguard.RUNTIME_BUSY_S * 1000)}")
        self.writes = storeguard.Writes(self.db, self.log, self._flushed)
        self.writes.write(self._prune)

    def _open(self) -> Any:
        try:
            db, (found, now), _ = storeguard.open_waiting(self.path, self.lock_wait_s, self.log)
        except sqlite3.DatabaseError as exc:
            # Only SQLite's own verdict of corruption gets here (a locked, busy, full or read-only
            # store raises StoreUnavailable). Never silently reset what operators rely on: keep the
            # bad file, and its journal, for inspection and say so loudly.
            stamp = int(time.time())
            aside = self.path.with_name(f"{STORE_FILE}.corrupt-{stamp}")
            for suffix in ("", "-wal", "-shm"):
                part = self.path.with_name(STORE_FILE + suffix)
                if part.exists():
                    part.rename(aside.with_name(aside.name + suffix))
            self.log.error("store.corrupt_moved_aside", path=str(self.path), moved_to=str(aside),
                           error=str(exc))
            db, (found, now), _ = storeguard.open_waiting(self.path, self.lock_wait_s, self.log)
        if found != now:
            self.log.info("store.migrated", path=str(self.path), from_version=found, to_version=now)
        self.path.chmod(0o600)
        return db

    @property
    def degraded(self) -> bool:
        return self.writes.degraded

    def health(self) -> dict[str, Any]:
        w = self.writes
        return {"store_degraded": w.degraded, "store_pending_writes": len(w.pending), "store_error": w.last_error,
                "store_schema_version": storeguard.SCHEMA_VERSION}

    def _flushed(self) -> None:
        """Every queued write is in the database: the caches need not carry them any more."""
        self._unflushed_failures.clear()
        self._unflushed_crashes.clear()

    def close(self) -> None:
        # Bounded well inside the service manager's stop budget (its margin), or it SIGKILLs us anyway.
        left = self.writes.drain(min(self.lock_wait_s, CLOSE_WAIT_S))
        if left:
            self.log.error("store.unwritten", pending_writes=left, error=self.writes.last_error,
                           hint="these changes (failures, quarantine, wanted flags) are lost; "
                                "check the disk and who held the store")
        self.db.close()

    # --- retention ------------------------------------------------------------------------------

    def _history_written(self) -> None:
        self._history_writes += 1
        if self._history_writes % PRUNE_EVERY == 0:
            self.writes.write(self._prune)

    def _prune(self, db: Any) -> None:
        r = self.retention
        cutoff = time.time() - max(r.max_age_s, r.floor_s)
        removed = {}
        for table in ("crashes", "failures"):
            n = db.execute(f"DELETE FROM {table} WHERE at < ?", (cutoff,)).rowcount
            n += db.execute(
                f"DELETE FROM {table} WHERE id IN (SELECT id FROM (SELECT id, row_number() OVER "
                f"(PARTITION BY model ORDER BY at DESC, id DESC) AS n FROM {table}) WHERE n > ?)",
                (r.max_rows,)).rowcount
            removed[table] = n
        removed["boots"] = db.execute(
            "DELETE FROM boots WHERE at < ? OR id <= (SELECT max(id) FROM boots) - ?",
            (cutoff, r.max_rows)).rowcount
        if any(removed.values()):
            self.log.info("store.pruned", max_age_s=r.max_age_s, max_rows=r.max_rows, **removed)

    # --- failures and crash records ------------------------------------------------------------

    def add_failure(self, model: str, f: Failure) -> None:
        self._unflushed_failures.setdefault(model, []).append(f)
        cached = self._failures.get(model)
        if cached is not None and f.at >= cached[0]:
            cached[1].append(f)
        self.writes.write(storeguard.synced(lambda db: db.execute(
            "INSERT INTO failures(model, revision, at, code, counted) VALUES (?,?,?,?,?)",
            (model, f.revision, f.at, f.code, int(f.counted)))))
        self._history_written()

    def failures(self, model: str, since: float) -> list[Failure]:
        """Read through a per-model cache (status asks on every call; we are the only writer)."""
        cached = self._failures.get(model)
        if cached is None or cached[0] > since:
            rows = self.db.execute(
                "SELECT at, revision, code, counted FROM failures WHERE model=? AND at>=? ORDER BY at",
                (model, since)).fetchall()
            found = [Failure(at, rev, code, bool(counted)) for at, rev, code, counted in rows]
            written = set(found)  # a queued failure may be written by now, with later ones still queued
            found += [f for f in self._unflushed_failures.get(model, ()) if f.at >= since and f not in written]
            cached = (since, found)
        # Only what is still in a window is kept: the cache does not grow with the model's age.
        cached = (since, [f for f in cached[1] if f.at >= since])
        self._failures[model] = cached
        return list(cached[1])

    def add_crash(self, record: CrashRecord) -> None:
        self._unflushed_crashes.append(record)
        values = record.to_row()
        self.writes.write(lambda db: db.execute(
            f"INSERT INTO crashes({','.join(CRASH_COLUMNS)}) VALUES ({','.join('?' * len(CRASH_COLUMNS))})", values))
        self._history_written()

    def crash_records(self, model: str, limit: int = 50) -> list[CrashRecord]:
        """Newest first: the queued ones (no row id yet), then the table's."""
        queued = [r for r in reversed(self._unflushed_crashes) if r.model == model][:limit]
        cur = self.db.execute("SELECT * FROM crashes WHERE model=? ORDER BY at DESC, id DESC LIMIT ?",
                              (model, limit))
        names = [d[0] for d in cur.description]
        return queued + [CrashRecord.from_row(names, row) for row in cur.fetchall()[:limit - len(queued)]]

    def crashes(self, model: str, limit: int = 50) -> list[dict[str, Any]]:
        """History's shape of crash_records."""
        return [r.to_dict() for r in self.crash_records(model, limit)]

    # --- per-model flags -----------------------------------------------------------------------

    def _cached_flags(self, model: str) -> ModelFlags:
        flags = self._flags.get(model)
        if flags is None:
            flags = ModelFlags.from_row(self.db.execute(
                f"SELECT {', '.join(ModelFlags.COLUMNS)} FROM models WHERE model=?", (model,)).fetchone())
            self._flags[model] = flags
        return flags

    def flags(self, model: str) -> ModelFlags:
        return self._cached_flags(model).copy()

    def _set_flags(self, model: str, changes: dict[str, Any], sql: str, params: tuple, synced: bool = False) -> None:
        """The cache changes at once (what decides safety reads it); the row as the queue allows."""
        self._flags[model] = dataclasses.replace(self._cached_flags(model), **changes)

        def write(db: Any) -> None:
            db.execute("INSERT OR IGNORE INTO models(model) VALUES (?)", (model,))
            db.execute(sql, params)

        self.writes.write(storeguard.synced(write) if synced else write)

    def set_quarantine(self, model: str, summary: dict[str, Any] | None) -> None:
        """Written (fsynced) before it returns unless the store is degraded (then kept and retried)."""
        self._set_flags(model, {"quarantined": summary is not None, "quarantine": dict(summary) if summary else None},
                        "UPDATE models SET quarantined=?, quarantine=? WHERE model=?",
                        (int(summary is not None), json.dumps(summary) if summary else None, model),
                        synced=summary is not None)

    def set_wanted(self, model: str, wanted: bool | None, running: str | None, configured: str) -> None:
        """What should run after a restart: whether (None: as the config says) and which revision."""
        self._set_flags(model, {"wanted": wanted, "running_revision": running, "configured_revision": configured},
                        "UPDATE models SET wanted=?, running_revision=?, configured_revision=? WHERE model=?",
                        (None if wanted is None else int(wanted), running, configured, model))

    def clear_failures(self, model: str) -> None:
        self._failures[model] = (0.0, [])  # authoritative now: none, whatever the database still has
        self._unflushed_failures.pop(model, None)
        self.writes.write(lambda db: db.execute("DELETE FROM failures WHERE model=?", (model,)))

    # --- revisions -----------------------------------------------------------------------------

    def remember_revision(self, model: ModelConfig) -> None:
        key, section = (model.id, model.revision), section_json(model)
        if key in self._revisions:
            return
        self._revisions[key] = section
        self.writes.write(lambda db: db.execute(
            "INSERT OR IGNORE INTO revisions(model, revision, section, first_seen) VALUES (?,?,?,?)",
            (*key, section, time.time())))

    def revision(self, model: str, revision: str) -> ModelConfig | None:
        section = self._revisions.get((model, revision))
        if section is None:
            row = self.db.execute("SELECT section FROM revisions WHERE model=? AND revision=?",
                                  (model, revision)).fetchone()
            section = row[0] if row else None
        return section_from_json(section) if section else None

    def set_lkg(self, model: ModelConfig) -> None:
        self.remember_revision(model)
        self._set_flags(model.id, {"lkg_revision": model.revision}, "UPDATE models SET lkg_revision=? WHERE model=?",
                        (model.revision, model.id))

    # --- swaps: requests for OLD go to NEW, across restarts -----------------------------------

    def set_alias(self, old: str, new: str | None) -> None:
        if new is None:
            self.writes.write(lambda db: db.execute("DELETE FROM aliases WHERE old=?", (old,)))
        else:
            self.writes.write(lambda db: db.execute("INSERT OR REPLACE INTO aliases VALUES (?,?,?)",
                                                    (old, new, time.time())))

    def aliases(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT old, new FROM aliases").fetchall())

    # --- compatibility registry ---------------------------------------------------------------

    def compat_record(self, fingerprint: str, backend: str, model: str, outcome: str | None,
                      evidence: dict[str, Any]) -> None:
        """Merge `evidence` into the (model x backend) row; `outcome` None keeps the current one.
        The merge runs when the write does, so queued records merge in order."""

        def write(db: Any) -> None:
            now = time.time()
            row = db.execute("SELECT outcome, evidence FROM compat WHERE fingerprint=? AND backend=?",
                             (fingerprint, backend)).fetchone()
            if row is None:
                db.execute("INSERT INTO compat VALUES (?,?,?,?,?,?,?)",
                           (fingerprint, backend, model, outcome or "unknown", json.dumps(evidence), now, now))
                return
            merged = {**json.loads(row[1]), **evidence}
            db.execute("UPDATE compat SET outcome=?, evidence=?, model=?, last_seen=? WHERE fingerprint=? AND backend=?",
                       (outcome or row[0], json.dumps(merged), model, now, fingerprint, backend))

        self.writes.write(write)

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
        row = (fingerprint, backend, template, prompt, hashlib.sha256(text.encode()).hexdigest(), text)
        self.writes.write(lambda db: db.execute("INSERT OR REPLACE INTO canary_outputs VALUES (?,?,?,?,?,?)", row))

    # --- checksums ----------------------------------------------------------------------------

    def cached_hash(self, path: str, size: int, mtime_ns: int, inode: int) -> str | None:
        row = self.db.execute("SELECT sha256 FROM file_hashes WHERE path=? AND size=? AND mtime_ns=? AND inode=?",
                              (path, size, mtime_ns, inode)).fetchone()
        return row[0] if row else None

    def cache_hash(self, path: str, size: int, mtime_ns: int, inode: int, sha256: str) -> None:
        row = (path, size, mtime_ns, inode, sha256)
        self.writes.write(lambda db: db.execute("INSERT OR REPLACE INTO file_hashes VALUES (?,?,?,?,?)", row))

    def manifest(self, snapshot: str) -> dict[str, str] | None:
        row = self.db.execute("SELECT files FROM manifests WHERE snapshot=?", (snapshot,)).fetchone()
        return json.loads(row[0]) if row else None

    def set_manifest(self, snapshot: str, files: dict[str, str]) -> None:
        row = (snapshot, json.dumps(files), time.time())
        self.writes.write(lambda db: db.execute("INSERT OR REPLACE INTO manifests VALUES (?,?,?)", row))

    # --- live workers (for adoption by the next supervisor run) ---------------------------------

    def set_worker(self, model: str, record: WorkerRecord | None) -> None:
        if record is None:
            self.writes.write(lambda db: db.execute("DELETE FROM workers WHERE model=?", (model,)))
            return
        row = (model, *record.to_row())
        self.writes.write(lambda db: db.execute(
            f"INSERT OR REPLACE INTO workers(model, {', '.join(WorkerRecord.COLUMNS)}) VALUES (?,?,?,?,?,?,?)", row))

    def worker_record(self, model: str) -> WorkerRecord | None:
        row = self.db.execute(f"SELECT {', '.join(WorkerRecord.COLUMNS)} FROM workers WHERE model=?",
                              (model,)).fetchone()
        return WorkerRecord(*row) if row else None

    # --- the supervisor's boots (crash-loop detection) -----------------------------------------

    def boot(self) -> int:
        """Recorded before anything starts, or the start is refused: crash-loop detection counts on it."""
        self.db.execute(f"PRAGMA busy_timeout={int(self.lock_wait_s * 1000)}")
        try:
            self.boot_id = int(self.writes.now(
                lambda db: db.execute("INSERT INTO boots(at) VALUES (?)", (time.time(),)).lastrowid))
        except sqlite3.Error as exc:
            if not storeguard.is_transient(exc):
                raise
            raise storeguard.StoreUnavailable(self.path, storeguard.reason_of(exc), str(exc)) from None
        finally:
            self.db.execute(f"PRAGMA busy_timeout={int(storeguard.RUNTIME_BUSY_S * 1000)}")
        self._history_written()
        return self.boot_id

    def clean_shutdown(self, boot_id: int) -> None:
        self.writes.write(lambda db: db.execute("UPDATE boots SET clean=1 WHERE id=?", (boot_id,)))

    def unclean_boots_since(self, since: float) -> int:
        """Boots since `since` not followed by a clean shutdown, counting back to the last clean one."""
        rows = self.db.execute("SELECT clean FROM boots WHERE at>=? ORDER BY id DESC", (since,)).fetchall()
        n = 0
        for (clean,) in rows[1:]:  # rows[0] is this boot
            if clean:
                break
            n += 1
        return n
