"""Commands in a sandbox for a client that is not where the sandbox runs: the control plane runs
them and relays their stdio over a WebSocket (`GET /api/sandboxes/{id}/relay`, scope invoke, the
caller's token checked by the middleware as for every route).

On a Slurm node the control plane runs `srun --jobid=<job> --overlap podman exec -i ...`
(plugins/sandbox_slurm); on Nomad it speaks Nomad's alloc exec WebSocket (plugins/sandbox_nomad,
`relay`); for a sandbox on the control plane's own host, `podman exec -i ...`.

The protocol, after the upgrade:
- client → server, first: a JSON text message, one of
  `{"exec": [cmd...], "workdir": ..., "timeout": s, "secret_names": [...], "env": {...},
  "pty": null | {"rows", "cols", "term", "colorterm", "term_program"}}`,
  `{"stdin": true}` (write the main command's stdin: sandbox_runtime, STDIN_HOLD_SCRIPT) or
  `{"logs": true}` (follow the main command's stdout and stderr);
- client → server: binary messages are stdin; `{"eof": true}` closes stdin (on a terminal: ^D;
  for the main command's stdin: ends it for every writer); `{"resize": [rows, cols]}` resizes
  the terminal of a `pty` exec;
- server → client: `{"accepted": true}` once the request passed its checks (the sandbox runs,
  the secrets may be read), before the command starts, or `{"error": message}` instead; then
  binary messages, first byte 1 (stdout; with a `pty`, all the terminal shows) or 2 (stderr),
  then the bytes; `{"ready": true}` once the main command's stdin is open; last,
  `{"exit": code}` (128+n after signal n, -1 after `timeout`) or `{"error": message}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets as _secrets
import weakref
from typing import Any

from aiohttp import WSMsgType, web

from mctl.core import sandbox_runtime
from mctl.exception import Error, InvalidError

log = logging.getLogger("mctl.sandboxes.relay")

STDOUT, STDERR = 1, 2


# What srun and slurmstepd add to a step's stderr when it fails or the job ends under it.
SLURM_LINE = re.compile(rb"^(srun: (error|warning): |slurmstepd(-[^:]*)?: error: \*\*\* STEP )")


_HAD_OUTPUT: weakref.WeakSet[Any] = weakref.WeakSet()  # relays that sent a command's output


async def _send(ws: web.WebSocketResponse, prefix: bytes, data: bytes) -> None:
    if data and not ws.closed:  # a closed socket: keep draining, the process must never block
        _HAD_OUTPUT.add(ws)
        try:
            await ws.send_bytes(prefix + data)
        except (ConnectionError, RuntimeError):
            pass


async def _pump(stream: asyncio.StreamReader, ws: web.WebSocketResponse, channel: int,
                trailer: bytes | None = None) -> int | None:
    """Send a stream to the client. With `trailer` (a command on a node, see `_wrap`), the
    stream is passed on by whole lines: the trailer's line gives the exit code, and Slurm's own
    lines are dropped; the code is returned."""
    prefix = bytes([channel])
    held, code = b"", None
    while True:
        chunk = await stream.read(1 << 16)
        if trailer is None:
            if not chunk:
                return None
            await _send(ws, prefix, chunk)
            continue
        held += chunk
        cut = held.rfind(b"\n") + 1 if chunk else len(held)
        ready, held = held[:cut], held[cut:]
        out = []
        for line in ready.splitlines(keepends=True):
            at = line.find(trailer)
            if at >= 0:
                tail = line[at + len(trailer):].strip()
                code = int(tail) if tail.lstrip(b"-").isdigit() else code
                line = line[:at]
            elif SLURM_LINE.match(line):
                continue
            out.append(line)
        await _send(ws, prefix, b"".join(out))
        if not chunk:
            return code


async def relay_route(request: web.Request) -> web.WebSocketResponse:
    from mctl.core.server.sandboxes import _sb

    sb = _sb(request)
    sandbox_id = request.match_info["sandbox_id"]
    rec = sb.get(sandbox_id)  # NotFoundError before the upgrade: a plain 404
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=16 << 20)
    await ws.prepare(request)
    try:
        first = await ws.receive()
        if first.type != WSMsgType.TEXT:
            raise InvalidError("The relay's first message must be JSON: {\"exec\": [...]} or "
                               "{\"logs\": true}.")
        req = json.loads(first.data)
        refused = _refused(request, list(req.get("secret_names") or []))
        if refused:
            raise InvalidError(refused)
        await _serve(sb, rec, req, ws)
    except Error as exc:
        if not ws.closed:
            await ws.send_json({"error": str(exc)})
    except Exception as exc:  # noqa: BLE001 - said to the client, not swallowed
        log.exception("sandbox relay %s", sandbox_id)
        if not ws.closed:
            await ws.send_json({"error": f"The relay failed: {exc}"})
    finally:
        if not ws.closed:
            await ws.close()
    return ws


def _refused(request: web.Request, names: list[str]) -> str | None:
    """Named secrets need what they need for `exec` on the control plane's host (sandboxes.py)."""
    from mctl.core.server import sandboxes

    check = getattr(sandboxes, "_check_secret_names", None)
    refused = check(request, names) if check is not None else None
    if refused is None:
        return None
    return json.loads(refused.body)["error"]


