"""`mctl.Sandbox`: an isolated container for untrusted code, in Modal's spelling.

    sb = mctl.Sandbox.create(app=app)                 # gVisor (or runc) under podman
    p = sb.exec("python", "-c", "print(6 * 7)", timeout=10)
    print(p.stdout.read())                            # "42\n"
    sb.terminate()

The control plane starts the sandbox and keeps its record (`Sandbox.list`, `from_id`,
`from_name`, `mctl sandbox ...`); commands run with `podman exec` from this process, on the
control plane's host (the local backend). Output is drained by background threads into memory as
it comes, so a process that prints a lot never blocks on a full pipe.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator, Sequence

from mctl.exception import InvalidError
from mctl.sdk.function import Dual

POLL_S = 50.0


from mctl.exception import SandboxTerminatedError, SandboxTimeoutError  # noqa: E402

# --- output and input streams ---------------------------------------------------------------------
class _Buffer:
    """Bytes that a background thread appends until EOF; readers wait on a condition."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.cond = threading.Condition()

    def feed(self, chunk: bytes) -> None:
        with self.cond:
            self.data += chunk
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def pump(self, fh: Any) -> threading.Thread:
        def run() -> None:
            try:
                while True:
                    chunk = os.read(fh.fileno(), 1 << 16)
                    if not chunk:
                        break
                    self.feed(chunk)
            except (OSError, ValueError):
                pass
            finally:
                self.close()

        t = threading.Thread(target=run, daemon=True, name="mctl-sandbox-stream")
        t.start()
        return t


class _Text(str):
    """Text read from a stream. `.decode()` gives it back unchanged, so code written for byte
    output (the Modal reference's agent: `sb.exec(...).stdout.read().decode()`) runs too."""

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return str(self)


class StreamReader:
    """A process's stdout or stderr: `read()` waits for the end and returns everything;
    `for line in reader` yields lines as they come; `.read.aio()` and `async for` too."""

    def __init__(self, buffer: _Buffer | None, text: bool = True,
                 start: Any = None) -> None:
        self._buf = buffer
        self._text = text
        self._start = start  # makes the buffer on first use (a sandbox's own output)
        self._pos = 0
        self.read = Dual(self._read, self._read_aio)

    def _buffer(self) -> _Buffer:
        if self._buf is None:
            self._buf = self._start()
        return self._buf

    def _out(self, data: bytes) -> Any:
        return _Text(data.decode(errors="replace")) if self._text else bytes(data)

    def _read(self) -> Any:
        buf = self._buffer()
        with buf.cond:
            while not buf.eof:
                buf.cond.wait()
            data = bytes(buf.data[self._pos:])
            self._pos = len(buf.data)
        return self._out(data)

    async def _read_aio(self) -> Any:
        import asyncio

        return await asyncio.to_thread(self._read)

    def _next_line(self) -> Any:
        buf = self._buffer()
        with buf.cond:
            while True:
                end = buf.data.find(b"\n", self._pos)
                if end >= 0:
                    line = bytes(buf.data[self._pos:end + 1])
                    self._pos = end + 1
                    return self._out(line)
                if buf.eof:
                    if self._pos < len(buf.data):
                        line = bytes(buf.data[self._pos:])
                        self._pos = len(buf.data)
                        return self._out(line)
                    return None
                buf.cond.wait()

    def __iter__(self) -> Iterator[Any]:
        while True:
            line = self._next_line()
            if line is None:
                return
            yield line

    async def __aiter__(self) -> AsyncIterator[Any]:
        import asyncio

        while True:
            line = await asyncio.to_thread(self._next_line)
            if line is None:
                return
            yield line


