"""The caller's side: one WebSocket to the control plane, driven from a background event loop.

User code is mostly synchronous, so every client lives on one shared background loop thread; sync
calls hand coroutines to it and wait, `.aio` calls await it from the user's loop. On a lost
connection the client reconnects, resends unacknowledged chunks (the server ignores repeats) and
resubscribes to its calls (outputs are deduplicated by index).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import itertools
import logging
import os
import threading
from typing import Any, Awaitable, Coroutine, TypeVar

from mctl.core import config, ids, protocol, transport
from mctl.exception import AuthError, ConnectionError, InputCancellation, NotFoundError

log = logging.getLogger("mctl.client")
T = TypeVar("T")

RECONNECT_TIMEOUT = float(os.environ.get("MCTL_RECONNECT_TIMEOUT", "120"))


class _LoopThread:
    """The one background event loop of this process."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._loop.is_closed():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="mctl-client", daemon=True)
                thread.start()
                cls._loop = loop
            return cls._loop


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    loop = _LoopThread.get()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        raise RuntimeError("mctl's blocking API was called from its own event loop.")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise
    except KeyboardInterrupt:
        future.cancel()
        raise


def run_async(coro: Coroutine[Any, Any, T]) -> Awaitable[T]:
    """Run on the background loop, awaitable from any other loop."""
    loop = _LoopThread.get()
    return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


class CallStream:
    """Outputs of one call as they arrive, each (idx, seq) once."""

    def __init__(self, call_id: str) -> None:
        self.call_id = call_id
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.seen: set[tuple[int, int]] = set()
        self.cancelled = False

    def push(self, item: dict[str, Any], payload: bytes) -> None:
        key = (item["idx"], item["seq"])
        if key in self.seen:
            return
        self.seen.add(key)
        self.queue.put_nowait((item, payload))

    def fail(self, exc: BaseException) -> None:
        self.queue.put_nowait(exc)

    async def next(self, timeout: float | None = None) -> tuple[dict[str, Any], bytes]:
        got = await asyncio.wait_for(self.queue.get(), timeout)
        if isinstance(got, BaseException):
            raise got
        return got