async def _prefix(sb: Any, rec: dict[str, Any]) -> list[str]:
    cluster = sb.cluster(rec)
    if cluster is None:
        return []
    await cluster.ready()
    return cluster.relay_prefix(rec["sandbox_id"])


def _wrap(prefix: list[str], argv: list[str], trailer: str) -> list[str]:
    """On a node: the step itself always exits 0 and writes the command's exit code after a
    marker on stderr. Otherwise srun and slurmstepd add their own lines to the command's stderr
    ("task 0: Exited with exit code 3", "STEP ... FAILED")."""
    if not prefix:
        return argv
    script = f'"$@"; rc=$?; printf "{trailer}%d\\n" "$rc" >&2; exit 0'
    return prefix + ["/bin/sh", "-c", script, "sh", *argv]


class _Terminal:
    """The master side of a pty, read and written from the event loop (non-blocking: a
    terminal that nobody reads must not hold a thread)."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self._loop = asyncio.get_running_loop()

    async def _ready(self, add: Any, remove: Any) -> None:
        done = self._loop.create_future()
        add(self.fd, lambda: done.done() or done.set_result(None))
        try:
            await done
        finally:
            remove(self.fd)

    async def read(self) -> bytes:
        while True:
            try:
                return os.read(self.fd, 1 << 16)
            except BlockingIOError:
                await self._ready(self._loop.add_reader, self._loop.remove_reader)
            except OSError:  # EIO: every writer of the terminal is gone
                return b""

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:
                await self._ready(self._loop.add_writer, self._loop.remove_writer)


async def _pump_pty(term: _Terminal, ws: web.WebSocketResponse,
                    trailer: bytes | None) -> int | None:
    """Send a terminal's output (the pty's master) to the client as stdout. A terminal's output
    is not made of lines (a prompt has no newline), so only what could be the start of the
    trailer is held back; the trailer and the code after it end the stream."""
    prefix = bytes([STDOUT])
    held = b""
    while True:
        chunk = await term.read()
        held += chunk
        if trailer is not None:
            at = held.find(trailer)
            if at >= 0:
                rest = held[at + len(trailer):]
                if chunk and not re.match(rb"-?\d+\D", rest) and len(rest) < 16:
                    continue  # the whole code has not arrived yet
                digits = re.match(rb"-?\d+", rest)
                await _send(ws, prefix, held[:at])
                return int(digits.group()) if digits else None
            keep = 0
            if chunk:  # the longest end of `held` that could begin the trailer
                for n in range(min(len(trailer) - 1, len(held)), 0, -1):
                    if trailer.startswith(held[-n:]):
                        keep = n
                        break
            ready, held = held[:len(held) - keep], held[len(held) - keep:]
        else:
            ready, held = held, b""
        await _send(ws, prefix, ready)
        if not chunk:
            return None


async def _ready(stream: asyncio.StreamReader, ws: web.WebSocketResponse) -> None:
    """The main command's stdin: `{"ready": true}` once the writer found it open (its one line
    of output, STDIN_WRITE_SCRIPT), so the client knows before its first write."""
    said = False
    while True:
        line = await stream.readline()
        if not line:
            return
        if line.strip() == b"ready" and not said and not ws.closed:
            said = True
            try:
                await ws.send_json({"ready": True})
            except (ConnectionError, RuntimeError):
                pass


def _pty_prefix(prefix: list[str]) -> list[str]:
    """`srun ...` → `srun --pty ...`: the step runs on a terminal on the node, sized and
    resized as srun's own (our pty)."""
    return prefix[:1] + ["--pty"] + prefix[1:] if prefix else prefix


