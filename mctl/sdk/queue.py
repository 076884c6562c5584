"""`mctl.Queue`: a durable FIFO queue on the control plane, with partitions.

    q = mctl.Queue.from_name("jobs", create_if_missing=True)
    q.put(1); q.put_many([2, 3], partition="a"); q.get(timeout=5); q.get_many(10, block=False)
    for item in q.iterate(): ...        # read in place
    await q.get.aio()

As Python's `queue.Queue`: a blocking `get` that times out raises `queue.Empty`; a `put` into a
full partition (5,000 items) raises `queue.Full` once it stops waiting. A blocking `get` waits in
the control plane, which answers as soon as an item is put (no polling).

As in Modal, a partition is cleared `partition_ttl` seconds (default and at most 24 hours)
after its last `put`/`put_many`.
"""

from __future__ import annotations

import queue as _stdlib_queue
import time
from typing import Any, AsyncIterator

from mctl.core.serialization import dumps, loads
from mctl.exception import InvalidError
from mctl.sdk.stored import StoredObject

# A blocking request waits at most this long in the control plane; a longer wait asks again.
_POLL = 50.0


def _check_partition(partition: str | None) -> None:
    if partition is not None and (not isinstance(partition, str) or not partition
                                  or len(partition.encode()) > 64):
        raise InvalidError(f"Queue partition key {partition!r} must be a non-empty string of at "
                           "most 64 bytes; pass partition=None for the default partition.")


class Queue(StoredObject):
    """A distributed FIFO queue (modal.Queue)."""

    kind = "queue"
    label = "Queue"

    def __init__(self, name: str | None = None, *, create_if_missing: bool = False,
                 object_id: str | None = None, server: str | None = None) -> None:
        super().__init__(name, create_if_missing=create_if_missing, object_id=object_id,
                         server=server)
        self.put = self._twin(self._put)
        self.put_many = self._twin(self._put_many)
        self.get = self._twin(self._get)
        self.get_many = self._twin(self._get_many)
        self.len = self._twin(self._len)
        self.clear = self._twin(self._clear)
        self.iterate = self._twin_iter(self._iterate)

    @staticmethod
    def from_name(name: str, *, environment_name: str | None = None,
                  create_if_missing: bool = False, client: Any = None) -> Queue:
        """The Queue called `name`, looked up on first use (NotFoundError if it does not exist
        and `create_if_missing` is False)."""
        if not isinstance(name, str) or not name:
            raise InvalidError(f"Invalid Queue name {name!r}: pass a non-empty string.")
        return Queue(name, create_if_missing=create_if_missing)

    @staticmethod
    def ephemeral(client: Any = None, environment_name: str | None = None) -> Any:
        """`with mctl.Queue.ephemeral() as q:` a nameless Queue, deleted when the block ends."""
        return Queue._ephemeral()

    @staticmethod
    def delete(name: str, *, allow_missing: bool = False, environment_name: str | None = None,
               client: Any = None) -> None:
        """Delete the named Queue and its items."""
        Queue._delete(name, allow_missing)

    # --- operations ----------------------------------------------------------------------------
    async def _put(self, v: Any, block: bool = True, timeout: float | None = None, *,
                   partition: str | None = None, partition_ttl: int = 86400) -> None:
        """Add `v` at the end; a full partition waits (up to `timeout`), then `queue.Full`."""
        await self._put_many([v], block, timeout, partition=partition,
                             partition_ttl=partition_ttl)

    async def _put_many(self, vs: list[Any], block: bool = True, timeout: float | None = None,
                        *, partition: str | None = None, partition_ttl: int = 86400) -> None:
        _check_partition(partition)
        if isinstance(partition_ttl, bool) or not isinstance(partition_ttl, (int, float)) \
                or not 0 < partition_ttl <= 86400:
            raise InvalidError(f"partition_ttl={partition_ttl!r} must be a number of seconds "
                               "above 0 and at most 86400 (24 hours, the default).")
        payloads = [dumps(v) for v in vs]
        if not payloads:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 0.0 if not block else _wait_left(deadline)
            reply, _ = await self._call("put", {"partition": partition, "timeout": wait,
                                                "partition_ttl": partition_ttl}, payloads)
            if not reply["full"]:
                return
            if not block or (deadline is not None and time.monotonic() >= deadline):
                raise _stdlib_queue.Full()

    async def _get(self, block: bool = True, timeout: float | None = None, *,
                   partition: str | None = None) -> Any:
        """The next item. Empty queue: None at once with block=False; else wait (up to
        `timeout`, then `queue.Empty`)."""
        values = await self._take(1, block, timeout, partition)
        return values[0] if values else None

    async def _get_many(self, n_values: int, block: bool = True, timeout: float | None = None,
                        *, partition: str | None = None) -> list[Any]:
        """Up to `n_values` items, as soon as there is at least one (or [] with block=False)."""
        if n_values < 1:
            raise InvalidError(f"get_many needs n_values >= 1, got {n_values}.")
        return await self._take(n_values, block, timeout, partition)

    async def _take(self, n: int, block: bool, timeout: float | None,
                    partition: str | None) -> list[Any]:
        _check_partition(partition)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 0.0 if not block else _wait_left(deadline)
            _, out = await self._call("get", {"partition": partition, "n": n, "timeout": wait})
            if out:
                return [loads(v) for v in out]
            if not block:
                return []
            if deadline is not None and time.monotonic() >= deadline:
                raise _stdlib_queue.Empty()

    async def _len(self, *, partition: str | None = None, total: bool = False) -> int:
        """Items in `partition` (default: the default partition), or in all with total=True."""
        _check_partition(partition)
        if partition is not None and total:
            raise InvalidError("Queue.len takes partition= or total=True, not both.")
        reply, _ = await self._call("len", {"partition": partition, "total": total})
        return int(reply["len"])

    async def _clear(self, *, partition: str | None = None, all: bool = False) -> None:  # noqa: A002
        _check_partition(partition)
        if partition is not None and all:
            raise InvalidError("Queue.clear takes partition= or all=True, not both.")
        await self._call("clear", {"partition": partition, "all": all})

    async def _iterate(self, *, partition: str | None = None,
                       item_poll_timeout: float = 0.0) -> AsyncIterator[Any]:
        """Each item in order, without removing it; after the last, wait up to
        `item_poll_timeout` seconds for another before stopping."""
        _check_partition(partition)
        after = 0
        while True:
            reply, out = await self._call("peek", {"partition": partition, "after": after,
                                                   "n": 100, "timeout": item_poll_timeout})
            if not out:
                return
            for item_id, value in zip(reply["ids"], out):
                after = item_id
                yield loads(value)

    def __bool__(self) -> bool:
        return True


def _wait_left(deadline: float | None) -> float:
    if deadline is None:
        return _POLL
    return max(0.0, min(_POLL, deadline - time.monotonic()))