class Client:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.ws_url = self.url.replace("http", "ws", 1) + "/ws"
        self._rids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[Any], bytes]] = {}
        self.streams: dict[str, CallStream] = {}
        self.owned_apps: set[str] = set()
        self._ws: Any = None
        self._session: Any = None
        self._old_sessions: list[Any] = []
        self._connected: asyncio.Event | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

    # --- connection ----------------------------------------------------------------------------
    async def _ensure(self) -> None:
        if self._reader is None:
            self._connected = asyncio.Event()
            await self._ensure_session()
            self._reader = asyncio.get_running_loop().create_task(self._run())
        if not self._connected.is_set():  # type: ignore[union-attr]
            reader = self._reader
            waiter = asyncio.ensure_future(self._connected.wait())  # type: ignore[union-attr]
            done, _ = await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                waiter.cancel()
                reader.result()

    async def _run(self) -> None:
        import aiohttp

        assert self._connected is not None
        lost_at: float | None = None
        loop = asyncio.get_running_loop()
        first = True
        while not self._closed:
            try:
                ws = await self._session.ws_connect(self.ws_url, max_msg_size=protocol.MAX_FRAME,
                                                    heartbeat=30)
            except (aiohttp.ClientError, OSError) as exc:
                refusal = self._refusal(exc)
                if refusal is not None:  # retrying cannot help: fail now, with what to do
                    self._fail_all(refusal)
                    if first:
                        raise refusal from None
                    return
                now = loop.time()
                lost_at = lost_at if lost_at is not None else now
                if first or now - lost_at > RECONNECT_TIMEOUT:
                    err = self._unreachable(exc)
                    self._fail_all(err)
                    if first:
                        raise err from None
                    return
                await asyncio.sleep(0.2)
                continue
            first, lost_at = False, None
            self._ws = ws
            # Reclaim our ephemeral apps, resubscribe and resend everything unacknowledged.
            if self.owned_apps:
                await ws.send_bytes(protocol.encode({"type": "hello", "role": "client",
                                                     "apps": sorted(self.owned_apps)}))
            for call_id in self.streams:
                await ws.send_bytes(protocol.encode({"type": "subscribe", "call_id": call_id}))
            for _, frame in list(self._pending.values()):
                await ws.send_bytes(frame)
            self._connected.set()
            try:
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        self._on_message(*protocol.decode(msg.data))
            except Exception:  # pragma: no cover - connection torn down
                log.debug("connection lost", exc_info=True)
            self._connected.clear()
            self._ws = None
            if not self._closed:
                log.warning("lost the control plane at %s; reconnecting", self.url)

    def _refusal(self, exc: BaseException) -> Exception | None:
        """An error for a refused token or an unverifiable certificate, else None."""
        import aiohttp

        if isinstance(exc, aiohttp.WSServerHandshakeError) and exc.status in (401, 403):
            return transport.refused(exc.status, None)
        return transport.tls_error(self.url, exc)

    def _fail_all(self, exc: BaseException) -> None:
        for fut, _ in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()
        for stream in self.streams.values():
            stream.fail(exc)

    def _on_message(self, header: dict[str, Any], payloads: list[bytes]) -> None:
        kind = header["type"]
        if kind == "outputs":
            for item, payload in zip(header["items"], payloads):
                stream = self.streams.get(item["call_id"])
                if stream is not None:
                    stream.push(item, payload)
        elif kind in ("ack", "error"):
            entry = self._pending.pop(header.get("rid"), None)
            if entry is not None and not entry[0].done():
                if kind == "error":
                    exc_type = {"not_found": NotFoundError, "forbidden": AuthError}.get(
                        header.get("code"), ConnectionError)
                    entry[0].set_exception(exc_type(header["message"]))
                else:
                    entry[0].set_result(header)
        elif kind == "cancelled":
            stream = self.streams.get(header["call_id"])
            if stream is not None:
                stream.cancelled = True
                stream.fail(InputCancellation(f"Function call {header['call_id']} was cancelled."))

    async def request(self, header: dict[str, Any], payloads: list[bytes] = ()) -> dict[str, Any]:  # type: ignore[assignment]
        """Send a message that the server acknowledges; resent after a reconnect until it is."""
        await self._ensure()
        rid = next(self._rids)
        header["rid"] = rid
        frame = protocol.encode(header, list(payloads))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (fut, frame)
        ws = self._ws
        if ws is not None:
            try:
                await ws.send_bytes(frame)
            except Exception:  # resent on reconnect
                pass
        return await fut

    async def send(self, header: dict[str, Any]) -> None:
        await self._ensure()
        if self._ws is not None:
            try:
                await self._ws.send_bytes(protocol.encode(header))
            except Exception:
                pass

    async def close(self) -> None:
        self._closed = True
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
        for session in (*self._old_sessions, self._session):
            if session is not None:
                await session.close()

    # --- calls ---------------------------------------------------------------------------------
    def open_stream(self, call_id: str) -> CallStream:
        stream = self.streams.get(call_id)
        if stream is None:
            stream = self.streams[call_id] = CallStream(call_id)
        return stream

    def close_stream(self, call_id: str) -> None:
        if self.streams.pop(call_id, None) is not None and self._ws is not None:
            asyncio.get_running_loop().create_task(self._unsubscribe(call_id))

    async def _unsubscribe(self, call_id: str) -> None:
        await self._ensure()
        # A new wait on the same call may have opened a stream since: keep its subscription.
        if call_id not in self.streams and self._ws is not None:
            try:
                await self._ws.send_bytes(protocol.encode({"type": "unsubscribe",
                                                           "call_id": call_id}))
            except Exception:  # the connection is gone; the server forgets its subscriptions
                pass

    async def put_inputs(self, function_id: str, call_id: str, start: int,
                         payloads: list[bytes], subscribe: bool = True) -> dict[str, Any]:
        blobs = []
        for i, payload in enumerate(payloads):
            if len(payload) > protocol.BLOB_THRESHOLD:
                payloads[i] = (await self.upload_blob(payload)).encode()
                blobs.append(i)
        header = {"type": "put_inputs", "function_id": function_id, "call_id": call_id,
                  "start": start, "subscribe": subscribe}
        if blobs:
            header["blobs"] = blobs
        return await self.request(header, payloads)

    async def subscribe(self, call_id: str) -> CallStream:
        stream = self.open_stream(call_id)
        try:
            reply = await self.request({"type": "subscribe", "call_id": call_id})
        except BaseException:
            self.streams.pop(call_id, None)
            raise
        if reply.get("cancelled"):
            stream.cancelled = True
            stream.fail(InputCancellation(f"Function call {call_id} was cancelled."))
        return stream

    async def claim_app(self, app_id: str) -> None:
        """Keep ephemeral app `app_id` alive while this client is connected."""
        self.owned_apps.add(app_id)
        await self.request({"type": "hello", "role": "client", "apps": [app_id]})

    async def cancel(self, call_id: str) -> None:
        await self.send({"type": "cancel", "call_id": call_id})

    async def output_payload(self, item: dict[str, Any], payload: bytes) -> bytes:
        if item.get("blob"):
            return await self.download_blob(payload.decode())
        return payload

    # --- HTTP ----------------------------------------------------------------------------------
    async def http(self, method: str, path: str, body: Any = None,
                   params: dict[str, Any] | None = None, timeout_s: float | None = 300) -> Any:
        """`timeout_s=None` waits as long as it takes (a deploy builds its images first)."""
        import aiohttp

        await self._ensure_session()
        try:
            async with self._session.request(method, self.url + path, json=body, params=params,
                                             timeout=aiohttp.ClientTimeout(total=timeout_s)
                                             ) as resp:
                data = await _json(resp, self.url)
                if resp.status == 401 and await self._renew_session():
                    return await self.http(method, path, body, params, timeout_s)
                if resp.status in (401, 403):
                    raise transport.refused(resp.status, data.get("error"))
                if resp.status == 404:
                    raise NotFoundError(data.get("error", "not found"))
                if resp.status >= 400:
                    from mctl.exception import InvalidError

                    raise InvalidError(data.get("error", f"HTTP {resp.status}"))
                return data
        except aiohttp.ClientConnectionError as exc:
            tls = transport.tls_error(self.url, exc)
            if tls is not None:
                raise tls from None
            raise self._unreachable(exc) from None

    async def post_frame(self, path: str, header: dict[str, Any], payloads: list[bytes] = ()
                         ) -> tuple[dict[str, Any], list[bytes]]:  # type: ignore[assignment]
        """POST a protocol frame, read one back (Dict and Queue operations). An error answer
        raises the mctl exception the server named (`framehttp.error_for`)."""
        import aiohttp

        from mctl.core.framehttp import error_for

        await self._ensure_session()
        try:
            async with self._session.post(self.url + path,
                                          data=protocol.encode(header, list(payloads))) as resp:
                data = await resp.read()
                if resp.status >= 400:
                    raise error_for(resp.status, data, path)
                return protocol.decode(data)
        except aiohttp.ClientConnectionError as exc:
            tls = transport.tls_error(self.url, exc)
            if tls is not None:
                raise tls from None
            raise self._unreachable(exc) from None

    async def _renew_session(self) -> bool:
        """After a 401: a new session when the configured token is no longer the one this
        session sends (`mctl token set` meanwhile, or a new control plane at the same address);
        False when it is the same (the refusal stands)."""
        headers = transport.caller_headers(self.url)
        if self._session is None or headers.get("Authorization") == \
                self._session.headers.get("Authorization"):
            return False
        old, self._session = self._session, self._new_session(headers)
        if self._ws is None or self._ws.closed:
            await old.close()
        else:  # the open WebSocket is old's: it goes when it ends, or with this client
            self._old_sessions.append(old)
        return True

    async def _ensure_session(self) -> None:
        if self._session is None:
            self._session = self._new_session(transport.caller_headers(self.url))

    def _new_session(self, headers: dict[str, str]) -> Any:
        """The token and the TLS context go with every request and the WebSocket upgrade."""
        import aiohttp

        return aiohttp.ClientSession(
            headers=headers, connector=aiohttp.TCPConnector(ssl=transport.aiohttp_ssl(self.url)))

    async def upload_blob(self, data: bytes) -> str:
        import aiohttp

        await self._ensure_session()
        blob_id = protocol.blob_id(data)
        try:
            async with self._session.put(f"{self.url}/blobs/{blob_id}", data=data) as resp:
                await _check(resp)
        except aiohttp.ClientConnectionError as exc:
            raise self._unreachable(exc) from None
        return blob_id

    async def download_blob(self, blob_id: str) -> bytes:
        import aiohttp

        await self._ensure_session()
        try:
            async with self._session.get(f"{self.url}/blobs/{blob_id}") as resp:
                await _check(resp)
                return await resp.read()
        except aiohttp.ClientConnectionError as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: BaseException) -> ConnectionError:
        return ConnectionError(config.unreachable_message(self.url, exc))


