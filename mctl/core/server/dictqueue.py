"""Dicts and Queues (`mctl.Dict`, `mctl.Queue`) in the control plane's SQLite store.

The control plane never unpickles keys or values: a Dict maps pickled-key bytes to pickled-value
bytes, a Queue keeps pickled items in FIFO order per partition. Every write commits at once (a
single autocommit statement or a short transaction on the event loop's thread, so it never
interleaves with `Store.commit`). A blocking `get` waits on an in-memory event per (queue,
partition) that a `put` sets: waiters do not poll the database.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any, Callable

from mctl.core import ids
from mctl.exception import InvalidError, NotFoundError, RequestSizeError

KINDS = ("dict", "queue")
# Modal's limits: a Queue item up to 1 MiB, a partition up to 5,000 items, partition keys of
# 1 to 64 bytes. Dict entries: Modal has no documented value limit below its 100 MiB request
# size; mctl's requests are at most 64 MiB (protocol.MAX_FRAME), so a key and value up to 32 MiB.
QUEUE_ITEM_LIMIT = 1024 * 1024
QUEUE_PARTITION_ITEMS = 5000
PARTITION_KEY_BYTES = 64
DICT_ENTRY_LIMIT = 32 * 1024 * 1024
# Modal clears a Queue partition this long after its last put unless the put names a shorter
# `partition_ttl` (seconds); mctl does the same.
DEFAULT_PARTITION_TTL = 24 * 3600
# The longest a single blocking request waits; clients ask again until their own timeout.
MAX_WAIT = 50.0


def _label(kind: str) -> str:
    return "Dict" if kind == "dict" else "Queue"


def check_partition_ttl(ttl: Any) -> float:
    if ttl is None:
        return float(DEFAULT_PARTITION_TTL)
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl \
            <= DEFAULT_PARTITION_TTL:
        raise InvalidError(f"partition_ttl={ttl!r} must be a number of seconds above 0 and at "
                           f"most {DEFAULT_PARTITION_TTL} (24 hours, the default).")
    return float(ttl)


def check_partition(partition: str | None) -> str:
    """'' for the default partition; a named one must be 1 to 64 bytes."""
    if partition is None:
        return ""
    if not isinstance(partition, str) or not 0 < len(partition.encode()) <= PARTITION_KEY_BYTES:
        raise InvalidError(f"Queue partition key {partition!r} must be a non-empty string of at "
                           f"most {PARTITION_KEY_BYTES} bytes; pass partition=None for the "
                           "default partition.")
    return partition


class Wakeups:
    """Events that wake the requests waiting on one key (a queue partition) when it changes."""

    def __init__(self) -> None:
        self._events: dict[tuple[str, ...], asyncio.Event] = {}
        self._waiting: dict[tuple[str, ...], int] = {}

    async def wait(self, key: tuple[str, ...], timeout: float) -> None:
        event = self._events.setdefault(key, asyncio.Event())
        self._waiting[key] = self._waiting.get(key, 0) + 1
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self._waiting[key] -= 1
            if not self._waiting[key]:
                del self._waiting[key]
                if self._events.get(key) is event:
                    del self._events[key]

    def wake(self, key: tuple[str, ...]) -> None:
        event = self._events.pop(key, None)
        if event is not None:
            event.set()


class DictQueueStore:
    """Named and ephemeral Dicts and Queues: lookups, entries, items and their wake-ups."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.items_put = Wakeups()  # (object_id, partition): an item arrived
        self.items_taken = Wakeups()  # (object_id, partition): room in a full partition
        self._next_expiry: dict[str, float] = {}  # queue id -> its earliest partition expiry

    # --- objects -------------------------------------------------------------------------------
    def lookup(self, kind: str, name: str, create_if_missing: bool) -> tuple[str, bool]:
        """(object id, created) of the named object; NotFoundError unless `create_if_missing`."""
        _check_kind(kind)
        if not isinstance(name, str) or not name or len(name) > 128:
            raise InvalidError(f"Invalid {_label(kind)} name {name!r}: use a non-empty string of "
                               "at most 128 characters.")
        row = self.db.execute("SELECT object_id FROM kv_objects WHERE kind = ? AND name = ?",
                              (kind, name)).fetchone()
        if row is not None:
            return row[0], False
        if not create_if_missing:
            raise NotFoundError(f"{_label(kind)} {name!r} not found; create it with "
                                f"mctl.{_label(kind)}.from_name({name!r}, create_if_missing=True).")
        object_id = ids.new_id(kind)
        self.db.execute("INSERT INTO kv_objects VALUES (?,?,?,?)", (object_id, kind, name,
                                                                   time.time()))
        return object_id, True

    def create_ephemeral(self, kind: str) -> str:
        _check_kind(kind)
        self._forget_old_ephemeral()
        object_id = ids.new_id(kind)
        self.db.execute("INSERT INTO kv_objects VALUES (?,?,NULL,?)", (object_id, kind,
                                                                      time.time()))
        return object_id

    def _forget_old_ephemeral(self) -> None:
        """Ephemeral objects whose creator never deleted them (it died inside the `with`) go
        after MCTL_RETENTION_DAYS (default 7), as old outputs do."""
        import os

        cutoff = time.time() - float(os.environ.get("MCTL_RETENTION_DAYS", "7")) * 86400
        for (object_id,) in self.db.execute("SELECT object_id FROM kv_objects WHERE name IS "
                                            "NULL AND created < ?", (cutoff,)).fetchall():
            self.delete("dict" if object_id.startswith("di-") else "queue", object_id)

    def list(self, kind: str) -> list[dict[str, Any]]:
        _check_kind(kind)
        if kind == "queue":
            self.expire()
        table = "dict_entries" if kind == "dict" else "queue_items"
        rows = self.db.execute(
            f"SELECT o.object_id, o.name, o.created, (SELECT COUNT(*) FROM {table} t "
            "WHERE t.object_id = o.object_id) FROM kv_objects o WHERE o.kind = ? AND o.name IS "
            "NOT NULL ORDER BY o.name", (kind,)).fetchall()
        return [{"object_id": oid, "name": name, "created": created, "items": n}
                for oid, name, created, n in rows]

    def delete(self, kind: str, name_or_id: str) -> bool:
        _check_kind(kind)
        row = self.db.execute("SELECT object_id FROM kv_objects WHERE kind = ? AND "
                              "(name = ? OR object_id = ?)", (kind, name_or_id, name_or_id)
                              ).fetchone()
        if row is None:
            return False
        object_id = row[0]
        self._transaction(lambda db: (
            db.execute("DELETE FROM dict_entries WHERE object_id = ?", (object_id,)),
            db.execute("DELETE FROM queue_items WHERE object_id = ?", (object_id,)),
            db.execute("DELETE FROM queue_partitions WHERE object_id = ?", (object_id,)),
            db.execute("DELETE FROM kv_objects WHERE object_id = ?", (object_id,))))
        return True

    def delete_ephemeral(self, object_id: str) -> bool:
        row = self.db.execute("SELECT name FROM kv_objects WHERE object_id = ?",
                              (object_id,)).fetchone()
        if row is None:
            return False
        if row[0] is not None:
            raise InvalidError(f"{object_id} is the named object {row[0]!r}; delete it with "
                               "`mctl dict delete` or `mctl queue delete`.")
        return self.delete("dict" if object_id.startswith("di-") else "queue", object_id)

    def kind_of(self, object_id: str) -> str:
        row = self.db.execute("SELECT kind FROM kv_objects WHERE object_id = ?",
                              (object_id,)).fetchone()
        if row is None:
            kind = "dict" if object_id.startswith("di-") else "queue"
            raise NotFoundError(f"{_label(kind)} {object_id} no longer exists (it was deleted); "
                                f"look it up again with mctl.{_label(kind)}.from_name.")
        return row[0]

    def _transaction(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work(db)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return result

    # --- Dict ----------------------------------------------------------------------------------
    def dict_get(self, object_id: str, key: bytes) -> bytes | None:
        row = self.db.execute("SELECT value FROM dict_entries WHERE object_id = ? AND key = ?",
                              (object_id, key)).fetchone()
        return row[0] if row else None

    def dict_put(self, object_id: str, pairs: list[tuple[bytes, bytes]],
                 skip_if_exists: bool = False) -> bool:
        """Store the pairs; with `skip_if_exists` (one pair) False when the key was there."""
        for key, value in pairs:
            if len(key) + len(value) > DICT_ENTRY_LIMIT:
                raise RequestSizeError(
                    f"A Dict entry of {len(key) + len(value):,} bytes (pickled) is over the "
                    f"{DICT_ENTRY_LIMIT // (1024 * 1024)} MiB limit; store large data in a "
                    "mctl.Volume and put its path in the Dict.")
        now = time.time()
        if skip_if_exists:
            cur = self.db.execute("INSERT OR IGNORE INTO dict_entries VALUES (?,?,?,?)",
                                  (object_id, pairs[0][0], pairs[0][1], now))
            return cur.rowcount == 1
        rows = [(object_id, k, v, now) for k, v in pairs]
        if len(rows) == 1:
            self.db.execute("INSERT OR REPLACE INTO dict_entries VALUES (?,?,?,?)", rows[0])
        else:
            self._transaction(lambda db: db.executemany(
                "INSERT OR REPLACE INTO dict_entries VALUES (?,?,?,?)", rows))
        return True

    def dict_pop(self, object_id: str, key: bytes) -> bytes | None:
        def pop(db: sqlite3.Connection) -> bytes | None:
            row = db.execute("SELECT value FROM dict_entries WHERE object_id = ? AND key = ?",
                             (object_id, key)).fetchone()
            if row is not None:
                db.execute("DELETE FROM dict_entries WHERE object_id = ? AND key = ?",
                           (object_id, key))
            return row[0] if row else None

        return self._transaction(pop)

    def dict_len(self, object_id: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM dict_entries WHERE object_id = ?",
                               (object_id,)).fetchone()[0]

    def dict_entries(self, object_id: str, limit: int | None = None
                     ) -> list[tuple[bytes, bytes]]:
        return self.db.execute("SELECT key, value FROM dict_entries WHERE object_id = ? "
                               "ORDER BY rowid LIMIT ?", (object_id, limit or -1)).fetchall()

    def dict_clear(self, object_id: str) -> None:
        self.db.execute("DELETE FROM dict_entries WHERE object_id = ?", (object_id,))

    # --- Queue ---------------------------------------------------------------------------------
    def expire(self, object_id: str | None = None) -> int:
        """Clear the partitions (of one queue, or of all) whose `partition_ttl` has passed since
        their last put; the number of partitions cleared."""
        now = time.time()
        if object_id is None:
            self._next_expiry.clear()
            rows = self.db.execute("SELECT object_id, partition FROM queue_partitions WHERE "
                                   "expires <= ?", (now,)).fetchall()
        else:
            # the queue's earliest expiry, remembered: most operations need no query for it
            soonest = self._next_expiry.get(object_id)
            if soonest is None:
                soonest = self.db.execute("SELECT MIN(expires) FROM queue_partitions WHERE "
                                          "object_id = ?", (object_id,)).fetchone()[0]
                soonest = self._next_expiry[object_id] = soonest if soonest is not None \
                    else float("inf")
            if now < soonest:
                return 0
            self._next_expiry.pop(object_id, None)
            rows = self.db.execute("SELECT object_id, partition FROM queue_partitions WHERE "
                                   "object_id = ? AND expires <= ?", (object_id, now)).fetchall()
        if not rows:
            return 0

        def clear(db: sqlite3.Connection) -> None:
            for oid, part in rows:
                # unless a put extended it since the read above
                if db.execute("DELETE FROM queue_partitions WHERE object_id = ? AND partition "
                              "= ? AND expires <= ?", (oid, part, now)).rowcount:
                    db.execute("DELETE FROM queue_items WHERE object_id = ? AND partition = ?",
                               (oid, part))

        self._transaction(clear)
        for oid, part in rows:
            self.items_taken.wake((oid, part))
        return len(rows)

    def _queue_len(self, object_id: str, partition: str | None) -> int:
        self.expire(object_id)
        if partition is None:
            sql, args = "SELECT COUNT(*) FROM queue_items WHERE object_id = ?", (object_id,)
        else:
            sql = "SELECT COUNT(*) FROM queue_items WHERE object_id = ? AND partition = ?"
            args = (object_id, partition)  # type: ignore[assignment]
        return self.db.execute(sql, args).fetchone()[0]

    def queue_len(self, object_id: str, partition: str, total: bool = False) -> int:
        return self._queue_len(object_id, None if total else partition)

    def _try_put(self, object_id: str, partition: str, values: list[bytes], ttl: float) -> bool:
        if self._queue_len(object_id, partition) + len(values) > QUEUE_PARTITION_ITEMS:
            return False
        now = time.time()

        def put(db: sqlite3.Connection) -> None:
            db.executemany(
                "INSERT INTO queue_items (object_id, partition, value, created) VALUES (?,?,?,?)",
                [(object_id, partition, v, now) for v in values])
            db.execute("INSERT OR REPLACE INTO queue_partitions VALUES (?,?,?)",
                       (object_id, partition, now + ttl))

        self._transaction(put)
        known = self._next_expiry.get(object_id)
        if known is not None:  # a put may only move this partition's expiry later, but it may
            # be the queue's first: the remembered minimum stays a lower bound either way
            self._next_expiry[object_id] = min(known, now + ttl)
        self.items_put.wake((object_id, partition))
        return True

    async def queue_put(self, object_id: str, partition: str, values: list[bytes],
                        timeout: float | None, still_wanted: Callable[[], bool],
                        ttl: float = DEFAULT_PARTITION_TTL) -> bool:
        """Append the values; False when the partition stays full for `timeout` seconds. The
        partition is cleared `ttl` seconds after this put unless another put comes first."""
        for value in values:
            if len(value) > QUEUE_ITEM_LIMIT:
                raise RequestSizeError(
                    f"A Queue item of {len(value):,} bytes (pickled) is over the 1 MiB limit; "
                    "put large data in a mctl.Dict or a mctl.Volume and queue its key.")
        if len(values) > QUEUE_PARTITION_ITEMS:
            raise RequestSizeError(f"put_many of {len(values):,} items is over the "
                                   f"{QUEUE_PARTITION_ITEMS:,} items a partition holds; put "
                                   "fewer at a time.")
        deadline = time.monotonic() + min(timeout or 0.0, MAX_WAIT)
        while True:
            if self._try_put(object_id, partition, values, ttl):
                return True
            left = deadline - time.monotonic()
            if left <= 0 or not still_wanted():
                return False
            await self.items_taken.wait((object_id, partition), left)
            self.kind_of(object_id)  # deleted while waiting: NotFoundError

    def _try_get(self, object_id: str, partition: str, n: int) -> list[bytes]:
        self.expire(object_id)

        def take(db: sqlite3.Connection) -> list[bytes]:
            rows = db.execute("SELECT id, value FROM queue_items WHERE object_id = ? AND "
                              "partition = ? ORDER BY id LIMIT ?",
                              (object_id, partition, n)).fetchall()
            if rows:
                db.execute(f"DELETE FROM queue_items WHERE id IN ({','.join('?' * len(rows))})",
                           [r[0] for r in rows])
            return [r[1] for r in rows]

        values = self._transaction(take)
        if values:
            self.items_taken.wake((object_id, partition))
        return values

    async def queue_get(self, object_id: str, partition: str, n: int, timeout: float | None,
                        still_wanted: Callable[[], bool]) -> list[bytes]:
        """Up to `n` items; waits up to `timeout` (at most MAX_WAIT) s for the first; [] if none.

        `still_wanted()` is False once the caller hung up: its request must not take items
        that nobody will receive."""
        deadline = time.monotonic() + min(timeout or 0.0, MAX_WAIT)
        while True:
            values = self._try_get(object_id, partition, n)
            if values:
                return values
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            await self.items_put.wait((object_id, partition), left)
            if not still_wanted():
                return []
            self.kind_of(object_id)

    def queue_peek(self, object_id: str, partition: str, after: int, n: int
                   ) -> list[tuple[int, bytes]]:
        """Items after id `after`, without removing them (`Queue.iterate`, `mctl queue peek`)."""
        self.expire(object_id)
        return self.db.execute("SELECT id, value FROM queue_items WHERE object_id = ? AND "
                               "partition = ? AND id > ? ORDER BY id LIMIT ?",
                               (object_id, partition, after, n)).fetchall()

    async def wait_for_item(self, object_id: str, partition: str, timeout: float) -> None:
        await self.items_put.wait((object_id, partition), min(timeout, MAX_WAIT))

    def queue_clear(self, object_id: str, partition: str, all_partitions: bool) -> None:
        if all_partitions:
            parts = [p for (p,) in self.db.execute(
                "SELECT DISTINCT partition FROM queue_items WHERE object_id = ?", (object_id,))]
            self.db.execute("DELETE FROM queue_items WHERE object_id = ?", (object_id,))
            self.db.execute("DELETE FROM queue_partitions WHERE object_id = ?", (object_id,))
        else:
            parts = [partition]
            self.db.execute("DELETE FROM queue_items WHERE object_id = ? AND partition = ?",
                            (object_id, partition))
            self.db.execute("DELETE FROM queue_partitions WHERE object_id = ? AND partition = ?",
                            (object_id, partition))
        for part in parts:
            self.items_taken.wake((object_id, part))


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise InvalidError(f"Unknown object kind {kind!r}; expected 'dict' or 'queue'.")
