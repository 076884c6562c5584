"""The client side of the sandbox relay (core/server/sandbox_relay): a command in a sandbox that
runs on a cluster node (or on another host), its stdio carried over the control plane's WebSocket.
`RelayProcess` behaves as `ContainerProcess` does: `stdin`, `stdout`, `stderr`, `wait()`,
`poll()`, `returncode`; output is drained into memory as it comes."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

from mctl.exception import InvalidError
from mctl.sdk.function import Dual
from mctl.sdk.sandbox import StreamReader, StreamWriter, _Buffer


class _Stdin:
    """What StreamWriter writes to: hands each write to the relay's event loop, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any],
                 ended: threading.Event | None = None) -> None:
        self._loop, self._queue = loop, queue
        self._ended = ended  # the relay closed: nothing will be sent any more
        self.closed = False

    def write(self, data: bytes) -> None:
        if self.closed:
            raise ValueError("stdin is closed")
        self._loop.call_soon_threadsafe(self._queue.put_nowait, bytes(data))

    def flush(self) -> None:
        import concurrent.futures

        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._loop.call_soon_threadsafe(self._queue.put_nowait, done)
        while True:
            try:
                done.result(timeout=0.2)
                return
            except concurrent.futures.TimeoutError:
                if self._ended is not None and self._ended.is_set():
                    return

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._loop.call_soon_threadsafe(self._queue.put_nowait, None)


class RelayProcess:
    """A command run through the control plane's relay."""

    def __init__(self, url: str, sandbox_id: str, request: dict[str, Any], *,
                 text: bool = True) -> None:
        from mctl.core.client import _LoopThread

        self._loop = _LoopThread.get()
        self._pty = bool(request.get("pty"))
        self._out, self._err = _Buffer(), _Buffer()
        self._done = threading.Event()
        self._ready = threading.Event()
        self._returncode: int | None = None
        self._error: str | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self.stdout = StreamReader(self._out, text)
        self.stderr = StreamReader(self._err, text)
        self.stdin = StreamWriter(_Stdin(self._loop, self._queue, self._done))
        self.wait = Dual(self._wait, self._wait_aio)
        self._connected = threading.Event()
        self._future = asyncio.run_coroutine_threadsafe(
            self._run(url, sandbox_id, request), self._loop)
        self._connected.wait(120)
        if self._error is not None and self._done.is_set() and self._returncode is None:
            raise InvalidError(self._error)

    async def _run(self, url: str, sandbox_id: str, request: dict[str, Any]) -> None:
        import aiohttp

        from mctl.core.client import client_for

        client = client_for(url)
        await client._ensure_session()
        ws_url = url.replace("http", "ws", 1) + f"/api/sandboxes/{sandbox_id}/relay"
        sender = None
        try:
            try:
                ws = await client._session.ws_connect(ws_url, heartbeat=30,
                                                      max_msg_size=16 << 20)
            except aiohttp.WSServerHandshakeError as exc:
                self._error = (f"The control plane refused the sandbox relay ({exc.status}): "
                               f"{exc.message}")
                return
            except (aiohttp.ClientError, OSError) as exc:
                self._error = f"Could not reach the control plane at {url} ({exc})."
                return
            async with ws:
                await ws.send_str(json.dumps(request))

                async def send() -> None:
                    while True:
                        item = await self._queue.get()
                        if item is None:
                            await ws.send_str('{"eof": true}')
                        elif isinstance(item, bytes):
                            await ws.send_bytes(item)
                        elif isinstance(item, dict):
                            await ws.send_str(json.dumps(item))
                        else:
                            item.set_result(None)  # drain(): everything before it went out

                sender = asyncio.ensure_future(send())
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        (self._out if msg.data[:1] == b"\x01" else self._err).feed(msg.data[1:])
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        reply = json.loads(msg.data)
                        if reply.get("accepted"):  # exec() returns; a refusal raises there
                            self._connected.set()
                            continue
                        if reply.get("ready"):  # the main command's stdin is open
                            self._ready.set()
                            continue
                        if "exit" in reply:
                            self._returncode = int(reply["exit"])
                        elif "error" in reply:
                            self._error = reply["error"]
                        break
        finally:
            if sender is not None:
                sender.cancel()
            self._out.close()
            self._err.close()
            self._done.set()
            self._connected.set()

    def resize(self, rows: int, cols: int) -> None:
        """A command on a terminal (`pty=True`): the terminal's new size (see
        ContainerProcess.resize)."""
        if not self._pty:
            raise InvalidError("resize() needs a command started with exec(..., pty=True).")
        if not self._done.is_set():
            self._loop.call_soon_threadsafe(self._queue.put_nowait,
                                            {"resize": [int(rows), int(cols)]})

    def _finish(self) -> int:
        if self._returncode is None:
            raise InvalidError(self._error or "The sandbox relay closed without an exit code.")
        return self._returncode

    def poll(self) -> int | None:
        return self._finish() if self._done.is_set() else None

    def _wait(self) -> int:
        self._done.wait()
        return self._finish()

    async def _wait_aio(self) -> int:
        return await asyncio.to_thread(self._wait)

    @property
    def returncode(self) -> int | None:
        return self._returncode if self._done.is_set() else None


def exec_relayed(sb: Any, cmd: list[str], *, workdir: str | None, timeout: int | None,
                 secret_names: list[str], env: dict[str, str], text: bool,
                 pty: dict[str, Any] | None = None) -> RelayProcess:
    return RelayProcess(sb._url, sb.object_id,
                        {"exec": list(cmd), "workdir": workdir, "timeout": timeout,
                         "secret_names": secret_names, "env": env, "pty": pty}, text=text)


class MainStdin:
    """What `sb.stdin` (a StreamWriter) writes to: the main command's stdin, through the relay
    (`{"stdin": true}`), connected at the first write. `close()` (write_eof) ends the main
    command's input once everything before it arrived."""

    def __init__(self, sb: Any) -> None:
        self._sb = sb
        self._proc: RelayProcess | None = None
        self.closed = False

    def _open(self) -> RelayProcess:
        if self._proc is None:
            self._proc = RelayProcess(self._sb._url, self._sb.object_id, {"stdin": True},
                                      text=False)
            deadline = time.monotonic() + 120  # the relay says it is open, or why not
            while not (self._proc._ready.is_set() or self._proc._done.is_set()
                       or time.monotonic() > deadline):
                self._proc._ready.wait(0.05)
        self._check()
        return self._proc

    def _check(self) -> None:
        if self._proc is not None and self._proc._done.is_set():
            self._proc._finish()  # the relay's own message, where it gave one
            raise InvalidError(f"The main command of sandbox {self._sb.object_id} has no open "
                               "stdin: write_eof() was called, or it ended.")

    def write(self, data: bytes) -> None:
        if self.closed:
            raise ValueError("stdin is closed")
        self._open().stdin.write(data)

    def flush(self) -> None:
        if self._proc is not None and not self._proc._done.is_set():
            self._proc.stdin._fh.flush()
        self._check()

    def close(self) -> None:
        if self.closed:
            return
        proc = self._open()
        if self._sb._record.get("pty"):  # a terminal's end of input: ^D, as one types it
            proc.stdin.write(b"\x04")
        self.closed = True
        proc.stdin.write_eof()
        proc._wait()


def main_output(sb: Any) -> tuple[_Buffer, _Buffer]:
    """The main command's stdout and stderr buffers, followed through the relay."""
    proc = RelayProcess(sb._url, sb.object_id, {"logs": True}, text=False)
    return proc._out, proc._err
