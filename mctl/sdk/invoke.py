"""How a handle's call reaches the control plane: one input, many inputs, a generator, a spawn.

Pickling and unpickling happen in the caller's thread; the background loop only moves bytes. Sync
`.map` reads results a batch at a time, so a large map costs a few thread hand-offs, not one per input.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, AsyncIterator, Callable, Iterable, Iterator

from mctl.core import protocol
from mctl.core.client import CallStream, Client, new_call_id, run_async, run_sync
from mctl.core.serialization import loads, raise_remote

CHUNK_INPUTS = 1000      # inputs per put_inputs message
WINDOW = 4               # unacknowledged chunks in flight per map


class Target:
    """What a call goes to: a control plane client, a function id and how to build payloads."""

    def __init__(self, client: Client, function_id: str,
                 payload: Callable[[tuple[Any, ...], dict[str, Any]], bytes]) -> None:
        self.client = client
        self.function_id = function_id
        self.payload = payload


def decode(item: dict[str, Any], data: bytes) -> Any:
    """A final output's value, or raise the remote exception."""
    status = item["status"]
    if status in ("success", "item"):
        return loads(data)
    if status == "gen_done":
        return None
    raise_remote(data)


# --- single call ------------------------------------------------------------------------------
async def _one(target: Target, payload: bytes) -> tuple[dict[str, Any], bytes]:
    client = target.client
    call_id = new_call_id()
    stream = client.open_stream(call_id)
    try:
        await client.put_inputs(target.function_id, call_id, 0, [payload])
        item, data = await stream.next()
        return item, await client.output_payload(item, data)
    finally:
        client.close_stream(call_id)