async def _json(resp: Any, url: str) -> Any:
    """The answer's JSON; an answer that is not (a proxy's page, not a control plane at all)
    says what came back instead of a decoding error."""
    import json

    text = await resp.text(errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        snippet = " ".join(text.split())[:200]
        raise ConnectionError(f"{url} answered {resp.method} {resp.url.path} with HTTP "
                              f"{resp.status} and no JSON ({snippet or 'an empty body'}): is it "
                              "an mctl control plane? Check MCTL_SERVER_URL.") from None


async def _check(resp: Any) -> None:
    if resp.status in (401, 403):
        try:
            message = (await resp.json()).get("error")
        except Exception:
            message = None
        raise transport.refused(resp.status, message)
    resp.raise_for_status()


def upload_blob_sync(url: str, data: bytes) -> str:
    """For worker threads: upload a large result without an event loop."""
    blob_id = protocol.blob_id(data)
    with transport.urlopen(f"{url}/blobs/{blob_id}", data=data, method="PUT"):
        pass
    return blob_id


_clients: dict[str, Client] = {}


def client_for(url: str) -> Client:
    """One client per control plane per process."""
    client = _clients.get(url)
    if client is None:
        client = _clients[url] = Client(url)
    return client


async def close_client(url: str) -> None:
    client = _clients.pop(url, None)
    if client is not None:
        await client.close()


@atexit.register
def _close_clients_at_exit() -> None:
    """Close every client on the background loop before the interpreter goes, so that aiohttp
    has no open session to warn about ("Unclosed client session") in any command or script."""
    loop = _LoopThread._loop
    if not _clients or loop is None or loop.is_closed() or not loop.is_running():
        return

    async def close_all() -> None:
        for url in list(_clients):
            await close_client(url)

    try:
        asyncio.run_coroutine_threadsafe(close_all(), loop).result(timeout=5)
    except Exception:  # noqa: BLE001 - exiting anyway; a warning is the worst outcome
        log.debug("closing clients at exit failed", exc_info=True)


def new_call_id() -> str:
    return ids.new_id("call")

