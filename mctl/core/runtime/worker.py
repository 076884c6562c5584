"""The worker loop: receive inputs from the control plane, run the user's code, send outputs.

Sync user code runs on `max_inputs` runner threads pulling from one local queue; async user code runs
as tasks on the worker's event loop. Outputs are gathered and sent in batches. An input that runs past
`timeout` is reported as timed out and the whole process exits, as a container would be killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import queue
import sys
import threading
import time
import traceback
from collections import deque
from typing import Any

from mctl.core import protocol
from mctl.core.protocol import BLOB_THRESHOLD
from mctl.core.runtime import current, loader
from mctl.core.serialization import dumps, loads, serialize_exception
from mctl.core.spec import AppSpec, FunctionSpec
from mctl.exception import FunctionTimeoutError

log = logging.getLogger("mctl.worker")

_STOP = object()
DRAIN_REPLY_S = 10.0  # how long a SIGTERMed worker waits for the control plane's "stop"


class Worker:
    def __init__(self, server_url: str, app_id: str, function_id: str, task_id: str,
                 version: int = 0) -> None:
        self.http_url = server_url.rstrip("/")
        self.ws_url = self.http_url.replace("http", "ws", 1) + "/ws"
        self.app_id, self.function_id, self.task_id = app_id, function_id, task_id
        self.version = version
        # Inputs received whose final output the control plane has not yet acknowledged: named in
        # the hello after a reconnect, so it keeps them with this worker instead of re-running.
        self.held: dict[str, int] = {}  # input id -> the attempt this worker holds
        self.attempts: dict[str, int] = {}  # input id -> attempt, while it runs here
        self.out_seq = 0
        self.unacked: deque[tuple[int, bytes, list[str]]] = deque()
        self.logs: Any = None
        self._logs_scheduled = False
        self.local: queue.Queue[Any] = queue.Queue()
        self.outbox: list[tuple[dict[str, Any], bytes]] = []
        self.out_lock = threading.Lock()
        self.deadlines: dict[str, float] = {}
        self.cancelled: set[str] = set()
        self.instances: dict[bytes, Any] = {}
        self.instance_lock = threading.Lock()
        self.stopping = False
        self.stop_seen = asyncio.Event()  # the control plane's "stop" arrived
        self.ws: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.async_sem: asyncio.Semaphore | None = None
        self.web: Any = None  # runtime/web.WebRunner for a web function
        self.busy = 0  # inputs (or batches) running: volumes are committed when none is
        self.busy_lock = threading.Lock()
        from mctl.core.runtime.exec import ExecSessions

        self.execs = ExecSessions(self._send_frame)  # `mctl container exec`

    # --- setup ---------------------------------------------------------------------------------
    async def load(self, session: Any) -> None:
        params = {"version": str(self.version)} if self.version else None
        record = await self._get_json(session, f"/api/apps/{self.app_id}", params)
        # Secret values come from the control plane, with this task's token, never in the env
        # the scheduler saw; a backend like Vault is read here directly, with a one-time token.
        answer = await self._get_json(session, f"/api/functions/{self.function_id}/secrets")
        if answer.get("delegated"):
            from mctl.core.environment import read_delegated

            os.environ.update(await asyncio.to_thread(read_delegated, answer))
        else:
            os.environ.update(answer["env"])
        # Working copies of the function's volumes (store driver), before the user's code runs:
        # a module may read a volume at import.
        from mctl.core import volume_sync

        await asyncio.to_thread(volume_sync.setup, self.http_url, self.task_id)
        self.app = AppSpec.model_validate(record["spec"])
        self.fspec: FunctionSpec = next(f for f in self.app.functions.values()
                                        if f.function_id == self.function_id)
        user_app, self.raw = await asyncio.to_thread(loader.load_function, self.http_url, self.app,
                                                     self.fspec)
        if user_app is not None:
            user_app._hydrate_in_worker(self.app_id)
        self.is_class = self.fspec.kind == "class"
        self.is_async = self.fspec.is_async
        if not self.is_class and self.fspec.batch_max_size is None and self.is_async:
            self.async_sem = asyncio.Semaphore(self.fspec.max_inputs)
        if self.fspec.web is not None or any(m.web for m in self.fspec.methods.values()):
            from mctl.core.runtime.web import WebRunner

            self.web = WebRunner(self)

    async def _get_json(self, session: Any, path: str, params: Any = None) -> Any:
        """GET from the control plane, waiting out a restart of it (see loader's patience)."""
        import aiohttp

        deadline = time.monotonic() + loader.CONTROL_PLANE_PATIENCE_S
        while True:
            try:
                async with session.get(f"{self.http_url}{path}", params=params) as resp:
                    resp.raise_for_status()
                    return await resp.json()
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    # --- main loop -----------------------------------------------------------------------------
    async def run(self) -> None:
        import signal

        import aiohttp

        from mctl.core.runtime.logcapture import LogCapture

        self.loop = asyncio.get_running_loop()
        # SIGTERM (scale-down, app stop, Nomad's kill) drains: running inputs finish, @exit runs.
        self.loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        self.logs = LogCapture(self._logs_arrived)
        _install_exit_hook(self)
        from mctl.core import transport

        # MCTL_TASK_TOKEN (see config.configured_token) and the CA go with every request.
        async with aiohttp.ClientSession(
                headers=transport.auth_headers(self.http_url),
                connector=aiohttp.TCPConnector(ssl=transport.aiohttp_ssl(self.http_url))) as session:
            # From the start: a local worker still loading when its control plane dies must not
            # load from the successor (which does not know it) and take inputs there.
            threading.Thread(target=self._watchdog, name="mctl-watchdog", daemon=True).start()
            try:
                await self.load(session)
            except BaseException as exc:  # noqa: BLE001 - the user's import may even sys.exit()
                if not await self._report_start_failure(session, exc):
                    from mctl.core.tracebacks import format_user_traceback

                    print(format_user_traceback(exc), end="", file=sys.stderr, flush=True)
                    self.logs.drain(end_lines=True)  # to the job's own output too, before it ends
                raise SystemExit(1) from None
            self._start_threads()
            while not self.stopping:
                try:
                    async with session.ws_connect(self.ws_url, max_msg_size=protocol.MAX_FRAME,
                                                  heartbeat=30) as ws:
                        await ws.send_bytes(protocol.encode({
                            "type": "hello", "role": "worker", "task_id": self.task_id,
                            "function_id": self.function_id, "version": self.version,
                            "held": sorted(self.held)}))
                        for _, frame, _ in list(self.unacked):  # may not have been stored
                            await ws.send_bytes(frame)
                        self.ws = ws
                        self.logs.set_connected(True)
                        self._flush_outputs()
                        await self._receive(ws)
                except (aiohttp.ClientError, OSError) as exc:
                    if isinstance(exc, aiohttp.WSServerHandshakeError) and exc.status in (401, 403):
                        # Revoked (a newer version is active, or the app stopped): do not retry.
                        print(f"mctl: the control plane refused this worker's task token "
                              f"({exc.status}); exiting", file=sys.stderr, flush=True)
                        self.stopping = True
                    else:
                        log.warning("control plane unreachable (%s); reconnecting", exc)
                self.ws = None
                self.logs.set_connected(False)
                if not self.stopping:
                    await asyncio.sleep(0.5)
                if self._orphaned():
                    os._exit(0)  # see _watchdog: not to reconnect to the successor
        self._shutdown()
        self.logs.drain(end_lines=True)

    async def _report_start_failure(self, session: Any, exc: BaseException) -> bool:
        """Tell the control plane why the user's code could not load, so callers see it (the
        exception carries the traceback). False when the control plane cannot be told."""
        import aiohttp

        summary = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        try:
            async with session.ws_connect(self.ws_url, max_msg_size=protocol.MAX_FRAME) as ws:
                await ws.send_bytes(protocol.encode({
                    "type": "hello", "role": "worker", "task_id": self.task_id,
                    "function_id": self.function_id, "version": self.version,
                    "start_error": summary}, [serialize_exception(exc)]))
                self.logs.drain(end_lines=True)
                frame = self.logs.frame()
                if frame:
                    await ws.send_bytes(protocol.encode(frame))
            return True
        except (aiohttp.ClientError, OSError):
            return False  # the backend reports the exit with the output's tail

    async def _receive(self, ws: Any) -> None:
        import aiohttp

        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                continue
            header, payloads = protocol.decode(msg.data)
            kind = header["type"]
            if kind == "inputs":
                for item, payload in zip(header["items"], payloads):
                    self._accept(item, payload)
            elif kind == "outputs_ack":
                unacked = self.unacked
                while unacked and unacked[0][0] <= header["upto"]:
                    for input_id, attempt in unacked.popleft()[2]:
                        if self.held.get(input_id) == attempt:  # not a newer retry of it
                            del self.held[input_id]
            elif kind == "log_ack":
                self.logs.ack(header["upto"])
            elif kind == "input_data":  # more of a web request
                if self.web is not None:
                    self.web.deliver(header, payloads)
            elif kind == "cancel":
                self.cancelled.update(header["input_ids"])
                if self.web is not None:
                    self.web.cancel(header["input_ids"])
                for input_id in header["input_ids"]:
                    self.held.pop(input_id, None)
            elif kind.startswith("exec"):  # exec, exec_input, exec_kill
                self.execs.handle(header, payloads)
            elif kind == "stop":
                self.stopping = True
                self.stop_seen.set()
                await self._drain_and_close(ws)
                return
            elif kind == "error" and header.get("code") == "forbidden":
                print(f"mctl: {header['message']}", file=sys.stderr, flush=True)
                self.stopping = True
                return

    def _on_sigterm(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        if self.ws is not None:
            self.loop.create_task(self._ask_to_drain(self.ws))  # type: ignore[union-attr]

    async def _ask_to_drain(self, ws: Any) -> None:
        """Drain on SIGTERM, but only after inputs already on their way here have arrived: the
        signal can overtake a dispatch (a scale-down signals right after its "stop"), and an input
        read after the runners stopped would never run. The control plane answers "draining"
        with "stop", which comes after everything it sent before."""
        try:
            await ws.send_bytes(protocol.encode({"type": "draining"}))
            await asyncio.wait_for(self.stop_seen.wait(), DRAIN_REPLY_S)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            if not ws.closed:  # no answer (an older control plane): drain anyway
                await self._drain_and_close(ws)

    async def _drain_and_close(self, ws: Any) -> None:
        for _ in range(self.runner_count):
            self.local.put(_STOP)
        await asyncio.to_thread(self._join_runners)
        while self.async_tasks:
            await asyncio.gather(*self.async_tasks, return_exceptions=True)
        while self.web is not None and self.web.tasks:
            await asyncio.gather(*self.web.tasks.values(), return_exceptions=True)
        self._flush_outputs()
        # @exit handlers run while the connection is still open, so what they print reaches
        # the caller's output and `mctl app logs`.
        await asyncio.to_thread(self._close_instances)
        await asyncio.sleep(0)
        await self._send_logs_now(ws)
        await ws.close()

    async def _send_logs_now(self, ws: Any) -> None:
        if self.logs is None or ws.closed:
            return
        self.logs.drain(end_lines=True)
        frame = self.logs.frame()
        if frame:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_bytes(protocol.encode(frame))

    def _accept(self, item: dict[str, Any], payload: bytes) -> None:
        attempt = item.get("attempt", 1)
        if self.held.get(item["id"]) == attempt:
            return  # sent again after a reconnect; it is already queued or running here
        self.held[item["id"]] = attempt
        self.attempts[item["id"]] = attempt
        if item.get("http") and self.web is not None:
            self.web.accept(item, payload)
        elif self.async_sem is not None:
            task = self.loop.create_task(self._run_async(item, payload))  # type: ignore[union-attr]
            self.async_tasks.add(task)
            task.add_done_callback(self.async_tasks.discard)
        else:
            self.local.put((item, payload))

    # --- runners -------------------------------------------------------------------------------
    def _start_threads(self) -> None:
        self.async_tasks: set[asyncio.Task[Any]] = set()
        spec = self.fspec
        self.runner_count = 0 if self.async_sem is not None else spec.max_inputs
        target = self._batch_runner if spec.batch_max_size else self._runner
        self.runners = [threading.Thread(target=target, name=f"mctl-runner-{i}", daemon=True)
                        for i in range(self.runner_count)]
        for thread in self.runners:
            thread.start()

    def _join_runners(self) -> None:
        for thread in self.runners:
            thread.join()

    def _runner(self) -> None:
        while True:
            job = self.local.get()
            if job is _STOP:
                return
            item, payload = job
            if item["id"] in self.cancelled:
                continue
            self._run_one(item, payload)

    def _run_one(self, item: dict[str, Any], payload: bytes) -> None:
        input_id = item["id"]
        self._started()
        current.set_input(item)
        start = time.monotonic()
        self.deadlines[input_id] = start + self.fspec.timeout
        seq = 0
        try:
            fn, args, kwargs, is_gen = self._resolve(item, payload)
            if is_gen:
                result = fn(*args, **kwargs)
                if inspect.isasyncgen(result):
                    result = _iterate_async_gen(result)
                for value in result:
                    self._emit(input_id, "item", _result(value, fn), seq, final=False)
                    seq += 1
                self._returned(input_id, "gen_done", b"", seq, dur=time.monotonic() - start)
            else:
                result = fn(*args, **kwargs)
                if inspect.iscoroutine(result):
                    result = asyncio.run(result)
                self._returned(input_id, "success", _result(result, fn),
                               dur=time.monotonic() - start)
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything
            self._name_exit(exc)
            self._returned(input_id, "failure", serialize_exception(exc), seq,
                           dur=time.monotonic() - start)
        finally:
            self.deadlines.pop(input_id, None)

    def _batch_runner(self) -> None:
        spec = self.fspec
        assert spec.batch_max_size is not None and spec.batch_wait_ms is not None
        while True:
            job = self.local.get()
            if job is _STOP:
                return
            jobs = [job]
            deadline = time.monotonic() + spec.batch_wait_ms / 1000
            stop = False
            while len(jobs) < spec.batch_max_size:
                try:
                    nxt = self.local.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                jobs.append(nxt)
            self._run_batch(jobs)
            if stop:
                return

    def _run_batch(self, jobs: list[tuple[dict[str, Any], bytes]]) -> None:
        self._started()
        start = time.monotonic()
        ids = [item["id"] for item, _ in jobs]
        current.set_input(jobs[0][0])
        for input_id in ids:
            self.deadlines[input_id] = start + self.fspec.timeout
        committed = False
        try:
            calls = [self._resolve(item, payload) for item, payload in jobs]
            fn = calls[0][0]
            # Each input is one call's single argument; the function gets them as a list.
            columns = list(zip(*[args for _, args, _, _ in calls])) if calls[0][1] else []
            kw_names = list(calls[0][2])
            kw_columns = {k: [kwargs[k] for _, _, kwargs, _ in calls] for k in kw_names}
            results = fn(*[list(col) for col in columns], **kw_columns)
            if inspect.iscoroutine(results):
                results = asyncio.run(results)
            results = list(results)
            if len(results) != len(jobs):
                raise ValueError(f"@batched function returned {len(results)} results for "
                                 f"{len(jobs)} inputs; return one result per input.")
            dur = (time.monotonic() - start) / len(jobs)
            outputs = [_result(value, fn) for value in results]
            committed = True
            error = self._autocommit()
            for input_id, data in zip(ids, outputs):
                if error is None:
                    self._emit(input_id, "success", data, dur=dur)
                else:
                    self._emit(input_id, "failure", error)
        except BaseException as exc:  # noqa: BLE001
            self._name_exit(exc)
            err = serialize_exception(exc)
            if not committed:
                self._autocommit()
            for input_id in ids:
                self._emit(input_id, "failure", err)
        finally:
            for input_id in ids:
                self.deadlines.pop(input_id, None)

    async def _run_async(self, item: dict[str, Any], payload: bytes) -> None:
        assert self.async_sem is not None
        async with self.async_sem:
            input_id = item["id"]
            self._started()
            current.set_input(item)
            start = time.monotonic()
            seq = 0
            try:
                fn, args, kwargs, is_gen = await asyncio.to_thread(self._resolve, item, payload)
                if is_gen:
                    async def consume() -> int:
                        n = 0
                        async for value in fn(*args, **kwargs):
                            self._emit(input_id, "item", _result(value, fn), n, final=False)
                            n += 1
                        return n

                    seq = await asyncio.wait_for(consume(), self.fspec.timeout)
                    await asyncio.to_thread(self._returned, input_id, "gen_done", b"", seq,
                                            time.monotonic() - start)
                else:
                    result = await asyncio.wait_for(fn(*args, **kwargs), self.fspec.timeout)
                    await asyncio.to_thread(self._returned, input_id, "success", _result(result, fn),
                                            0, time.monotonic() - start)
            except asyncio.TimeoutError:
                self._emit(input_id, "timeout", serialize_exception(FunctionTimeoutError(
                    f"Input {input_id} timed out after {self.fspec.timeout:g}s.")), seq)
            except BaseException as exc:  # noqa: BLE001
                self._name_exit(exc)
                await asyncio.to_thread(self._returned, input_id, "failure",
                                        serialize_exception(exc), seq)

    def _name_exit(self, exc: BaseException) -> None:
        """A `sys.exit(N)` in the function travels to the caller as SystemExit, named, so
        `mctl run` can say which function asked to exit (see cli.main.run)."""
        if isinstance(exc, SystemExit):
            with contextlib.suppress(AttributeError, TypeError):
                exc._mctl_function = self.fspec.tag  # type: ignore[attr-defined]

    def _resolve(self, item: dict[str, Any], payload: bytes) -> tuple[Any, tuple, dict, bool]:
        """Decode an input into (callable, args, kwargs, is_generator)."""
        if item.get("blob"):
            payload = loader.fetch_blob(self.http_url, payload.decode())
        data = loads(payload)
        if not self.is_class:
            args, kwargs = data
            return self.raw, args, kwargs, self.fspec.is_generator
        method, params, args, kwargs = data
        obj = self._instance(params)
        return getattr(obj, method), args, kwargs, self.fspec.methods[method].is_generator

    def _instance(self, params: dict[str, Any]) -> Any:
        """One instance of the user class per parameter set, entered once."""
        key = dumps(sorted(params.items()))
        obj = self.instances.get(key)
        if obj is not None:
            return obj
        with self.instance_lock:
            obj = self.instances.get(key)
            if obj is None:
                obj = self.raw.new_instance(params)  # a ClassRunner: constructs, runs @enter
                self.instances[key] = obj
        return obj

    # --- volumes -------------------------------------------------------------------------------
    def _started(self) -> None:
        with self.busy_lock:
            self.busy += 1

    def _autocommit(self) -> bytes | None:
        """When an input returns and no other runs here, commit the working copies of the
        function's volumes (store driver), so its caller and later calls see its files. Returns
        the serialized error when that commit failed (then the input fails with it)."""
        from mctl.core import volume_sync

        with self.busy_lock:
            self.busy -= 1
            last = self.busy == 0
        if not last or not volume_sync.active():
            return None
        try:
            volume_sync.commit_all()
        except Exception as exc:  # noqa: BLE001 - a full store, the control plane unreachable
            return serialize_exception(exc)
        return None

    def _returned(self, input_id: str, status: str, data: bytes, seq: int = 0,
                  dur: float | None = None) -> None:
        """An input's final output, after the automatic commit (whose failure fails it)."""
        error = self._autocommit()
        if error is not None:
            status, data = "failure", error
        self._emit(input_id, status, data, seq, dur=dur)

    # --- outputs -------------------------------------------------------------------------------
    def _emit(self, input_id: str, status: str, data: bytes, seq: int = 0, final: bool = True,
              dur: float | None = None) -> None:
        with contextlib.suppress(Exception):  # what it printed before comes before (_send_logs)
            sys.stdout.flush()
            sys.stderr.flush()
        item: dict[str, Any] = {"id": input_id, "status": status, "seq": seq, "final": final}
        if dur is not None:
            item["dur"] = dur
        if len(data) > BLOB_THRESHOLD:
            from mctl.core.client import upload_blob_sync

            data = upload_blob_sync(self.http_url, data).encode()
            item["blob"] = True
        with self.out_lock:
            first = not self.outbox
            self.outbox.append((item, data))
        if first and self.loop is not None:
            self.loop.call_soon_threadsafe(self._flush_outputs)

    def _flush_outputs(self) -> None:
        ws = self.ws
        if ws is None or ws.closed:
            return
        self._send_logs(end_lines=True)  # what the user printed before a result arrives before it
        with self.out_lock:
            batch, self.outbox = self.outbox, []
        if batch:
            self.out_seq += 1
            items = [i for i, _ in batch]
            frame = protocol.encode({"type": "outputs", "seq": self.out_seq, "items": items},
                                    [d for _, d in batch])
            finals = [(i["id"], self.attempts.pop(i["id"], 1)) for i in items if i["final"]]
            self.unacked.append((self.out_seq, frame, finals))
            self.loop.create_task(ws.send_bytes(frame))  # type: ignore[union-attr]

    # --- logs ----------------------------------------------------------------------------------
    def _logs_arrived(self) -> None:
        """Called from the capture thread; the lines go out from the loop."""
        if not self._logs_scheduled and self.loop is not None:
            self._logs_scheduled = True
            self.loop.call_soon_threadsafe(self._send_logs_soon)

    def _send_logs_soon(self) -> None:
        self._logs_scheduled = False
        self._send_logs()

    def _send_logs(self, end_lines: bool = False) -> None:
        ws = self.ws
        if ws is None or ws.closed or self.logs is None:
            return
        # No flush on the loop: a thread blocked printing into a full pipe holds its stream's
        # lock until the capture thread reads on, which may wait for this loop's log_ack.
        self.logs.drain(flush=False, end_lines=end_lines)
        frame = self.logs.frame()
        if frame:
            self.loop.create_task(ws.send_bytes(protocol.encode(frame)))  # type: ignore[union-attr]

    def flush_logs_before_exit(self, wait_s: float = 1.0) -> None:
        """From any thread, just before the process ends: the captured output to the control
        plane (waiting up to `wait_s`), or at least to the process's own output, whose tail the
        backend keeps."""
        if self.logs is None:
            return
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        self.logs.drain(flush=False, end_lines=True)
        ws, loop = self.ws, self.loop
        if ws is None or ws.closed or loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:  # the loop's own thread cannot wait for itself
            return
        frame = self.logs.frame()
        if not frame:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(ws.send_bytes(protocol.encode(frame)),
                                             loop).result(wait_s)

    # --- watchdog ------------------------------------------------------------------------------
    @staticmethod
    def _orphaned() -> bool:
        """A local backend's worker whose control plane died: its successor starts new workers
        (cluster workers have no parent to lose: a restarted control plane adopts them)."""
        parent = int(os.environ.get("MCTL_PARENT_PID", "0") or 0)
        return bool(parent) and os.getppid() != parent

    def _watchdog(self) -> None:
        while True:
            time.sleep(0.1)
            if self._orphaned():
                os._exit(0)
            now = time.monotonic()
            for input_id, deadline in list(self.deadlines.items()):
                if now > deadline:
                    self._timeout(input_id)

    def _timeout(self, input_id: str) -> None:
        print(f"mctl: input {input_id} timed out after {self.fspec.timeout:g}s; stopping this "
              "container", file=sys.stderr, flush=True)
        self._emit(input_id, "timeout", serialize_exception(FunctionTimeoutError(
            f"Input {input_id} timed out after {self.fspec.timeout:g}s.")))
        # Give the loop a moment to send the output, then die as a killed container would.
        time.sleep(0.3)
        os._exit(3)

    def _send_frame(self, frame: bytes) -> Any:
        ws = self.ws
        if ws is None or ws.closed:
            return None
        return ws.send_bytes(frame)

    def _close_instances(self) -> None:
        """Run each instance's @exit once."""
        with self.instance_lock:
            instances, self.instances = list(self.instances.values()), {}
        for obj in instances:
            try:
                self.raw.close_instance(obj)
            except Exception:
                traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()

    def _shutdown(self) -> None:
        self.execs.kill_all()
        self._close_instances()
        from mctl.core import volume_sync

        if volume_sync.active():  # what @exit wrote, and anything not yet committed
            try:
                volume_sync.commit_all()
            except Exception as exc:  # noqa: BLE001
                print(f"mctl: the last commit of this container's volumes failed: {exc}",
                      file=sys.stderr, flush=True)
            volume_sync.remove_all()


def _result(value: Any, fn: Any) -> bytes:
    """The pickled result; one that cannot be pickled fails with the function's name."""
    from mctl.core.serialization import serialize_result

    return serialize_result(value, getattr(fn, "__qualname__", None) or repr(fn))


_real_exit = os._exit


def _install_exit_hook(worker: Worker) -> None:
    """`os._exit()` in the user's code (or ours) first sends what was printed: the capture
    thread has not read the pipe yet, and the process takes the pipe with it."""
    def _exit(code: int) -> None:  # noqa: ANN001 - os._exit's signature
        try:
            worker.flush_logs_before_exit()
        finally:
            _real_exit(code)

    os._exit = _exit  # type: ignore[assignment]


def _iterate_async_gen(agen: Any) -> Any:
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()


def main() -> None:
    logging.basicConfig(level=os.environ.get("MCTL_LOG_LEVEL", "WARNING"))
    env = os.environ
    from mctl.core import ids

    task_id = env.get("MCTL_TASK_ID") or ids.new_id("task")
    os.environ["MCTL_TASK_ID"] = os.environ["MODAL_TASK_ID"] = task_id
    from mctl.core.runtime.logcapture import start_keeper

    start_keeper(task_id)  # what the worker prints survives a SIGKILL (the OOM killer's too)
    worker = Worker(env["MCTL_SERVER_URL"], env["MCTL_APP_ID"], env["MCTL_FUNCTION_ID"], task_id,
                    int(env.get("MCTL_APP_VERSION") or 0))
    try:
        asyncio.run(worker.run())
    except KeyboardInterrupt:
        pass