def call(target: Target, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return decode(*run_sync(_one(target, target.payload(args, kwargs))))


async def call_aio(target: Target, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    payload = await asyncio.to_thread(target.payload, args, kwargs)
    return decode(*await run_async(_one(target, payload)))


# --- spawn ------------------------------------------------------------------------------------
async def _spawn(target: Target, payloads: list[bytes]) -> str:
    call_id = new_call_id()
    for start in range(0, max(len(payloads), 1), CHUNK_INPUTS):
        await target.client.put_inputs(target.function_id, call_id, start,
                                       payloads[start:start + CHUNK_INPUTS], subscribe=False)
    return call_id


def spawn(target: Target, arg_sets: Iterable[tuple[tuple[Any, ...], dict[str, Any]]]) -> str:
    return run_sync(_spawn(target, [target.payload(a, k) for a, k in arg_sets]))


async def spawn_aio(target: Target, arg_sets: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> str:
    payloads = await asyncio.to_thread(lambda: [target.payload(a, k) for a, k in arg_sets])
    return await run_async(_spawn(target, payloads))


async def wait_output(client: Client, call_id: str, index: int,
                      timeout: float | None) -> tuple[dict[str, Any], bytes]:
    stream = await client.subscribe(call_id)
    try:
        async def first() -> tuple[dict[str, Any], bytes]:
            while True:
                item, data = await stream.next()
                if item["idx"] == index and item["status"] != "item":
                    return item, await client.output_payload(item, data)

        try:
            return await asyncio.wait_for(first(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"Function call {call_id} has no output after {timeout}s; "
                               "call .get() again to keep waiting.") from None
    finally:
        client.close_stream(call_id)


# --- generators -------------------------------------------------------------------------------
async def _gen_batches(target: Target, payload: bytes, out: asyncio.Queue[Any]) -> None:
    client = target.client
    call_id = new_call_id()
    stream = client.open_stream(call_id)
    try:
        await client.put_inputs(target.function_id, call_id, 0, [payload])
        while True:
            item, data = await stream.next()
            await out.put((item, await client.output_payload(item, data)))
            if item["status"] != "item":
                return
    finally:
        client.close_stream(call_id)


def _gen_items(item: dict[str, Any], data: bytes) -> tuple[bool, Any]:
    if item["status"] == "item":
        return True, loads(data)
    decode(item, data)  # raises on failure
    return False, None


def call_gen(target: Target, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[Any]:
    payload = target.payload(args, kwargs)
    results: asyncio.Queue[Any] | None = None

    async def start() -> asyncio.Queue[Any]:
        q: asyncio.Queue[Any] = asyncio.Queue()
        task = asyncio.get_running_loop().create_task(_gen_batches(target, payload, q))
        task.add_done_callback(lambda t: t.exception() and q.put_nowait(t.exception()))
        return q

    results = run_sync(start())

    async def get() -> Any:
        got = await results.get()  # type: ignore[union-attr]
        if isinstance(got, BaseException):
            raise got
        return got

    while True:
        more, value = _gen_items(*run_sync(get()))
        if not more:
            return
        yield value


async def call_gen_aio(target: Target, args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> AsyncIterator[Any]:
    # Runs the generator call on the background loop, reading items through a thread-safe queue.
    import queue as thread_queue

    payload = await asyncio.to_thread(target.payload, args, kwargs)
    handoff: thread_queue.Queue[Any] = thread_queue.Queue()

    async def pump() -> None:
        q: asyncio.Queue[Any] = asyncio.Queue()
        task = asyncio.get_running_loop().create_task(_gen_batches(target, payload, q))
        while True:
            getter = asyncio.ensure_future(q.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                handoff.put(getter.result())
                if getter.result()[0]["status"] != "item":
                    return
            else:
                getter.cancel()
                if task.exception():
                    handoff.put(task.exception())
                return

    run_async(pump())
    while True:
        got = await asyncio.to_thread(handoff.get)
        if isinstance(got, BaseException):
            raise got
        more, value = _gen_items(*got)
        if not more:
            return
        yield value


# --- map --------------------------------------------------------------------------------------
class MapRun:
    """One `.map` call: chunks go out with a window of unacknowledged chunks, results come back in
    batches of whatever has arrived."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.call_id = new_call_id()
        self.stream: CallStream | None = None
        self.window: asyncio.Semaphore | None = None
        self.total: int | None = None  # the number of inputs, once the producer has sent them all

    async def open(self) -> None:
        self.stream = self.target.client.open_stream(self.call_id)
        self.window = asyncio.Semaphore(WINDOW)

    async def submit(self, start: int, payloads: list[bytes]) -> None:
        assert self.window is not None
        await self.window.acquire()

        async def send() -> None:
            try:
                await self.target.client.put_inputs(self.target.function_id, self.call_id, start,
                                                    payloads)
            except BaseException as exc:
                self.stream.fail(exc)  # type: ignore[union-attr]
            finally:
                self.window.release()  # type: ignore[union-attr]

        asyncio.get_running_loop().create_task(send())

    async def produced(self, total: int) -> None:
        """Every input is sent. Wakes a consumer already waiting in `batch`: it may have looked
        at `total` before it was set, after the last output had arrived (else a map that never
        returns)."""
        self.total = total
        self.stream.queue.put_nowait(_WAKE)  # type: ignore[union-attr]

    async def fail(self, exc: BaseException) -> None:
        self.stream.fail(exc)  # type: ignore[union-attr]

    async def batch(self) -> list[tuple[dict[str, Any], bytes]]:
        """What has arrived: at least one output, or nothing when `produced` woke the wait."""
        assert self.stream is not None
        got = [await self.stream.next()]
        while not self.stream.queue.empty():
            item = self.stream.queue.get_nowait()
            if isinstance(item, BaseException):
                raise item
            got.append(item)
        client = self.target.client
        return [(item, await client.output_payload(item, data))
                for item, data in (g for g in got if g is not _WAKE)]

    def done(self, results: "_Results") -> bool:
        return self.total is not None and results.received >= self.total

    async def close(self, cancel: bool) -> None:
        if cancel:
            await self.target.client.cancel(self.call_id)
        self.target.client.close_stream(self.call_id)


_WAKE = object()  # not an output: the producer finished (see MapRun.produced)


def _chunks(target: Target, arg_sets: Iterable[tuple[tuple[Any, ...], dict[str, Any]]]
            ) -> Iterator[tuple[int, list[bytes]]]:
    chunk: list[bytes] = []
    start = size = 0
    n = 0
    for args, kwargs in arg_sets:
        payload = target.payload(args, kwargs)
        chunk.append(payload)
        size += len(payload)
        n += 1
        if len(chunk) >= CHUNK_INPUTS or size >= protocol.CHUNK_BYTES:
            yield start, chunk
            start, chunk, size = n, [], 0
    if chunk:
        yield start, chunk


class _Results:
    """Orders (or not) decoded outputs and applies `return_exceptions`."""

    def __init__(self, order: bool, return_exceptions: bool) -> None:
        self.order, self.return_exceptions = order, return_exceptions
        self.buffer: dict[int, Any] = {}
        self.next_idx = 0
        self.received = 0

    def add(self, batch: list[tuple[dict[str, Any], bytes]]) -> list[Any]:
        ready = []
        for item, data in batch:
            if item["status"] == "item":
                continue
            self.received += 1
            try:
                value = decode(item, data)
            except Exception as exc:
                if not self.return_exceptions:
                    raise
                value = exc
            if self.order:
                self.buffer[item["idx"]] = value
            else:
                ready.append(value)
        if self.order:
            while self.next_idx in self.buffer:
                ready.append(self.buffer.pop(self.next_idx))
                self.next_idx += 1
        return ready


def map_sync(target: Target, arg_sets: Iterable[tuple[tuple[Any, ...], dict[str, Any]]],
             order_outputs: bool = True, return_exceptions: bool = False) -> Iterator[Any]:
    run = MapRun(target)
    run_sync(run.open())
    producer_error: list[BaseException] = []

    def produce() -> None:
        n = 0
        try:
            for start, payloads in _chunks(target, arg_sets):
                run_sync(run.submit(start, payloads))
                n = start + len(payloads)
        except BaseException as exc:  # noqa: BLE001 - reported to the consumer
            producer_error.append(exc)
            run_sync(run.fail(exc))  # wakes the consumer waiting for outputs
            return
        run_sync(run.produced(n))

    producer = threading.Thread(target=produce, name="mctl-map-producer", daemon=True)
    producer.start()
    results = _Results(order_outputs, return_exceptions)
    finished = False
    try:
        while not run.done(results):
            yield from results.add(run_sync(run.batch()))
        producer.join()
        if producer_error:
            raise producer_error[0]
        finished = True
    finally:
        run_sync(run.close(cancel=not finished))


async def map_aio(target: Target, arg_sets: Any, order_outputs: bool = True,
                  return_exceptions: bool = False) -> AsyncIterator[Any]:
    run = MapRun(target)
    await run_async(run.open())

    async def produce() -> None:
        n = 0
        chunk: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        try:
            async for arg_set in _aiter(arg_sets):
                chunk.append(arg_set)
                if len(chunk) >= CHUNK_INPUTS:
                    payloads = await asyncio.to_thread(
                        lambda c=chunk: [target.payload(a, k) for a, k in c])
                    await run_async(run.submit(n, payloads))
                    n += len(chunk)
                    chunk = []
            if chunk:
                payloads = await asyncio.to_thread(lambda: [target.payload(a, k) for a, k in chunk])
                await run_async(run.submit(n, payloads))
                n += len(chunk)
        except Exception as exc:  # the consumer may be waiting for outputs: wake it with this
            await run_async(run.fail(exc))
            return
        await run_async(run.produced(n))

    producer = asyncio.ensure_future(produce())
    results = _Results(order_outputs, return_exceptions)
    finished = False
    try:
        while not run.done(results):
            for value in results.add(await run_async(run.batch())):
                yield value
        finished = True
    finally:
        producer.cancel()
        await run_async(run.close(cancel=not finished))


async def _aiter(items: Any) -> AsyncIterator[Any]:
    if hasattr(items, "__aiter__"):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