class StreamWriter:
    """A process's stdin: `write(data)`, `write_eof()`, `drain()` (and `.drain.aio()`)."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self._lock = threading.Lock()
        self.drain = Dual(self._drain, self._drain_aio)

    def write(self, data: bytes | bytearray | memoryview | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        if self._fh is None:
            raise InvalidError("This stream has no stdin to write to.")
        with self._lock:
            try:
                self._fh.write(bytes(data))
            except (BrokenPipeError, ValueError):
                raise InvalidError("The process's stdin is closed (it exited, or write_eof() "
                                   "was called).") from None

    def write_eof(self) -> None:
        with self._lock:
            if self._fh is not None and not self._fh.closed:
                try:
                    self._fh.close()
                except BrokenPipeError:
                    pass

    def _drain(self) -> None:
        with self._lock:
            if self._fh is not None and not self._fh.closed:
                try:
                    self._fh.flush()
                except BrokenPipeError:
                    pass

    async def _drain_aio(self) -> None:
        import asyncio

        await asyncio.to_thread(self._drain)


class _Fd:
    """A raw file descriptor as `_Buffer.pump` reads it (a pty's master: EIO at its end)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd


class _PtyInput:
    """What StreamWriter writes to for a command on a terminal: the pty's master. The end of
    input is the terminal's end-of-file character (^D), as one types it: the command reads an
    end at the start of a line (in the terminal's line mode)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.closed = False

    def write(self, data: bytes) -> None:
        if self.closed:
            raise ValueError("closed")
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except OSError:
                raise BrokenPipeError from None
            view = view[n:]

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                os.write(self._fd, b"\x04")
            except OSError:
                pass


# --- a command in a sandbox -----------------------------------------------------------------------
class ContainerProcess:
    """A command started by `Sandbox.exec`: `stdin`, `stdout`, `stderr`, `wait()`, `poll()`,
    `returncode` (128+n after signal n, -1 after its `timeout`)."""

    def __init__(self, argv: list[str], env: dict[str, str], *, text: bool = True,
                 timeout: float | None = None, kill: Any = None,
                 pty: dict[str, Any] | None = None) -> None:
        out, err = _Buffer(), _Buffer()
        self._master: int | None = None
        if pty is not None:
            # podman exec -t on a local pty of ours: the terminal's output (the command's
            # stdout and stderr together, as a terminal shows them) is stdout; podman's own
            # messages (it could not run the command) are stderr.
            from mctl.core import terminal

            master, slave = terminal.open_pty(pty["rows"], pty["cols"])
            argv, how = terminal.on_terminal(argv)
            try:
                self._proc = subprocess.Popen(argv, stdin=slave, stdout=slave,
                                              stderr=subprocess.PIPE, env=env, **how)
            finally:
                os.close(slave)
            self._master = master
            self._pumps = [out.pump(_Fd(master)), err.pump(self._proc.stderr)]
            self._pty_input = _PtyInput(master)
            self.stdin = StreamWriter(self._pty_input)
        else:
            self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, env=env,
                                          start_new_session=True)
            self._pumps = [out.pump(self._proc.stdout), err.pump(self._proc.stderr)]
            self.stdin = StreamWriter(self._proc.stdin)
        self.stdout = StreamReader(out, text)
        self.stderr = StreamReader(err, text)
        self._timed_out = False
        self._returncode: int | None = None
        self._kill = kill
        self.wait = Dual(self._wait, self._wait_aio)
        if timeout is not None:
            self._timer = threading.Timer(timeout, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        if self._proc.poll() is None:
            self._timed_out = True
            if self._kill is not None:
                self._kill()  # the command inside the sandbox, not only podman exec
            self._proc.kill()

    def _terminate(self) -> None:
        """Stop the command: inside the sandbox (its processes, found by their exec marker),
        then the runtime's exec that ran it (`mctl sandbox exec` on Ctrl-C)."""
        if self._proc.poll() is None and self._kill is not None:
            with contextlib.suppress(Exception):
                self._kill()
        if self._proc.poll() is None:
            self._proc.kill()

    def resize(self, rows: int, cols: int) -> None:
        """A command on a terminal (`pty=True`): the terminal's new size (the command gets
        SIGWINCH). mctl's own; `mctl sandbox exec --pty` calls it when its window changes."""
        if not hasattr(self, "_pty_input"):
            raise InvalidError("resize() needs a command started with exec(..., pty=True).")
        from mctl.core import terminal

        master = self._master
        if master is None:
            return  # it ended
        try:
            terminal.set_size(master, rows, cols)
        except OSError:
            pass  # it ended

    def _code(self, rc: int) -> int:
        if self._timed_out:
            return -1
        return 128 - rc if rc < 0 else rc

    def poll(self) -> int | None:
        rc = self._proc.poll()
        if rc is None:
            return None
        self._returncode = self._code(rc)
        return self._returncode

    def _wait(self) -> int:
        rc = self._proc.wait()
        for t in self._pumps:
            t.join()
        if self._master is not None:
            self._pty_input.closed = True
            try:
                os.close(self._master)
            except OSError:
                pass
            self._master = None
        self._returncode = self._code(rc)
        return self._returncode

    async def _wait_aio(self) -> int:
        import asyncio

        return await asyncio.to_thread(self._wait)

    @property
    def returncode(self) -> int | None:
        if self._returncode is None:
            self.poll()
        return self._returncode


@dataclass(frozen=True)
class Tunnel:
    """A port of the sandbox reachable from this machine: `host`, `port`, `url`, `tcp_socket`."""

    host: str
    port: int
    unencrypted_host: str = ""
    unencrypted_port: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def tcp_socket(self) -> tuple[str, int]:
        return (self.unencrypted_host or self.host, self.unencrypted_port or self.port)

    @property
    def tls_socket(self) -> tuple[str, int]:
        return (self.host, self.port)


# --- the sandbox ----------------------------------------------------------------------------------
def _http(url: str, method: str, path: str, body: Any = None,
          params: dict[str, Any] | None = None, timeout_s: float | None = 300) -> Any:
    from mctl.core.client import client_for, run_sync

    return run_sync(client_for(url).http(method, path, body, params=params, timeout_s=timeout_s))


def _app_id_and_url(app: Any) -> tuple[str, str]:
    from mctl.sdk.stored import server_url

    if app is None:
        if os.environ.get("MCTL_APP_ID") and os.environ.get("MCTL_SERVER_URL"):
            return os.environ["MCTL_APP_ID"], os.environ["MCTL_SERVER_URL"]
        raise InvalidError("Sandbox.create needs app= outside a running function: pass the App "
                           "of `with app.run():`, or "
                           "mctl.App.lookup(NAME, create_if_missing=True).")
    app_id = getattr(app, "app_id", None)
    if not app_id:
        raise InvalidError(f"The app {getattr(app, 'name', app)!r} is not running; create the "
                           "sandbox inside `with app.run():`, or use "
                           "mctl.App.lookup(NAME, create_if_missing=True).")
    return app_id, getattr(app, "_server_url", None) or server_url()


_outlive: list[str] = []  # sandboxes this script created that outlive it unless terminated


def _owned_apps(url: str) -> set[str]:
    """The ephemeral apps of this process (`with app.run():`): stopped, with their sandboxes,
    when the block ends."""
    from mctl.core.client import client_for

    return set(client_for(url).owned_apps)


def _outliving(sandbox_id: str, add: bool) -> None:
    """Keep the Ctrl-C line of a script (`runner._quiet_interrupts`) saying which sandboxes it
    leaves running; inside a function there is no such line."""
    if os.environ.get("MCTL_TASK_ID"):
        return
    from mctl.core.runner import _quiet_interrupts

    if add and sandbox_id not in _outlive:
        _outlive.append(sandbox_id)
    elif not add and sandbox_id in _outlive:
        _outlive.remove(sandbox_id)
    if not _outlive:
        note = ""
    elif len(_outlive) == 1:
        note = (f"sandbox {_outlive[0]} keeps running until its timeout (`mctl sandbox "
                f"terminate {_outlive[0]}` ends it)")
    else:
        note = (f"sandboxes {', '.join(_outlive)} keep running until their timeout (`mctl "
                "sandbox terminate ID` ends one)")
    _quiet_interrupts("sandboxes", note)


def _secret_parts(secrets: Sequence[Any]) -> tuple[list[str], list[dict[str, str]]]:
    names, values = [], []
    for s in secrets or ():
        if getattr(s, "name", None):
            names.append(s.name)
        elif getattr(s, "values", None) is not None:
            values.append(dict(s.values))
        else:
            raise InvalidError(f"secrets= takes mctl.Secret objects, got {s!r}.")
    return names, values


class Sandbox:
    """A running (or finished) sandbox. Make one with `Sandbox.create`; find one with
    `Sandbox.from_id`, `Sandbox.from_name` or `Sandbox.list`."""

    def __init__(self, record: dict[str, Any], url: str) -> None:
        self._record = record
        self._url = url
        self._logs: subprocess.Popen[bytes] | None = None
        self._log_buffers: tuple[_Buffer, _Buffer] | None = None
        self._lock = threading.Lock()
        self._stdin: StreamWriter | None = None
        self.wait = Dual(self._wait, self._wait_aio)
        self.terminate = Dual(self._terminate, self._aio(self._terminate))
        self.exec = Dual(self._exec, self._aio(self._exec))
        self.poll = Dual(self._poll, self._aio(self._poll))
        self.set_tags = Dual(self._set_tags, self._aio(self._set_tags))
        self.tunnels = Dual(self._tunnels, self._aio(self._tunnels))
        self.snapshot_filesystem = Dual(self._snapshot, self._aio(self._snapshot))
        self.open = Dual(self._open, self._aio(self._open))
        self.ls = Dual(self._ls, self._aio(self._ls))
        self.mkdir = Dual(self._mkdir, self._aio(self._mkdir))
        self.rm = Dual(self._rm, self._aio(self._rm))
        self.stdout = StreamReader(None, True, start=lambda: self._main_output()[0])
        self.stderr = StreamReader(None, True, start=lambda: self._main_output()[1])

    @staticmethod
    def _aio(fn: Any) -> Any:
        async def aio(*args: Any, **kwargs: Any) -> Any:
            import asyncio

            return await asyncio.to_thread(fn, *args, **kwargs)
        return aio

    @property
    def stdin(self) -> StreamWriter:
        """The main command's stdin (`write`, `write_eof`, `drain`), as Modal's `sb.stdin`:
        `Sandbox.create("python", "-i", ...)` reads what is written here. It goes through the
        control plane (its relay), wherever the sandbox runs; write_eof() ends the command's
        input."""
        with self._lock:
            if self._stdin is None:
                from mctl.sdk.sandbox_relay import MainStdin

                self._stdin = StreamWriter(MainStdin(self))
            return self._stdin

    # --- identity --------------------------------------------------------------------------------
    @property
    def object_id(self) -> str:
        return self._record["sandbox_id"]

    @property
    def isolation(self) -> str:
        """How this sandbox is isolated: "gvisor", "runc" or "bwrap" (see docs/guide.md,
        Sandboxes)."""
        return self._record["isolation"]

    @property
    def name(self) -> str | None:
        return self._record.get("name")

    def get_tags(self) -> dict[str, str]:
        self._refresh()
        return dict(self._record.get("tags") or {})

    def __repr__(self) -> str:
        return f"Sandbox({self.object_id!r}, isolation={self.isolation!r})"

    # --- finding ---------------------------------------------------------------------------------
    @staticmethod
    def _create(*cmd: str, app: Any = None, image: Any = None, secrets: Sequence[Any] = (),
                volumes: dict[str, Any] | None = None, workdir: str | None = None,
                timeout: int = 300, idle_timeout: int | None = None,
                cpu: float | None = None, memory: int | None = None, gpu: Any = None,
                block_network: bool | None = None, cidr_allowlist: Sequence[str] | None = None,
                outbound_cidr_allowlist: Sequence[str] | None = None,
                encrypted_ports: Sequence[int] = (), unencrypted_ports: Sequence[int] = (),
                h2_ports: Sequence[int] = (), name: str | None = None,
                tags: dict[str, str] | None = None, env: dict[str, str | None] | None = None,
                isolation: str | None = None, pids: int | None = None,
                pty: bool = False, pty_info: Any = None,
                **unsupported: Any) -> Sandbox:
        for key in ("outbound_domain_allowlist", "inbound_cidr_allowlist"):
            if unsupported.get(key) is not None:
                raise InvalidError(f"{key}= is not supported by mctl: a sandbox's outbound "
                                   "traffic can be limited by address (cidr_allowlist=), not by "
                                   "domain, and its inbound traffic (ports) only comes from the "
                                   "control plane's host (127.0.0.1).")
            unsupported.pop(key, None)
        _modal_create_keywords(unsupported)
        if unsupported:
            import inspect

            from mctl.sdk.app import did_you_mean

            known = [n for n, p in inspect.signature(Sandbox._create).parameters.items()
                     if p.kind == p.KEYWORD_ONLY]
            raise InvalidError("Sandbox.create() got an unknown keyword " + "; ".join(
                f"{key!r}.{did_you_mean(key, known)}" for key in sorted(unsupported)))
        if outbound_cidr_allowlist is not None:  # Modal's newer name for the same thing
            if cidr_allowlist is not None:
                raise InvalidError("Pass cidr_allowlist= or outbound_cidr_allowlist=, not both "
                                   "(they are the same setting).")
            cidr_allowlist = outbound_cidr_allowlist
        if cidr_allowlist is not None:
            if block_network:
                raise InvalidError("`cidr_allowlist` cannot be used when `block_network` is "
                                   "enabled; drop block_network=True (an allowlist of [] blocks "
                                   "all outbound traffic).")
            from mctl.core.sandbox_runtime import normalize_cidrs

            cidr_allowlist = normalize_cidrs(cidr_allowlist)
            block_network = False
        if not all(isinstance(c, str) for c in cmd):
            raise InvalidError("Sandbox.create(*cmd): each part of the command must be a str.")
        ports = [int(p) for p in [*encrypted_ports, *unencrypted_ports, *h2_ports]]
        app_id, url = _app_id_and_url(app)
        body: dict[str, Any] = {
            "app_id": app_id, "command": list(cmd), "workdir": workdir, "timeout": timeout,
            "idle_timeout": idle_timeout,
            "cpu": cpu, "memory": memory, "pids": pids, "name": name, "tags": tags or {},
            "block_network": True if block_network is None else bool(block_network),
            "ports": ports, "isolation": isolation, "gpu": gpu,
            "cidr_allowlist": cidr_allowlist,
            "env": {k: v for k, v in (env or {}).items() if v is not None}}
        if pty or (pty_info is not None and getattr(pty_info, "enabled", True) is not False):
            from mctl.core import terminal

            if not cmd:
                raise InvalidError("Sandbox.create(pty=True) needs a command to run on the "
                                   "terminal, such as Sandbox.create('bash', pty=True, ...).")
            # As Modal's: the main command on a terminal (its output all on stdout), of this
            # process's terminal's size and TERM (pty_info's where given without pty=True)
            body["pty"] = terminal.pty_spec(None if pty else pty_info)
        body["secret_names"], body["secret_values"] = _secret_parts(secrets)
        if volumes:
            from mctl.sdk.volume import Volume, validate_mounts

            validate_mounts(volumes)
            body["volumes"] = {p: {"name": v.name, "read_only": v._read_only,
                                   "create_if_missing": v.create_if_missing}
                               for p, v in volumes.items() if isinstance(v, Volume)}
        if image is not None:
            from mctl.core.client import client_for, run_sync

            for data in image.blobs().values():
                run_sync(client_for(url).upload_blob(data))
            body["image"] = {"image_id": image.object_id, "recipe": image.recipe()}
        record = _http(url, "POST", "/api/sandboxes", body, timeout_s=None)
        sb = Sandbox(record, url)
        _outliving(sb.object_id, add=app_id not in _owned_apps(url))
        return sb


    @staticmethod
    def _from_id(sandbox_id: str) -> Sandbox:
        from mctl.sdk.stored import server_url

        url = server_url()
        return Sandbox(_http(url, "GET", f"/api/sandboxes/{sandbox_id}"), url)


    @staticmethod
    def _from_name(app_name: str, name: str, *, environment_name: str | None = None) -> Sandbox:
        from mctl.sdk.stored import server_url

        url = server_url()
        return Sandbox(_http(url, "GET", "/api/sandboxes/by-name",
                             params={"app": app_name, "name": name}), url)


    @staticmethod
    def _list(*, app_id: str | None = None, tags: dict[str, str] | None = None,
              client: Any = None, environment_name: str | None = None) -> list[Sandbox]:
        import json

        from mctl.sdk.stored import server_url

        url = server_url()
        params: dict[str, Any] = {}
        if app_id:
            params["app_id"] = app_id
        if tags:
            params["tags"] = json.dumps(tags)
        return [Sandbox(r, url) for r in _http(url, "GET", "/api/sandboxes", params=params)]

    @staticmethod
    def list(*, app_id: str | None = None, tags: dict[str, str] | None = None,
             client: Any = None, environment_name: str | None = None) -> Iterator[Sandbox]:
        """The running sandboxes, newest first (of one app; with all of these tags)."""
        return iter(Sandbox._list(app_id=app_id, tags=tags))

    # --- life ------------------------------------------------------------------------------------
    def _refresh(self, wait_s: float = 0) -> dict[str, Any]:
        path = f"/api/sandboxes/{self.object_id}"
        if wait_s > 0:
            self._record = _http(self._url, "GET", path + "/wait", params={"timeout": wait_s},
                                 timeout_s=wait_s + 30)
        else:
            self._record = _http(self._url, "GET", path)
        return self._record

    @property
    def returncode(self) -> int | None:
        """The main command's exit code (128+n after signal n; -1 after the sandbox's timeout
        or idle_timeout;
        137 once terminated), or None while it runs."""
        if self._record.get("state") in (None, "running", "starting"):
            self._refresh()
        return self._record.get("returncode") if self._record["state"] not in (
            "running", "starting") else None

    def _poll(self) -> int | None:
        self._refresh()
        return self.returncode

    def _wait(self, raise_on_termination: bool = True) -> int | None:
        while self._refresh(POLL_S)["state"] in ("running", "starting"):
            pass
        state = self._record["state"]
        if state == "timeout" and self._record.get("ended_by") == "idle_timeout":
            raise SandboxTimeoutError(
                f"Sandbox {self.object_id} was idle (no exec running, no tunnel connection) for "
                f"its idle_timeout of {self._record.get('idle_timeout')}s and was stopped "
                "(returncode -1).")
        if state == "timeout":
            raise SandboxTimeoutError(f"Sandbox {self.object_id} reached its timeout and was "
                                      "stopped (returncode -1).")
        if state == "terminated" and raise_on_termination:
            raise SandboxTerminatedError(f"Sandbox {self.object_id} was terminated.")
        return self._record.get("returncode")

    async def _wait_aio(self, raise_on_termination: bool = True) -> int | None:
        import asyncio

        return await asyncio.to_thread(self._wait, raise_on_termination)

    def _terminate(self) -> None:
        self._record = _http(self._url, "POST", f"/api/sandboxes/{self.object_id}/terminate")
        self._stop_logs()
        _outliving(self.object_id, add=False)

    def detach(self) -> None:
        """Forget this handle's local resources (the sandbox keeps running)."""
        self._stop_logs()

    def _set_tags(self, tags: dict[str, str]) -> None:
        _http(self._url, "POST", f"/api/sandboxes/{self.object_id}/tags", dict(tags))
        self._record["tags"] = dict(tags)

    def _tunnels(self, timeout: int = 50) -> dict[int, Tunnel]:
        """{container port: Tunnel} for each of `encrypted_ports`/`unencrypted_ports`. mctl's
        tunnels are plain TCP (no TLS): on 127.0.0.1 for a sandbox on the control plane's host,
        on the control plane's address (a relay to the node) for one on a cluster node."""
        from urllib.parse import urlsplit

        ports = self._refresh().get("ports") or {}
        own = urlsplit(self._url).hostname or "127.0.0.1"
        out = {}
        for p, (h, hp) in ports.items():
            h = own if h in ("", "0.0.0.0", "::") else h  # a relay on every interface
            out[int(p)] = Tunnel(h, int(hp), h, int(hp))
        return out

    # --- commands --------------------------------------------------------------------------------
    def _local(self, record: dict[str, Any]) -> None:
        import socket

        if record.get("host") and record["host"] != socket.gethostname():
            raise InvalidError(f"Sandbox {self.object_id} runs on {record['host']}; mctl runs "
                               "commands in a sandbox only from the control plane's host yet.")

    def _relayed(self) -> bool:
        """Whether commands go through the control plane's relay: a sandbox on a cluster node,
        or on the control plane's host when this process runs elsewhere."""
        import socket

        host = self._record.get("host")
        return (self._record.get("backend", "local") != "local"
                or bool(host and host != socket.gethostname()))

    def _exec(self, *cmd: str, workdir: str | None = None, timeout: int | None = None,
              secrets: Sequence[Any] = (), pty: bool = False, pty_info: Any = None,
              _pty_info: Any = None,
              text: bool = True, env: dict[str, str | None] | None = None,
              bufsize: int = -1, **unsupported: Any) -> ContainerProcess:
        from mctl.core import sandbox_runtime

        if unsupported:
            import inspect

            from mctl.sdk.app import did_you_mean

            known = [n for n, p in inspect.signature(Sandbox._exec).parameters.items()
                     if p.kind == p.KEYWORD_ONLY and not n.startswith("_")]
            raise InvalidError("Sandbox.exec() got an unknown keyword " + "; ".join(
                f"{key!r}.{did_you_mean(key, known)}" for key in sorted(unsupported)))
        tty: dict[str, Any] | None = None
        pty_info = pty_info if pty_info is not None else _pty_info
        if pty or (pty_info is not None and getattr(pty_info, "enabled", True) is not False):
            from mctl.core import terminal

            # As Modal's: the command runs on a terminal of this process's terminal's size, its
            # stdout and stderr both on stdout; TERM and friends come along. The deprecated
            # pty_info (a PTYInfo, or a dict of its fields) sets them; pty=True overrides it.
            tty = terminal.pty_spec(None if pty else pty_info)
            if self.isolation == "bwrap":
                raise InvalidError("bwrap sandboxes have no terminal (exec(pty=True)) yet; use "
                                   "an image (podman) for that.")
        if not cmd or not all(isinstance(c, str) for c in cmd):
            raise InvalidError("exec(*cmd) needs a command whose parts are all str, such as "
                               "sb.exec('python', '-c', 'print(1)').")
        names, values = _secret_parts(secrets)
        if self._relayed():  # on a cluster node: through the control plane's relay
            from mctl.sdk.sandbox_relay import exec_relayed

            extra: dict[str, str] = {}
            for v in values:
                extra.update(v)
            extra.update({k: v for k, v in (env or {}).items() if v is not None})
            relayed: Any = exec_relayed(self, list(cmd), workdir=workdir, timeout=timeout,
                                        secret_names=names, env=extra, text=text, pty=tty)
            return relayed  # a RelayProcess: the ContainerProcess interface
        record = _http(self._url, "POST", f"/api/sandboxes/{self.object_id}/exec",
                       {"secret_names": names})
        self._local(record)
        environ = dict(record.pop("env", {}) or {})
        for v in values:
            environ.update(v)
        environ.update({k: v for k, v in (env or {}).items() if v is not None})
        if tty is not None:
            from mctl.core import terminal

            environ = {**terminal.pty_env(tty), **environ}
        marker = kill = None
        container = record["container"]
        if self.isolation == "bwrap":  # its agent; a timeout kills the client, and so the command
            container = record["run_dir"]
        else:  # a timeout (or Ctrl-C in `mctl sandbox exec`) kills the command inside too
            marker = sandbox_runtime.exec_marker()
            killer = sandbox_runtime.kill_marked_command(marker)

            def kill() -> None:
                subprocess.run(["podman", "exec", "--user", sandbox_runtime.SANDBOX_USER,
                                container, *killer], capture_output=True, timeout=30)
        argv = sandbox_runtime.exec_argv(container, list(cmd), workdir=workdir,
                                         env_names=sorted(environ), marker=marker,
                                         nproc=record.get("pids") if self.isolation == "gvisor"
                                         else None,
                                         isolation=self.isolation,
                                         container_id=record.get("container_id"),
                                         tty=tty is not None)
        return ContainerProcess(argv, {**os.environ, **environ}, text=text, timeout=timeout,
                                kill=kill, pty=tty)

    def _main_output(self) -> tuple[_Buffer, _Buffer]:
        """The main command's stdout and stderr, from podman's log of the container."""
        with self._lock:
            if self._log_buffers is None and self._relayed():
                from mctl.sdk.sandbox_relay import main_output

                self._log_buffers = main_output(self)
            if self._log_buffers is None:
                self._local(self._record)
                out, err = _Buffer(), _Buffer()
                from mctl.core import sandbox_runtime

                self._logs = subprocess.Popen(
                    sandbox_runtime.logs_argv(self._record),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
                out.pump(self._logs.stdout)
                err.pump(self._logs.stderr)
                self._log_buffers = (out, err)
            return self._log_buffers

    def _stop_logs(self) -> None:
        if self._logs is not None and self._logs.poll() is None:
            self._logs.kill()

    # --- files and snapshots ---------------------------------------------------------------------
    def _open(self, path: str, mode: str = "r") -> SandboxFile:
        """A file in the sandbox, as `open()` gives: read, write, append ("r", "w", "a",
        "rb", "wb", "ab", "r+"...). Written data reaches the sandbox at flush() or close()."""
        return SandboxFile(self, path, mode)

    def _fs(self, path: str, script: str, *args: str) -> bytes:
        """Run `script` (`/bin/sh -c`, $1 the path) for ls/mkdir/rm; its error as the OSError
        that the same call on a local path raises."""
        p = self._exec("/bin/sh", "-c", script, "sh", path, *args, text=False)
        p.stdin.write_eof()
        rc = p.wait()
        out, err = p.stdout.read(), p.stderr.read().decode(errors="replace").strip()
        if rc == 0:
            return out
        for marker, kind in (("No such file", FileNotFoundError), ("File exists", FileExistsError),
                             ("Not a directory", NotADirectoryError),
                             ("Is a directory", IsADirectoryError),
                             ("Directory not empty", OSError),
                             ("Permission denied", PermissionError),
                             ("Read-only", PermissionError)):
            if marker in err:
                raise kind(f"{path} in the sandbox: {marker.lower()} ({err})")
        raise OSError(f"{path} in the sandbox: {err or f'exit code {rc}'}")

    def _ls(self, path: str) -> list[str]:
        """The names in directory `path` (Modal's `sb.ls`), as os.listdir gives them."""
        out = self._fs(path, '[ -e "$1" ] || { echo "No such file or directory" >&2; exit 1; }; '
                             '[ -d "$1" ] || { echo "Not a directory" >&2; exit 1; }; '
                             'cd "$1" || exit 1; for f in .* *; do case $f in .|..) continue;; '
                             'esac; [ -e "$f" ] || [ -L "$f" ] || continue; printf "%s\\0" "$f"; '
                             'done')
        return sorted(n.decode(errors="surrogateescape") for n in out.split(b"\0") if n)

    def _mkdir(self, path: str, parents: bool = False) -> None:
        """Make directory `path` (Modal's `sb.mkdir`); `parents`: with its parents, as
        `mkdir -p` (no error if it exists)."""
        self._fs(path, 'mkdir -p -- "$1"' if parents else 'mkdir -- "$1"')

    def _rm(self, path: str, recursive: bool = False) -> None:
        """Remove file `path` (Modal's `sb.rm`); `recursive`: a directory and what it holds.
        An empty directory needs no `recursive`."""
        self._fs(path, 'rm -r -- "$1"' if recursive else
                 'if [ -d "$1" ] && [ ! -L "$1" ]; then rmdir -- "$1"; else rm -- "$1"; fi')

    def _snapshot(self, timeout: int = 55) -> Any:
        """The sandbox's file system now, as an Image to start other sandboxes from."""
        from mctl.sdk.image import Image

        reply = _http(self._url, "POST", f"/api/sandboxes/{self.object_id}/snapshot",
                      timeout_s=None)
        return Image.from_registry(reply["image"])


def _modal_create_keywords(kwargs: dict[str, Any]) -> None:
    """Take Modal's `Sandbox.create` keywords that mctl accepts out of `kwargs`, as for
    functions: `environment_name=` is ignored (one environment per control plane), placement
    keywords (`region=`, `cloud=`, ...) warn, the refused ones (`network_file_systems=`,
    `proxy=`, ...) raise when set. What is left is unknown."""
    from mctl.sdk.app import NO_EFFECT_KEYWORDS, REFUSED_KEYWORDS
    from mctl.sdk.deprecated import warn_once

    kwargs.pop("environment_name", None)
    if kwargs.pop("client", None) is not None:
        raise InvalidError("Sandbox.create(client=...) is Modal's; mctl finds its control plane "
                           "itself (MCTL_SERVER_URL, a profile or the local server).")
    if kwargs.pop("verbose", False):
        warn_once("sandbox-verbose", "Sandbox.create(verbose=True) has no effect on mctl; "
                  "`mctl sandbox logs SB` prints the main command's output.", stacklevel=4)
    if kwargs.pop("readiness_probe", None) is not None:
        raise InvalidError("Sandbox.create(readiness_probe=...) is not supported by mctl yet; "
                           "poll with sb.exec(...) until the sandbox is ready.")
    for key in [k for k in kwargs if k in REFUSED_KEYWORDS or k in NO_EFFECT_KEYWORDS]:
        value = kwargs.pop(key)
        if key in REFUSED_KEYWORDS and value:
            raise InvalidError(f"Sandbox.create({key}={value!r}): {REFUSED_KEYWORDS[key]}.")
        if key in NO_EFFECT_KEYWORDS and value not in (None, False, {}, [], ()):
            warn_once(f"sandbox-no-effect:{key}", f"Sandbox.create({key}=...) has no effect on "
                      "mctl (it is about Modal's cloud); it is ignored.", stacklevel=4)


async def _create_aio(*cmd: str, **kwargs: Any) -> Sandbox:
    import asyncio

    return await asyncio.to_thread(Sandbox._create, *cmd, **kwargs)


Sandbox.create = Dual(Sandbox._create, _create_aio)  # type: ignore[assignment]
Sandbox.from_id = Dual(Sandbox._from_id, Sandbox._aio(Sandbox._from_id))  # type: ignore[assignment]
Sandbox.from_name = Dual(Sandbox._from_name,  # type: ignore[assignment]
                         Sandbox._aio(Sandbox._from_name))


class SandboxFile:
    """A file in a sandbox (`Sandbox.open`): reads fetch the whole file once; writes are kept
    here and sent at flush()/close()."""

    def __init__(self, sb: Sandbox, path: str, mode: str) -> None:
        if not mode or mode[0] not in "rwax" or any(c not in "rwaxb+t" for c in mode):
            raise InvalidError(f"Invalid file mode {mode!r}; use 'r', 'w', 'a', 'rb', 'wb'...")
        self._sb, self._path, self._mode = sb, path, mode
        self._binary = "b" in mode
        self._readable = mode[0] == "r" or "+" in mode
        self._writable = mode[0] in "wax" or "+" in mode
        self._closed = False
        initial = b""
        if mode[0] == "r" or mode[0] == "a":
            initial = self._cat(must_exist=mode[0] == "r")
        elif mode[0] == "x" and self._exists():
            raise FileExistsError(f"{path} exists in the sandbox.")
        self._io = io.BytesIO(initial)
        if mode[0] == "a":
            self._io.seek(0, io.SEEK_END)
        self._dirty = mode[0] in "wx"

    def _run(self, *cmd: str, data: bytes | None = None) -> tuple[int, bytes, bytes]:
        # no timeout=: its pid file would stay in the sandbox's /tmp (ls showed one per call)
        p = self._sb._exec(*cmd, text=False)
        if data is not None:
            p.stdin.write(data)
        p.stdin.write_eof()
        rc = p.wait()
        return rc, p.stdout.read(), p.stderr.read()

    def _exists(self) -> bool:
        return self._run("test", "-e", self._path)[0] == 0

    def _cat(self, must_exist: bool) -> bytes:
        rc, out, err = self._run("cat", self._path)
        if rc != 0:
            if not must_exist and b"No such file" in err:
                return b""
            msg = err.decode(errors="replace").strip()
            if "No such file" in msg:
                raise FileNotFoundError(f"{self._path}: no such file in the sandbox.")
            if "Is a directory" in msg:
                raise IsADirectoryError(f"{self._path} is a directory in the sandbox.")
            if "Permission denied" in msg:
                raise PermissionError(f"{self._path}: permission denied in the sandbox.")
            raise OSError(f"Could not read {self._path} in the sandbox: {msg}")
        return out

    def _check(self, want: str) -> None:
        if self._closed:
            raise ValueError("I/O operation on closed sandbox file.")
        if want == "r" and not self._readable:
            raise io.UnsupportedOperation("not readable")
        if want == "w" and not self._writable:
            raise io.UnsupportedOperation("not writable")

    def _conv(self, data: bytes) -> Any:
        return data if self._binary else data.decode()

    def read(self, n: int = -1) -> Any:
        self._check("r")
        return self._conv(self._io.read(n))

    def readline(self) -> Any:
        self._check("r")
        return self._conv(self._io.readline())

    def readlines(self) -> list[Any]:
        self._check("r")
        return [self._conv(x) for x in self._io.readlines()]

    def write(self, data: Any) -> int:
        self._check("w")
        raw = data.encode() if isinstance(data, str) else bytes(data)
        if isinstance(data, str) and self._binary:
            raise TypeError("a bytes-like object is required in binary mode")
        self._io.write(raw)
        self._dirty = True
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._io.seek(offset, whence)

    def flush(self) -> None:
        if self._dirty and not self._closed:
            rc, _, err = self._run("/bin/sh", "-c", 'cat > "$1"', "sh", self._path,
                                   data=self._io.getvalue())
            if rc != 0:
                msg = err.decode(errors="replace").strip()
                if "Permission denied" in msg or "Read-only" in msg:
                    raise PermissionError(
                        f"Cannot write {self._path} in the sandbox: {msg}. Code in a sandbox "
                        "runs as user nobody (65534) above a read-only image: write under /tmp "
                        "(e.g. Sandbox.create(..., workdir=\"/tmp\") for relative paths) or in "
                        "a volume.")
                raise OSError(f"Cannot write {self._path} in the sandbox: {msg}")
            self._dirty = False

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> SandboxFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["ContainerProcess", "Sandbox", "SandboxFile", "SandboxTerminatedError",
           "SandboxTimeoutError", "StreamReader", "StreamWriter", "Tunnel"]