async def _serve(sb: Any, rec: dict[str, Any], req: dict[str, Any],
                 ws: web.WebSocketResponse) -> None:
    from mctl.core import terminal

    container = rec["container"]
    env: dict[str, str] = {}
    marker = None
    tty = req.get("pty") if isinstance(req.get("pty"), dict) else None
    if req.get("logs"):
        tty = None
        argv = sandbox_runtime.logs_argv(rec)
        if rec["state"] != "running":
            logs = await sb.logs(rec["sandbox_id"])
            for channel, key in ((STDOUT, "stdout"), (STDERR, "stderr")):
                if logs[key]:
                    await ws.send_bytes(bytes([channel]) + logs[key].encode())
            await ws.send_json({"exit": 0})
            return
    elif req.get("stdin"):  # the main command's stdin (sandbox_runtime, STDIN_HOLD_SCRIPT)
        tty = None
        if rec["state"] != "running":
            raise InvalidError(f"Sandbox {rec['sandbox_id']} is {rec['state']}; its main "
                               "command's stdin is closed.")
        sb.touch(rec["sandbox_id"])
        argv = ["/bin/sh", "-c", sandbox_runtime.STDIN_WRITE_SCRIPT, "sh",
                sandbox_runtime.stdin_fifo(container)]
    else:
        if rec["state"] != "running":
            raise InvalidError(f"Sandbox {rec['sandbox_id']} is {rec['state']}; exec and open "
                               "need a running sandbox.")
        cmd = req.get("exec")
        if not cmd or not isinstance(cmd, list) or not all(isinstance(c, str) for c in cmd):
            raise InvalidError("exec needs a command whose parts are all str.")
        sb.touch(rec["sandbox_id"])  # activity for idle_timeout
        env = await asyncio.to_thread(sb._secret_values,
                                      {"secret_names": req.get("secret_names") or []})
        if tty is not None:
            tty = {**terminal.pty_spec(None), **{k: v for k, v in tty.items() if v}}
            env.update(terminal.pty_env(tty))
        env.update({str(k): str(v) for k, v in (req.get("env") or {}).items()})
    if rec.get("isolation") == "bwrap" and (req.get("stdin") or tty is not None):
        raise InvalidError("bwrap sandboxes have no terminal (exec(pty=True)) and no stdin for "
                           "their main command yet; use an image (podman) for those.")
    cluster = sb.cluster(rec)
    if cluster is not None and hasattr(cluster, "relay"):  # its own exec protocol (Nomad)
        if req.get("stdin") or tty is not None:
            raise InvalidError("Sandboxes on Nomad have no terminal (exec(pty=True)) and no "
                               "stdin for their main command yet; use exec() without pty.")
        await cluster.ready()
        await ws.send_json({"accepted": True})
        await cluster.relay(sb, rec, req, env, ws)
        return
    if not req.get("logs") and not req.get("stdin"):
        timeout = req.get("timeout")
        bwrap = rec.get("isolation") == "bwrap"  # its agent kills a command whose client ends
        if timeout is not None and not bwrap:
            marker = sandbox_runtime.exec_marker()
        argv = sandbox_runtime.exec_argv(
            rec["run_dir"] if bwrap else container, cmd, workdir=req.get("workdir"),
            env_names=sorted(env), marker=marker,
            nproc=rec.get("pids") if rec.get("isolation") == "gvisor" else None,
            isolation="bwrap" if bwrap else None, tty=tty is not None)
    prefix = (await _prefix(sb, rec))
    # the request is accepted: the client's exec() returns now (a refusal above raises there)
    await ws.send_json({"accepted": True})
    trailer = f"mctl-relay-exit-{_secrets.token_hex(8)}=" if prefix else None
    argv = _wrap(_pty_prefix(prefix) if tty is not None else prefix, argv, trailer or "")
    master = None
    term: _Terminal | None = None
    if tty is not None:
        # podman exec -t (and srun --pty) on a pty of ours: its output is the terminal's;
        # stderr carries only what podman or srun say themselves
        master, slave = terminal.open_pty(int(tty.get("rows") or 0), int(tty.get("cols") or 0))
        argv, how = terminal.on_terminal(argv)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=slave, stdout=slave, stderr=asyncio.subprocess.PIPE,
                env={**os.environ, **env}, **how)
        finally:
            os.close(slave)
        assert proc.stderr
        term = _Terminal(master)
        pumps = [asyncio.ensure_future(_pump_pty(term, ws,
                                                 trailer.encode() if trailer else None)),
                 asyncio.ensure_future(_pump(proc.stderr, ws, STDERR,
                                             trailer.encode() if trailer else None))]
    else:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={**os.environ, **env}, start_new_session=True)
        assert proc.stdin and proc.stdout and proc.stderr
        out = (_ready(proc.stdout, ws) if req.get("stdin") else _pump(proc.stdout, ws, STDOUT))
        pumps = [asyncio.ensure_future(out),
                 asyncio.ensure_future(_pump(proc.stderr, ws, STDERR,
                                             trailer.encode() if trailer else None))]
        if req.get("logs"):
            proc.stdin.close()
    got_eof = False

    async def to_terminal(data: bytes) -> None:
        assert term is not None
        await term.write(data)

    async def feed() -> None:
        nonlocal got_eof
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                try:
                    if master is not None:
                        await to_terminal(msg.data)
                    elif not proc.stdin.is_closing():  # type: ignore[union-attr]
                        proc.stdin.write(msg.data)  # type: ignore[union-attr]
                        await proc.stdin.drain()  # type: ignore[union-attr]
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass
            elif msg.type == WSMsgType.TEXT:
                control = json.loads(msg.data)
                if control.get("resize") and master is not None:
                    rows, cols = control["resize"]
                    try:
                        terminal.set_size(master, int(rows), int(cols))
                    except OSError:
                        pass
                if control.get("eof"):
                    got_eof = True
                    if master is not None:  # a terminal's end of input: ^D
                        try:
                            await to_terminal(b"\x04")
                        except OSError:
                            pass
                    elif not proc.stdin.is_closing():  # type: ignore[union-attr]
                        proc.stdin.close()  # type: ignore[union-attr]
        # the client went away: the command goes with it
        if proc.returncode is None:
            proc.kill()

    feeder = asyncio.ensure_future(feed())
    timed_out = False
    reported = None
    try:
        timeout = req.get("timeout")
        try:
            await asyncio.wait_for(proc.wait(), float(timeout) if timeout is not None else None)
        except asyncio.TimeoutError:
            timed_out = True
            if marker is not None:  # the command inside the sandbox, not only podman exec
                kill = (await _prefix(sb, rec)) + [
                    "podman", "exec", "--user", sandbox_runtime.SANDBOX_USER, container,
                    *sandbox_runtime.kill_marked_command(marker)]
                killer = await asyncio.create_subprocess_exec(
                    *kill, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL)
                await killer.wait()
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        results = await asyncio.gather(*pumps)
        reported = results[0] if master is not None else results[1]
    finally:
        feeder.cancel()
        if proc.returncode is None:
            proc.kill()
        if master is not None:
            os.close(master)
    rc = proc.returncode or 0
    if not timed_out and reported is not None:
        rc = reported
    code = -1 if timed_out else (128 - rc if rc < 0 else rc)
    if req.get("logs") and code != 0 and ws not in _HAD_OUTPUT and not ws.closed:
        # `podman logs` found no container: the sandbox ended (and its container went) between
        # the record's "running" and the follow (a short main command on a node). What it wrote
        # is where sb.logs reads an ended sandbox's output (on Slurm, the job's output file).
        with contextlib.suppress(Exception):
            logs = await sb.logs(rec["sandbox_id"])
            for channel, key in ((STDOUT, "stdout"), (STDERR, "stderr")):
                if logs[key]:
                    await ws.send_bytes(bytes([channel]) + logs[key].encode())
        code = 0
    if req.get("stdin"):
        if code == sandbox_runtime.STDIN_CLOSED:
            raise InvalidError(f"The main command of sandbox {rec['sandbox_id']} has no open "
                               "stdin: it ended, write_eof() was called, or the sandbox was "
                               "created without a command.")
        if got_eof:  # everything written is in the FIFO: end the holder, the reader sees EOF
            ender = await asyncio.create_subprocess_exec(
                *prefix, "/bin/sh", "-c", sandbox_runtime.STDIN_EOF_SCRIPT, "sh",
                sandbox_runtime.stdin_fifo(container), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            await ender.wait()
    if not ws.closed:
        await ws.send_json({"exit": code})


def routes() -> list[tuple[str, str, Any, str, str]]:
    from mctl.core.server.http import TASK_ANY

    return [("GET", "/api/sandboxes/{sandbox_id}/relay", relay_route, "invoke", TASK_ANY)]
