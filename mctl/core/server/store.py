"""Durable state of the control plane in SQLite (WAL).

Writes are grouped: the control plane collects the changes of one event-loop turn and commits them in
one transaction (`Store.commit`). Claims on inputs are not stored: after a restart every input without
an output is pending again, which gives at-least-once execution; outputs keep their first result.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable

# Version 1: the schema of the first release (which left PRAGMA user_version at 0).
SCHEMA = """
CREATE TABLE IF NOT EXISTS apps (
    app_id TEXT PRIMARY KEY, name TEXT NOT NULL, mode TEXT NOT NULL, state TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, stopped REAL);
CREATE INDEX IF NOT EXISTS apps_name ON apps(name);
CREATE TABLE IF NOT EXISTS app_versions (
    app_id TEXT NOT NULL, version INTEGER NOT NULL, deployment_id TEXT NOT NULL,
    spec TEXT NOT NULL, created REAL NOT NULL, note TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (app_id, version));
CREATE TABLE IF NOT EXISTS inputs (
    input_id TEXT PRIMARY KEY, function_id TEXT NOT NULL, call_id TEXT NOT NULL,
    idx INTEGER NOT NULL, payload BLOB NOT NULL, is_blob INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS calls (
    call_id TEXT PRIMARY KEY, function_id TEXT NOT NULL, created REAL NOT NULL,
    cancelled INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS outputs (
    call_id TEXT NOT NULL, idx INTEGER NOT NULL, seq INTEGER NOT NULL, status TEXT NOT NULL,
    payload BLOB NOT NULL, is_blob INTEGER NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (call_id, idx, seq));
CREATE TABLE IF NOT EXISTS logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, app_id TEXT NOT NULL, ts REAL NOT NULL,
    task_id TEXT NOT NULL, function TEXT NOT NULL, line TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS logs_app ON logs(app_id, id);
"""

# Ordered schema steps: MIGRATIONS[i] takes a database from version i to i + 1
# (`PRAGMA user_version`). Never edit a released step; append a new one.
MIGRATIONS: list[str] = [
    SCHEMA,
    # 2: a schedule's next fire time, so a restart neither skips nor repeats a firing.
    "CREATE TABLE schedule_fires (function_id TEXT NOT NULL, schedule TEXT NOT NULL, "
    "next REAL NOT NULL, PRIMARY KEY (function_id, schedule));",
    # 3: API tokens (only their hashes) and task tokens' bindings.
    "CREATE TABLE tokens (token_id TEXT PRIMARY KEY, name TEXT NOT NULL, scope TEXT NOT NULL, "
    "hash TEXT NOT NULL UNIQUE, created REAL NOT NULL, last_used REAL, revoked REAL, "
    "app_id TEXT, function_id TEXT, version INTEGER);"
    "CREATE INDEX tokens_task ON tokens(app_id, function_id, version);",
    # 4: Dicts and Queues (mctl.Dict, mctl.Queue): named or ephemeral objects, their entries
    # (pickled key -> pickled value) and their items (FIFO by id within a partition).
    "CREATE TABLE kv_objects (object_id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT, "
    "created REAL NOT NULL, UNIQUE (kind, name));"
    "CREATE TABLE dict_entries (object_id TEXT NOT NULL, key BLOB NOT NULL, value BLOB NOT NULL, "
    "updated REAL NOT NULL, PRIMARY KEY (object_id, key));"
    "CREATE TABLE queue_items (id INTEGER PRIMARY KEY AUTOINCREMENT, object_id TEXT NOT NULL, "
    "partition TEXT NOT NULL, value BLOB NOT NULL, created REAL NOT NULL);"
    "CREATE INDEX queue_items_partition ON queue_items(object_id, partition, id);",
    # 5: variants of classes made by Cls.with_options/with_concurrency/with_batching: the
    # overrides (FunctionSpec fields, JSON) on the class `base_tag`; their specs are derived
    # from the app's current version each time it is activated (core/server/variants.py).
    "CREATE TABLE function_variants (app_id TEXT NOT NULL, tag TEXT NOT NULL, "
    "base_tag TEXT NOT NULL, overrides TEXT NOT NULL, created REAL NOT NULL, "
    "PRIMARY KEY (app_id, tag));",
    # 6: when each Queue partition expires: Modal's partition_ttl, from the last put (a
    # partition without a row, from before this step, never expires).
    "CREATE TABLE queue_partitions (object_id TEXT NOT NULL, partition TEXT NOT NULL, "
    "expires REAL NOT NULL, PRIMARY KEY (object_id, partition));"
    "CREATE INDEX queue_partitions_expires ON queue_partitions(expires);",
    # 7: sandboxes: one row each, kept after they end (state, return code) for list and logs.
    "CREATE TABLE sandboxes (sandbox_id TEXT PRIMARY KEY, app_id TEXT NOT NULL, name TEXT, "
    "tags TEXT NOT NULL DEFAULT '{}', isolation TEXT NOT NULL, state TEXT NOT NULL, "
    "returncode INTEGER, created REAL NOT NULL, ended REAL, timeout REAL NOT NULL, "
    "config TEXT NOT NULL, host TEXT, backend TEXT NOT NULL, ports TEXT NOT NULL DEFAULT '{}', "
    "container TEXT, container_id TEXT);"
    "CREATE INDEX sandboxes_app ON sandboxes(app_id, state);",
    # 8: the stream of each log line ("stdout" or "stderr"); older lines count as stdout.
    "ALTER TABLE logs ADD COLUMN stream TEXT NOT NULL DEFAULT 'stdout';",
]
SCHEMA_VERSION = len(MIGRATIONS)


def _statements(script: str) -> Iterable[str]:
    buffer = ""
    for part in script.split(";"):
        buffer += part + ";"
        if sqlite3.complete_statement(buffer):
            if buffer.strip(" \n;"):
                yield buffer
            buffer = ""


def migrate(db: sqlite3.Connection) -> int:
    """Bring the database to SCHEMA_VERSION, one transaction per step; returns the version.

    Each step re-reads the version under a write lock, so two processes opening the same
    database at once apply every step once."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        from mctl.exception import InvalidError

        raise InvalidError(f"The state database has schema version {version}, newer than this "
                           f"mctl's {SCHEMA_VERSION}; upgrade mctl.")
    for target in range(version + 1, SCHEMA_VERSION + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            (current,) = db.execute("PRAGMA user_version").fetchone()
            if current < target:
                for statement in _statements(MIGRATIONS[target - 1]):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {target}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return SCHEMA_VERSION


class Store:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.blob_dir = self.state_dir / "blobs"
        self.blob_dir.mkdir(exist_ok=True)
        self.db = sqlite3.connect(self.state_dir / "state.db", isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash; only power loss may lose the last.
        self.db.execute("PRAGMA synchronous=NORMAL")
        migrate(self.db)
        # Pending writes of this loop turn.
        self.new_inputs: list[tuple[Any, ...]] = []
        self.new_calls: list[tuple[Any, ...]] = []
        self.new_outputs: list[tuple[Any, ...]] = []
        self.done_inputs: list[tuple[str]] = []
        self.new_logs: list[tuple[Any, ...]] = []
        # (function_id, schedule, next): committed with the input a firing enqueues.
        self.new_fire_times: list[tuple[str, str, float]] = []

    @property
    def dirty(self) -> bool:
        return bool(self.new_inputs or self.new_outputs or self.done_inputs or self.new_logs
                    or self.new_calls or self.new_fire_times)

    def commit(self) -> None:
        """Write everything gathered since the last commit in one transaction."""
        db = self.db
        db.execute("BEGIN")
        try:
            if self.new_calls:
                db.executemany("INSERT OR IGNORE INTO calls VALUES (?,?,?,0)", self.new_calls)
            if self.new_inputs:
                db.executemany("INSERT OR IGNORE INTO inputs VALUES (?,?,?,?,?,?,?)", self.new_inputs)
            if self.new_outputs:
                db.executemany("INSERT OR IGNORE INTO outputs VALUES (?,?,?,?,?,?,?)",
                               self.new_outputs)
            if self.done_inputs:
                db.executemany("DELETE FROM inputs WHERE input_id = ?", self.done_inputs)
            if self.new_logs:
                db.executemany("INSERT INTO logs (app_id, ts, task_id, function, line, stream) "
                               "VALUES (?,?,?,?,?,?)", self.new_logs)
            if self.new_fire_times:
                db.executemany("INSERT OR REPLACE INTO schedule_fires VALUES (?,?,?)",
                               self.new_fire_times)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            self.new_calls, self.new_inputs, self.new_outputs = [], [], []
            self.done_inputs, self.new_logs, self.new_fire_times = [], [], []

    # --- reads ---------------------------------------------------------------------------------
    def pending_inputs(self) -> Iterable[tuple[Any, ...]]:
        return self.db.execute(
            "SELECT input_id, function_id, call_id, idx, payload, is_blob FROM inputs "
            "WHERE call_id NOT IN (SELECT call_id FROM calls WHERE cancelled = 1) ORDER BY rowid")

    def outputs_of(self, call_id: str) -> list[tuple[Any, ...]]:
        return self.db.execute(
            "SELECT idx, seq, status, payload, is_blob FROM outputs WHERE call_id = ? "
            "ORDER BY idx, seq", (call_id,)).fetchall()

    def call(self, call_id: str) -> tuple[Any, ...] | None:
        """(function_id, cancelled), also for a call made this turn and not committed yet (a
        spawn and the subscribe of its `.get()` can arrive in one read)."""
        for pending_id, function_id, _ in self.new_calls:
            if pending_id == call_id:
                return function_id, 0
        return self.db.execute("SELECT function_id, cancelled FROM calls WHERE call_id = ?",
                               (call_id,)).fetchone()

    def cancel_call(self, call_id: str) -> None:
        self.db.execute("UPDATE calls SET cancelled = 1 WHERE call_id = ?", (call_id,))
        self.db.execute("DELETE FROM inputs WHERE call_id = ?", (call_id,))

    # --- apps ----------------------------------------------------------------------------------
    def upsert_app(self, app_id: str, name: str, mode: str) -> None:
        self.db.execute(
            "INSERT INTO apps (app_id, name, mode, state, version, created) "
            "VALUES (?,?,?,'running',0,?) ON CONFLICT(app_id) DO UPDATE SET state='running', "
            "stopped=NULL", (app_id, name, mode, time.time()))

    def add_version(self, app_id: str, deployment_id: str, spec: dict[str, Any],
                    note: str = "") -> int:
        db = self.db
        db.execute("BEGIN")
        try:
            (version,) = db.execute("SELECT version + 1 FROM apps WHERE app_id = ?",
                                    (app_id,)).fetchone()
            db.execute("INSERT INTO app_versions VALUES (?,?,?,?,?,?)",
                       (app_id, version, deployment_id, json.dumps(spec), time.time(), note))
            db.execute("UPDATE apps SET version = ? WHERE app_id = ?", (version, app_id))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return version

    def set_app_state(self, app_id: str, state: str) -> None:
        self.db.execute("UPDATE apps SET state = ?, stopped = ? WHERE app_id = ?",
                        (state, time.time() if state == "stopped" else None, app_id))

    def apps(self) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT app_id, name, mode, state, version, created, stopped "
                              "FROM apps ORDER BY created")
        return [dict(zip([c[0] for c in cur.description], row)) for row in cur.fetchall()]

    def find_app(self, name_or_id: str) -> dict[str, Any] | None:
        for app in reversed(self.apps()):
            if app["app_id"] == name_or_id or (app["name"] == name_or_id
                                                 and app["mode"] == "deployed"):
                return app
        return None

    def versions(self, app_id: str) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT version, deployment_id, created, note FROM app_versions "
                              "WHERE app_id = ? ORDER BY version", (app_id,))
        return [dict(zip([c[0] for c in cur.description], row)) for row in cur.fetchall()]

    def version_spec(self, app_id: str, version: int) -> dict[str, Any] | None:
        row = self.db.execute("SELECT spec FROM app_versions WHERE app_id = ? AND version = ?",
                              (app_id, version)).fetchone()
        return json.loads(row[0]) if row else None

    def add_variant(self, app_id: str, tag: str, base_tag: str,
                    overrides: dict[str, Any]) -> None:
        self.db.execute("INSERT OR IGNORE INTO function_variants VALUES (?,?,?,?,?)",
                        (app_id, tag, base_tag, json.dumps(overrides, sort_keys=True),
                         time.time()))

    def variants(self, app_id: str) -> list[tuple[str, dict[str, Any]]]:
        """(base tag, overrides) of each variant of the app, oldest first."""
        rows = self.db.execute("SELECT base_tag, overrides FROM function_variants "
                               "WHERE app_id = ? ORDER BY created", (app_id,)).fetchall()
        return [(base, json.loads(overrides)) for base, overrides in rows]

    def logs(self, app_id: str, after: int = 0, limit: int = 1000) -> list[tuple[Any, ...]]:
        return self.db.execute(
            "SELECT id, ts, task_id, function, line, stream FROM logs WHERE app_id = ? AND id > ? "
            "ORDER BY id LIMIT ?", (app_id, after, limit)).fetchall()

    # --- schedules -----------------------------------------------------------------------------
    def fire_times(self) -> dict[tuple[str, str], float]:
        """Stored next fire times by (function_id, schedule as JSON)."""
        return {(fid, sched): when for fid, sched, when in
                self.db.execute("SELECT function_id, schedule, next FROM schedule_fires")}

    def set_fire_time(self, function_id: str, schedule: str, when: float) -> None:
        """Store a first fire time now (no firing goes with it)."""
        self.db.execute("INSERT OR REPLACE INTO schedule_fires VALUES (?,?,?)",
                        (function_id, schedule, when))

    def forget_fire_time(self, function_id: str, schedule: str) -> None:
        self.db.execute("DELETE FROM schedule_fires WHERE function_id = ? AND schedule = ?",
                        (function_id, schedule))

    # --- retention -----------------------------------------------------------------------------
    def gc(self, cutoff: float) -> dict[str, int]:
        """Forget outputs and finished calls created before `cutoff`, and blobs last written
        before it that no app version, waiting input or kept output refers to."""
        db = self.db
        db.execute("BEGIN")
        try:
            outputs = db.execute("DELETE FROM outputs WHERE created < ?", (cutoff,)).rowcount
            calls = db.execute("DELETE FROM calls WHERE created < ? AND call_id NOT IN "
                               "(SELECT call_id FROM inputs)", (cutoff,)).rowcount
            logs = db.execute("DELETE FROM logs WHERE ts < ?", (cutoff,)).rowcount
            # Queue partitions past their partition_ttl (also cleared when next touched)
            now = time.time()
            db.execute("DELETE FROM queue_items WHERE (object_id, partition) IN (SELECT "
                       "object_id, partition FROM queue_partitions WHERE expires <= ?)", (now,))
            db.execute("DELETE FROM queue_partitions WHERE expires <= ?", (now,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        keep: set[str] = set()
        for (spec,) in db.execute("SELECT spec FROM app_versions"):
            data = json.loads(spec)
            keep.add(data.get("bundle_blob") or "")
            keep.update(f.get("pickled_blob") or "" for f in data.get("functions", {}).values())
            for image in data.get("images", {}).values():  # files an image adds: a rebuild needs them
                recipe = image.get("recipe") or {}
                keep.update(s.get("blob") or "" for s in recipe.get("steps", []))
                keep.add((recipe.get("base") or {}).get("context_blob") or "")
        for table in ("inputs", "outputs"):
            keep.update(row[0].decode() for row in db.execute(
                f"SELECT payload FROM {table} WHERE is_blob = 1"))
        blobs = 0
        for path in self.blob_dir.glob("bl-*"):
            if path.name not in keep and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                blobs += 1
        return {"outputs": outputs, "calls": calls, "logs": logs, "blobs": blobs}

    # --- blobs ---------------------------------------------------------------------------------
    def blob_path(self, blob_id: str) -> Path:
        if not blob_id.startswith("bl-") or not blob_id[3:].isalnum():
            raise ValueError(f"invalid blob id {blob_id!r}")
        return self.blob_dir / blob_id

    def put_blob_file(self, blob_id: str, tmp: Path) -> None:
        os.replace(tmp, self.blob_path(blob_id))

    def refresh_blob(self, blob_id: str) -> bool:
        """True if the blob is stored; its age restarts, so retention keeps a blob just re-used."""
        try:
            os.utime(self.blob_path(blob_id))
            return True
        except FileNotFoundError:
            return False

    def close(self) -> None:
        self.db.close()
