"""`mctl container exec`: commands run inside a worker, next to the user's function.

The control plane sends an `exec` frame on the worker's own connection; the worker starts the
command as its child (so it runs wherever the worker runs: in its podman container, its venv,
its Slurm job, with the function's environment and secrets) and streams its output back:

    control plane -> worker: {"type": "exec", "exec_id", "argv", "pty", "rows", "cols"}
                             {"type": "exec_input", "exec_id", "eof"?} + [bytes for stdin]
                             {"type": "exec_kill", "exec_id"}
    worker -> control plane: {"type": "exec_output", "exec_id", "stream": 1 | 2} + [bytes]
                             {"type": "exec_exit", "exec_id", "code"}
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import Any, Awaitable, Callable

from mctl.core import protocol

CHUNK = 64 * 1024


class ExecSessions:
    """The commands running in this worker for `mctl container exec`, by exec id."""

    def __init__(self, send: Callable[[bytes], Awaitable[None] | None]) -> None:
        self._send = send  # sends one frame on the worker's connection (None: not connected)
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.ptys: dict[str, int] = {}  # exec id -> the pty's master fd
        self.tasks: set[asyncio.Task[Any]] = set()
        # stdin that arrived while the command was still starting: (data, eof) in order
        self.early: dict[str, list[tuple[bytes, bool]]] = {}

    def handle(self, header: dict[str, Any], payloads: list[bytes]) -> None:
        kind, exec_id = header["type"], header.get("exec_id", "")
        if kind == "exec":
            self.early[exec_id] = []
            task = asyncio.get_running_loop().create_task(self._run(header))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        elif kind == "exec_input":
            self._input(exec_id, b"".join(payloads), bool(header.get("eof")))
        elif kind == "exec_kill":
            self._kill(exec_id)

    async def _emit(self, header: dict[str, Any], data: bytes = b"") -> None:
        result = self._send(protocol.encode(header, [data] if data else []))
        if result is not None:
            with contextlib.suppress(Exception):  # connection gone: the control plane ends it
                await result

    async def _run(self, header: dict[str, Any]) -> None:
        exec_id, argv = header["exec_id"], [str(a) for a in header["argv"]]
        env = dict(os.environ)
        env.pop("MCTL_TASK_TOKEN", None)  # the worker's credential stays with the worker
        try:
            if header.get("pty"):
                proc, readers = await self._start_pty(exec_id, argv, env, header)
            else:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True)
                assert proc.stdout is not None and proc.stderr is not None
                readers = [self._pump(exec_id, 1, proc.stdout.read),
                           self._pump(exec_id, 2, proc.stderr.read)]
        except OSError as exc:
            self.early.pop(exec_id, None)
            await self._emit({"type": "exec_output", "exec_id": exec_id, "stream": 2},
                             f"mctl: cannot run {argv[0]!r} in this container: {exc.strerror or exc}\n"
                             .encode())
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            await self._emit({"type": "exec_exit", "exec_id": exec_id, "code": code})
            return
        self.procs[exec_id] = proc
        for data, eof in self.early.pop(exec_id, ()):
            self._input(exec_id, data, eof)
        try:
            await asyncio.gather(*readers)
            code = await proc.wait()
        finally:
            self.procs.pop(exec_id, None)
            master = self.ptys.pop(exec_id, None)
            if master is not None:
                with contextlib.suppress(OSError):
                    os.close(master)
        await self._emit({"type": "exec_exit", "exec_id": exec_id,
                          "code": 128 - code if code < 0 else code})  # killed by a signal

    async def _start_pty(self, exec_id: str, argv: list[str], env: dict[str, str],
                         header: dict[str, Any]) -> tuple[Any, list[Any]]:
        import fcntl
        import pty
        import struct
        import termios

        master, slave = pty.openpty()
        rows, cols = int(header.get("rows") or 24), int(header.get("cols") or 80)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env.setdefault("TERM", header.get("term") or "xterm-256color")

        def controlling_tty() -> None:  # in the child: the pty is its terminal
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                preexec_fn=controlling_tty)
        finally:
            os.close(slave)
        self.ptys[exec_id] = master

        def read(n: int) -> Awaitable[bytes]:
            async def once() -> bytes:
                try:
                    return await asyncio.to_thread(os.read, master, n)
                except OSError:  # EIO once the last writer closed
                    return b""
            return once()

        return proc, [self._pump(exec_id, 1, read)]

    async def _pump(self, exec_id: str, stream: int, read: Callable[[int], Awaitable[bytes]]
                    ) -> None:
        while True:
            data = await read(CHUNK)
            if not data:
                return
            await self._emit({"type": "exec_output", "exec_id": exec_id, "stream": stream}, data)

    def _input(self, exec_id: str, data: bytes, eof: bool) -> None:
        if exec_id in self.early:  # still starting
            self.early[exec_id].append((data, eof))
            return
        master = self.ptys.get(exec_id)
        if master is not None:
            with contextlib.suppress(OSError):
                if data:
                    os.write(master, data)
                if eof:
                    os.write(master, b"\x04")
            return
        proc = self.procs.get(exec_id)
        if proc is None or proc.stdin is None:
            return
        with contextlib.suppress(OSError, RuntimeError):
            if data:
                proc.stdin.write(data)
            if eof:
                proc.stdin.close()

    def _kill(self, exec_id: str) -> None:
        proc = self.procs.get(exec_id)
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    def kill_all(self) -> None:
        """The worker is exiting: its commands go with it, as a container's would."""
        for exec_id in list(self.procs):
            self._kill(exec_id)
