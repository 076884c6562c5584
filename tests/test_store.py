"""The control plane's SQLite store: grouped commits, recovery reads, retention."""

import json
import os
import time

from mctl.core.server.store import Store


def test_grouped_commit_and_first_output_wins(tmp_path):
    store = Store(tmp_path)
    now = time.time()
    store.new_calls.append(("fc-a", "fu-x", now))
    store.new_inputs.extend([(f"in-a-{i}", "fu-x", "fc-a", i, b"p", 0, now) for i in range(3)])
    store.commit()
    assert [row[0] for row in store.pending_inputs()] == ["in-a-0", "in-a-1", "in-a-2"]
    store.new_outputs.append(("fc-a", 0, 0, "success", b"first", 0, now))
    store.new_outputs.append(("fc-a", 0, 0, "success", b"second", 0, now))
    store.done_inputs.append(("in-a-0",))
    store.commit()
    assert store.outputs_of("fc-a") == [(0, 0, "success", b"first", 0)]
    assert [row[0] for row in store.pending_inputs()] == ["in-a-1", "in-a-2"]


def test_state_survives_reopen(tmp_path):
    store = Store(tmp_path)
    store.upsert_app("ap-1", "demo", "deployed")
    store.add_version("ap-1", "de-1", {"name": "demo"})
    store.close()
    again = Store(tmp_path)
    assert again.find_app("demo")["version"] == 1
    assert again.version_spec("ap-1", 1) == {"name": "demo"}


def test_retention_keeps_what_is_still_needed(tmp_path):
    store = Store(tmp_path)
    old = time.time() - 10 * 86400
    store.upsert_app("ap-1", "demo", "deployed")
    store.add_version("ap-1", "de-1", {"bundle_blob": "bl-bundle", "functions": {}})
    for name in ("bl-bundle", "bl-oldresult", "bl-waiting"):
        (store.blob_dir / name).write_bytes(b"x")
        os.utime(store.blob_dir / name, (old, old))
    store.new_calls.extend([("fc-old", "fu-x", old), ("fc-wait", "fu-x", old)])
    store.new_outputs.append(("fc-old", 0, 0, "success", b"bl-oldresult", 1, old))
    store.new_inputs.append(("in-wait-0", "fu-x", "fc-wait", 0, b"bl-waiting", 1, old))
    store.commit()
    removed = store.gc(time.time() - 7 * 86400)
    assert removed["outputs"] == 1 and removed["calls"] == 1 and removed["blobs"] == 1
    assert sorted(p.name for p in store.blob_dir.iterdir()) == ["bl-bundle", "bl-waiting"]
    assert store.call("fc-wait") is not None and store.call("fc-old") is None
    assert json.loads(json.dumps(store.versions("ap-1")))[0]["version"] == 1


# The schema of the first release, verbatim: it never set PRAGMA user_version (0).
RELEASE_0_SCHEMA = """
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


def test_database_of_the_first_release_is_migrated(tmp_path):
    import sqlite3

    from mctl.core.server.store import SCHEMA_VERSION

    now = time.time()
    db = sqlite3.connect(tmp_path / "state.db")
    db.executescript(RELEASE_0_SCHEMA)
    db.execute("INSERT INTO apps VALUES ('ap-1', 'demo', 'deployed', 'running', 1, ?, NULL)",
               (now,))
    db.execute("INSERT INTO app_versions VALUES ('ap-1', 1, 'de-1', '{\"name\": \"demo\"}', ?, '')",
               (now,))
    db.execute("INSERT INTO calls VALUES ('fc-a', 'fu-x', ?, 0)", (now,))
    db.execute("INSERT INTO inputs VALUES ('in-a-0', 'fu-x', 'fc-a', 0, x'70', 0, ?)", (now,))
    db.execute("INSERT INTO logs (app_id, ts, task_id, function, line) "
               "VALUES ('ap-1', ?, 'ta-1', 'f', 'hello')", (now,))
    db.commit()
    assert db.execute("PRAGMA user_version").fetchone() == (0,)
    db.close()

    store = Store(tmp_path)
    assert store.db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert store.find_app("demo")["version"] == 1
    assert store.version_spec("ap-1", 1) == {"name": "demo"}
    assert [row[0] for row in store.pending_inputs()] == ["in-a-0"]
    assert [row[4] for row in store.logs("ap-1")] == ["hello"]
    assert store.fire_times() == {}  # tables added since the first release exist
    store.close()
    assert Store(tmp_path).find_app("demo")["version"] == 1  # reopening is a no-op


def test_newer_database_is_refused(tmp_path):
    import sqlite3

    import pytest

    from mctl.core.server.store import SCHEMA_VERSION
    from mctl.exception import InvalidError

    db = sqlite3.connect(tmp_path / "state.db")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(InvalidError, match="newer than this mctl"):
        Store(tmp_path)


def test_a_failed_migration_step_leaves_the_database_as_it_was(tmp_path, monkeypatch):
    import pytest

    from mctl.core.server import store as store_module

    Store(tmp_path).close()
    steps = [*store_module.MIGRATIONS, "CREATE TABLE extra (x INTEGER); SELECT nonsense FROM nowhere;"]
    monkeypatch.setattr(store_module, "MIGRATIONS", steps)
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", len(steps))
    with pytest.raises(Exception, match="nowhere"):
        Store(tmp_path)
    monkeypatch.undo()
    store = Store(tmp_path)
    assert store.db.execute("PRAGMA user_version").fetchone() == (store_module.SCHEMA_VERSION,)
    assert store.db.execute("SELECT name FROM sqlite_master WHERE name = 'extra'").fetchone() is None


def test_retention_keeps_blobs_of_kept_outputs(tmp_path):
    store = Store(tmp_path)
    old = time.time() - 10 * 86400
    (store.blob_dir / "bl-recentresult").write_bytes(b"x")
    os.utime(store.blob_dir / "bl-recentresult", (old, old))  # written long ago, e.g. re-used
    store.new_calls.append(("fc-new", "fu-x", time.time()))
    store.new_outputs.append(("fc-new", 0, 0, "success", b"bl-recentresult", 1, time.time()))
    store.commit()
    assert store.gc(time.time() - 7 * 86400)["blobs"] == 0
    assert (store.blob_dir / "bl-recentresult").exists()


def test_reuploading_a_blob_restarts_its_age(tmp_path):
    store = Store(tmp_path)
    old = time.time() - 10 * 86400
    path = store.blob_dir / "bl-bundle"
    path.write_bytes(b"x")
    os.utime(path, (old, old))
    assert store.refresh_blob("bl-bundle") is True
    assert store.refresh_blob("bl-absent") is False
    assert store.gc(time.time() - 7 * 86400)["blobs"] == 0 and path.exists()


def test_retention_clears_queue_partitions_past_their_ttl(tmp_path):
    store = Store(tmp_path)
    now = time.time()
    store.db.executemany("INSERT INTO queue_items (object_id, partition, value, created) "
                         "VALUES (?,?,?,?)", [("qu-1", "old", b"1", now), ("qu-1", "live", b"2", now),
                                              ("qu-1", "legacy", b"3", now)])
    store.db.executemany("INSERT INTO queue_partitions VALUES (?,?,?)",
                         [("qu-1", "old", now - 1), ("qu-1", "live", now + 60)])
    store.gc(now - 7 * 86400)
    left = store.db.execute("SELECT partition FROM queue_items ORDER BY partition").fetchall()
    assert left == [("legacy",), ("live",)]  # a partition from before TTLs never expires
    assert store.db.execute("SELECT partition FROM queue_partitions").fetchall() == [("live",)]
