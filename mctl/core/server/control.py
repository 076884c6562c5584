"""The control plane's engine: per-function input queues, dispatch to workers, outputs to callers.

Everything runs on one asyncio loop. Each turn's state changes are committed to the store in one
transaction (`_flush`), and only then are callers acknowledged or sent outputs: an input is
acknowledged once stored, and an output is delivered once stored.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from mctl.core import ids
from mctl.core.protocol import CHUNK_BYTES, encode
from mctl.core.spec import AppSpec, FunctionSpec, function_id
from mctl.core.server import variants
from mctl.core.server.store import Store

if TYPE_CHECKING:
    from mctl.core.plugin_types import SchedulerBackend
    from mctl.core.server.autoscaler import Autoscaler

log = logging.getLogger("mctl.server")

# A worker whose connection drops keeps its inputs this long, to resume them when it reconnects.
RECONNECT_GRACE = float(os.environ.get("MCTL_WORKER_RECONNECT_GRACE", "10"))

# How long an ended worker's output tail waits for its connection's end (the frames before it).
TAIL_WAIT_S = 3.0
FINAL_FAILURES = ("failure", "timeout", "crashed")


class InputRec:
    __slots__ = ("input_id", "function_id", "call_id", "idx", "payload", "is_blob", "attempts",
                 "created", "worker", "done", "started", "queued", "sink", "backlog")

    def __init__(self, input_id: str, function_id: str, call_id: str, idx: int, payload: bytes,
                 is_blob: bool, created: float) -> None:
        self.input_id, self.function_id, self.call_id, self.idx = input_id, function_id, call_id, idx
        self.payload, self.is_blob, self.created = payload, is_blob, created
        self.attempts = 0
        self.worker: Conn | None = None
        self.done = False
        self.started = 0.0
        self.queued = False     # in its function's pending queue
        # A web request (see enqueue_request): outputs go to `sink`, not to the store; `backlog`
        # holds more of the request (body chunks, WebSocket messages) until a worker has it.
        self.sink: Callable[[str, bytes, bool], None] | None = None
        self.backlog: list[tuple[dict[str, Any], list[bytes]]] = []


class Conn:
    """One WebSocket session, a caller's or a worker's. Sends keep their order."""

    def __init__(self, send_bytes: Callable[[bytes], Any], peer: str = "") -> None:
        self._send_bytes = send_bytes
        self.peer = peer
        self.principal: Any = None  # the auth.Principal of the connection's token
        self.role = "client"
        self.task_id = ""
        self.hello_at: float | None = None
        self.function_id = ""
        self.pool_id = ""
        self.app_id = ""
        self.running: dict[str, InputRec] = {}
        self.idle_since = time.monotonic()   # since its last finished input
        self.outputs_seq: int | None = None  # newest outputs frame to acknowledge once stored
        self.subscriptions: set[str] = set()
        self.owned_apps: set[str] = set()
        self.draining = False
        self.dispatched = 0  # inputs sent to this worker (for `max_inputs=`, its lifetime cap)
        self.closed = False
        self._outbox: deque[bytes] = deque()
        self._writer: asyncio.Task[None] | None = None

    def send(self, header: dict[str, Any], payloads: list[bytes] = ()) -> None:  # type: ignore[assignment]
        if self.closed:
            return
        self._outbox.append(encode(header, list(payloads)))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._outbox:
                await self._send_bytes(self._outbox.popleft())
        except Exception:  # connection gone; the reader side cleans up
            self._outbox.clear()


class FunctionState:
    def __init__(self, app_id: str, spec: FunctionSpec) -> None:
        self.app_id = app_id
        self.spec = spec
        self.pending: deque[InputRec] = deque()
        self.n_pending = 0          # pending minus those already done (lazy deletion)
        self.running = 0
        self.workers: list[Conn] = []
        self.last_active = time.monotonic()
        self.exec_ewma: float | None = None  # seconds per input, reported by workers
        self.stopped = False
        self.version = 0
        # Set when the function cannot start or be placed: every input fails with this error.
        self.failure: bytes | None = None
        self.failure_text = ""
        # A scheduled function's last run, when it failed (`mctl app list` shows it): its time,
        # call id and error line. Cleared by a run that succeeds; not kept across restarts.
        self.last_failure: dict[str, Any] | None = None
        # After a restart nothing is dispatched until the backend has said which workers of the
        # previous process still run (`restoring`) and those have reconnected and reclaimed the
        # inputs they hold (`awaited`), or the reconnect grace has passed.
        self.restoring = False
        self.awaited: set[str] = set()

    @property
    def prefetch(self) -> int:
        """Inputs handed to one worker at once: more than it can run only when inputs are short,
        so that long inputs spread across containers instead of queueing on one."""
        spec = self.spec
        base = spec.max_inputs * (spec.batch_max_size or 1)
        if self.exec_ewma is None or self.exec_ewma > 0.005:
            return base
        return max(base, min(512, int(0.02 / max(self.exec_ewma, 1e-6))))


class ControlPlane:
    def __init__(self, store: Store, scheduler: SchedulerBackend | None = None,
                 log_sink: Callable[[str, str, str, str, str], None] | None = None) -> None:
        self.store = store
        self.scheduler = scheduler                  # the backend; core talks to it via autoscaler
        self.autoscaler: Autoscaler | None = None   # set by start_server
        self.orphans: dict[str, Conn] = {}          # task id -> dropped worker connection
        self.pending_tails: dict[str, Any] = {}     # task id -> OutputTail waiting for its EOF
        # Set once `recover` has run: a worker that outlived a previous control-plane process may
        # call back before then, and must find its inputs and function already in place.
        self.recovered = asyncio.Event()
        self.exited: deque[str] = deque(maxlen=1000)  # task ids the backend saw end
        self.exit_codes: dict[str, int] = {}  # task id -> its process's exit status, if known
        self.oom_killed: set[str] = set()     # task ids whose backend saw the OOM killer end them
        # task id -> [app id, function tag, number of the next output line it has not sent]
        self.task_logs: dict[str, list[Any]] = {}
        self.log_sink = log_sink
        self.functions: dict[str, FunctionState] = {}
        self.execs: dict[str, Any] = {}  # exec id -> containers.ExecSession (`container exec`)
        self.apps: dict[str, AppSpec] = {}
        self.live: dict[str, InputRec] = {}
        self.subscribers: dict[str, set[Conn]] = {}
        self.log_events: dict[str, asyncio.Event] = {}
        self.app_owners: dict[str, set[Conn]] = {}
        self.app_modes: dict[str, str] = {}
        self.apps_stopping: set[str] = set()  # stop_app under way: its workers may still print
        self.ephemeral_grace = float(os.environ.get("MCTL_EPHEMERAL_GRACE", "60"))
        self._acks: list[tuple[Conn, dict[str, Any]]] = []
        self._output_acks: set[Conn] = set()
        self._pushes: dict[Conn, tuple[list[dict[str, Any]], list[bytes]]] = {}
        self._flush_scheduled = False
        self.metrics: Any = None  # set by metrics.attach
        self.tokens: Any = None  # auth.TokenStore and audit.Audit, set by start_server
        self.audit: Any = lambda *args, **details: None
        self.started = time.time()

    # --- startup -------------------------------------------------------------------------------
    async def recover(self) -> None:
        """After a restart: bring back running apps and every input that has no output yet."""
        for app in self.store.apps():
            if app["state"] != "running" or not app["version"]:
                continue
            spec = AppSpec.model_validate(self.store.version_spec(app["app_id"], app["version"]))
            spec = variants.expand(self.store, app["app_id"], spec)
            for fspec in spec.functions.values():
                self.functions.setdefault(fspec.function_id,
                                          FunctionState(app["app_id"], fspec)).restoring = True
            await self.activate_app(app["app_id"], spec, app["version"], app["mode"])
        asyncio.get_running_loop().call_later(RECONNECT_GRACE, self._restored)
        now = time.time()
        count = 0
        for input_id, fid, call_id, idx, payload, is_blob in self.store.pending_inputs():
            fs = self.functions.get(fid)
            if fs is None:
                continue
            rec = InputRec(input_id, fid, call_id, idx, payload, bool(is_blob), now)
            self.live[input_id] = rec
            self._queue(fs, rec)
            count += 1
        if count:
            log.info("recovered %d pending inputs", count)
            for fs in self.functions.values():
                self._on_pending(fs)
        self.recovered.set()

    # --- apps ----------------------------------------------------------------------------------
    async def activate_app(self, app_id: str, spec: AppSpec, version: int, mode: str) -> None:
        spec = variants.expand(self.store, app_id, spec)  # Cls.with_options variants
        if self.tokens is not None:
            self._revoke_old_task_tokens_later(app_id, spec)
        self.apps[app_id] = spec
        self.app_modes[app_id] = mode
        if mode == "ephemeral" and not self.app_owners.get(app_id):
            self._reap_later(app_id)  # its caller has this long to connect (or reconnect)
        for fspec in spec.functions.values():
            fs = self.functions.get(fspec.function_id)
            if fs is None:
                fs = self.functions[fspec.function_id] = FunctionState(app_id, fspec)
            else:
                fs.spec, fs.stopped = fspec, False
            if fs.version != version:
                fs.version, fs.failure, fs.failure_text = version, None, ""
                for conn in list(fs.workers):  # the old version's workers finish and exit
                    if conn.pool_id != _pool_id(fspec.function_id, version):
                        self.drain(conn)
        current = {f.function_id for f in spec.functions.values()}
        for fid, fs in list(self.functions.items()):
            if fs.app_id == app_id and fid not in current:  # removed in this version
                self._retire(fs, f"Function {fs.spec.tag} is not in version {version} of app "
                                 f"{spec.name}; it was removed before this input ran.")
        if self.autoscaler is not None:
            await self.autoscaler.apply_app(app_id, spec, version)

    async def add_variant(self, app_id: str, base_tag: str, variant: FunctionSpec,
                          overrides: dict[str, Any]) -> None:
        """Start serving a variant of a class (see server/variants.py) in the app's current
        version: the class's own functions and pools are left as they are."""
        app = self.store.find_app(app_id)
        spec = self.apps.get(app_id)
        if app is None or spec is None:
            from mctl.exception import NotFoundError

            raise NotFoundError(f"App {app_id} is not running.")
        self.store.add_variant(app_id, variant.tag, base_tag, overrides)
        await self.activate_app(app_id, spec, app["version"], self.app_modes.get(app_id, app["mode"]))

    def _retire(self, fs: FunctionState, reason: str) -> None:
        """The function is gone: its waiting inputs fail with `reason`, its workers drain."""
        from mctl.core.serialization import serialize_exception
        from mctl.exception import ExecutionError

        error = serialize_exception(ExecutionError(reason))
        self.functions.pop(fs.spec.function_id, None)
        fs.stopped = True
        for rec in list(fs.pending):
            if not rec.done:
                self._store_output(rec, 0, "failure", error, False, final=True)
        for conn in list(fs.workers):
            self.drain(conn)
        self._schedule_flush()

    def _revoke_old_task_tokens_later(self, app_id: str, spec: AppSpec) -> None:
        """Older versions' workers drain first (they may still upload results and reconnect);
        once their longest input could have finished, their task tokens stop working."""
        delay = max((f.timeout for f in spec.functions.values()), default=0) + 10

        def revoke() -> None:
            app = self.store.find_app(app_id)
            if app is not None and app["state"] == "running":
                self.tokens.revoke_task_tokens(app_id, keep_version=app["version"])

        asyncio.get_running_loop().call_later(delay, revoke)

    async def create_app(self, spec: AppSpec, mode: str, app_id: str | None = None,
                         note: str = "") -> tuple[str, int]:
        from mctl.core.environment import grant_app

        app_id = app_id or (deployed_app_id(spec.name) if mode == "deployed" else ids.new_id("app"))
        # Before any worker starts: its secret backend (Vault) lets this app read its secrets.
        await asyncio.to_thread(grant_app, app_id, spec)
        self.store.upsert_app(app_id, spec.name, mode)
        version = self.store.add_version(app_id, ids.new_id("deployment"),
                                         spec.model_dump(mode="json"), note)
        await self.activate_app(app_id, spec, version, mode)
        return app_id, version

    async def stop_app(self, app_id: str) -> None:
        spec = self.apps.pop(app_id, None)
        mode = self.app_modes.pop(app_id, None)
        self.app_owners.pop(app_id, None)
        self.store.set_app_state(app_id, "stopped")
        self.apps_stopping.add(app_id)
        try:
            await self._stop_app(app_id, spec, mode)
        finally:
            self.apps_stopping.discard(app_id)
            event = self.log_events.pop(app_id, None)  # `mctl app logs -f` sees the stop
            if event is not None:
                event.set()

    async def _stop_app(self, app_id: str, spec: AppSpec | None, mode: str | None) -> None:
        if self.tokens is not None:
            self.tokens.revoke_task_tokens(app_id)
        if self.autoscaler is not None:
            await self.autoscaler.stop_app(app_id)
        from mctl.core.server.sandboxes import sandboxes

        await sandboxes(self).stop_app(app_id)
        if mode != "deployed":  # nothing can run its versions again: drop their inline secrets
            from mctl.core import secret_store

            secret_store.forget_app(self.store, app_id)
        if spec is None:
            return
        if any(f.secrets for f in spec.functions.values()):
            from mctl.core.environment import revoke_app

            await asyncio.to_thread(revoke_app, app_id)
        for fspec in spec.functions.values():
            fs = self.functions.get(fspec.function_id)
            if fs is not None:
                self._retire(fs, f"App {spec.name} ({app_id}) was stopped before this input ran.")

    def _reap_later(self, app_id: str) -> None:
        """Stop an ephemeral app whose caller stays away for `ephemeral_grace` seconds."""
        def reap() -> None:
            if (app_id in self.apps and self.app_modes.get(app_id) == "ephemeral"
                    and not self.app_owners.get(app_id)):
                log.info("stopping ephemeral app %s: its caller disconnected", app_id)
                asyncio.get_running_loop().create_task(self.stop_app(app_id))

        asyncio.get_running_loop().call_later(self.ephemeral_grace, reap)

    def function_for(self, app_id: str, tag: str) -> FunctionState | None:
        return self.functions.get(function_id(app_id, tag))

    # --- messages ------------------------------------------------------------------------------
    def handle(self, conn: Conn, header: dict[str, Any], payloads: list[bytes]) -> None:
        kind = header["type"]
        if kind == "outputs":
            self._on_outputs(conn, header, payloads)
        elif kind == "put_inputs":
            self._on_put_inputs(conn, header, payloads)
        elif kind == "subscribe":
            self._on_subscribe(conn, header)
        elif kind == "unsubscribe":
            subs = self.subscribers.get(header["call_id"])
            if subs:
                subs.discard(conn)
            conn.subscriptions.discard(header["call_id"])
        elif kind == "cancel":
            self.cancel_call(header["call_id"])
        elif kind == "draining":  # the worker got SIGTERM: no more inputs; "stop" follows the last
            self.drain(conn)
        elif kind == "hello":
            self._on_hello(conn, header, payloads)
        elif kind in ("exec_output", "exec_exit"):
            session = self.execs.get(header.get("exec_id", ""))
            if session is not None and session.conn is conn:
                session.deliver(header, payloads)
        elif kind == "log":
            if conn.role == "worker":
                self._on_log(conn, header)
        else:
            conn.send({"type": "error", "rid": header.get("rid"),
                       "message": f"unknown message type {kind!r}"})

    def _task_log(self, conn: Conn) -> list[Any]:
        entry = self.task_logs.get(conn.task_id)
        if entry is None:
            fs = self.functions.get(conn.function_id)
            tag = fs.spec.tag if fs is not None else conn.function_id
            entry = self.task_logs[conn.task_id] = [conn.app_id, tag, 0]
            while len(self.task_logs) > 10_000:
                self.task_logs.pop(next(iter(self.task_logs)))
        return entry

    def _on_log(self, conn: Conn, header: dict[str, Any]) -> None:
        """A worker's output lines; `seq` numbers the first, so lines already taken from the
        backend's tail of a process that ended (`worker_gone`) are not added twice."""
        entry = self._task_log(conn)
        app_id, tag, upto = entry
        lines = header["lines"]
        seq = header.get("seq")
        errs = set(header.get("stderr") or ())  # indexes of the lines that came from stderr
        if header.get("dropped"):
            self.append_log(app_id, conn.task_id, tag, f"mctl: {header['dropped']} log lines were "
                                                         "dropped while this worker could not "
                                                         "reach the control plane",
                            stream="stderr")
        skip = 0
        if seq is not None:
            entry[2] = max(upto, seq + len(lines))
            skip = max(0, upto - seq)
        for i, line in enumerate(lines[skip:], skip):
            self.append_log(app_id, conn.task_id, tag, line,
                            stream="stderr" if i in errs else "stdout")
        if seq is not None:  # stored: the worker may read on (it keeps few lines unacknowledged)
            conn.send({"type": "log_ack", "upto": entry[2]})

    def _add_output_tail(self, task_id: str, tail: Any) -> None:
        """The lines of an ended worker's own output (its backend's tail) it never sent."""
        entry = self.task_logs.get(task_id)
        if entry is None:  # it never said hello: the backend's report carries the tail
            return
        app_id, tag, upto = entry
        for number, line, stream in tail.numbered_streams():
            if number >= upto:
                self.append_log(app_id, task_id, tag, line, stream=stream)
                entry[2] = number + 1

    def _on_hello(self, conn: Conn, header: dict[str, Any], payloads: list[bytes]) -> None:
        conn.role = header.get("role", "client")
        if conn.role != "worker":
            # A caller that runs ephemeral apps names them; they live while it is connected.
            for app_id in header.get("apps", ()):
                self.app_owners.setdefault(app_id, set()).add(conn)
                conn.owned_apps.add(app_id)
            if header.get("rid") is not None:
                conn.send({"type": "ack", "rid": header["rid"]})
            return
        conn.task_id = header["task_id"]
        conn.hello_at = time.time()
        conn.function_id = header["function_id"]
        version = int(header.get("version") or 0)
        conn.pool_id = _pool_id(conn.function_id, version)
        fs = self.functions.get(conn.function_id)
        conn.app_id = fs.app_id if fs is not None else ""
        if header.get("start_error") and self.autoscaler is not None:
            # The worker could not import the user's code; it exits after this message.
            self.autoscaler.start_failed(conn.pool_id, conn.task_id, payloads[0],
                                         header["start_error"])
            return
        self._task_log(conn)
        self._resume(conn, set(header.get("held", ())), fs)
        if fs is not None and conn.task_id in fs.awaited:
            fs.awaited.discard(conn.task_id)
            if not fs.awaited:
                log.info("the running workers of %s are back", fs.spec.tag)
        if fs is None:
            conn.send({"type": "stop", "reason": "function not active"})
            return
        current = not fs.stopped and version == fs.version
        if current and self.autoscaler is not None:
            current = self.autoscaler.worker_ready(conn)
        fs.workers.append(conn)
        if not current:
            self.drain(conn)  # an older version's worker: it finishes what it holds and exits
            return
        self._dispatch(fs)

    def _resume(self, conn: Conn, held: set[str], fs: FunctionState | None) -> None:
        """A worker reconnected: it keeps the inputs it still holds; the rest are queued again."""
        old = self.orphans.pop(conn.task_id, None)
        if old is None:
            if held and fs is not None:
                self._claim_held(conn, held, fs)
            return
        log.info("worker %s reconnected; it still holds %d of its %d inputs", conn.task_id,
                 len(held & set(old.running)), len(old.running))
        for rec in old.running.values():
            if rec.done or rec.worker is not old:
                continue
            if rec.input_id in held:
                rec.worker = conn
                conn.running[rec.input_id] = rec
            elif fs is not None:  # never reached the worker: it did not run
                fs.running -= 1
                rec.worker = None
                rec.attempts -= 1
                self._queue(fs, rec, front=True)
        old.running.clear()

    def _claim_held(self, conn: Conn, held: set[str], fs: FunctionState) -> None:
        """A worker of a previous control-plane process reconnected (this one restarted): the
        inputs it still holds were queued again at recovery; leave them with it, not run twice."""
        claimed = 0
        for input_id in held:
            rec = self.live.get(input_id)
            if rec is None or rec.done or not rec.queued or rec.function_id != fs.spec.function_id:
                continue
            fs.pending.remove(rec)
            fs.n_pending -= 1
            rec.queued = False
            rec.worker, rec.started = conn, time.time()
            rec.attempts += 1
            conn.running[input_id] = rec
            fs.running += 1
            claimed += 1
        if claimed:
            log.info("worker %s came back after a restart holding %d inputs; they stay with it",
                     conn.task_id, claimed)

    def expect_workers(self, function_id: str, task_ids: set[str]) -> None:
        """The backend has the pool; `task_ids` are its running workers. After a restart, those
        of the previous process (adopted by the backend) must say hello and reclaim the inputs
        they hold before anything is dispatched, so no input they hold goes to another worker
        too; the reconnect grace bounds the wait (`_restored`)."""
        fs = self.functions.get(function_id)
        if fs is None or not fs.restoring:
            return
        fs.restoring = False
        fs.awaited = set(task_ids) - {c.task_id for c in fs.workers}
        if fs.awaited:
            log.info("waiting up to %gs for %d running workers of %s to reconnect",
                     RECONNECT_GRACE, len(fs.awaited), fs.spec.tag)
        self._dispatch(fs)

    def _restored(self) -> None:
        for fs in self.functions.values():
            if fs.restoring or fs.awaited:
                if fs.awaited:
                    log.info("%d workers of %s did not reconnect", len(fs.awaited), fs.spec.tag)
                fs.restoring = False
                fs.awaited.clear()
                self._dispatch(fs)

    def drain(self, conn: Conn) -> None:
        """Ask a worker to finish what it holds and exit; it gets no new inputs."""
        if not conn.draining:
            conn.draining = True
            conn.send({"type": "stop"})

    def worker_gone(self, task_id: str, exit_code: int | None = None, output: Any = None) -> None:
        """The backend saw the worker's process end: its held inputs will not come back.
        `output` (a `worker_output.OutputTail`): the end of the process's own output; what the
        worker printed but never sent goes to the app's logs before its inputs fail. While its
        connection is still open, log frames it sent before it died may still be on their way:
        the tail waits for the connection's end (at most `TAIL_WAIT_S`), so that it fills in
        exactly the lines that never came, in their place."""
        if exit_code is not None:
            self.exit_codes[task_id] = exit_code
            while len(self.exit_codes) > 1000:
                oldest = next(iter(self.exit_codes))
                del self.exit_codes[oldest]
                self.oom_killed.discard(oldest)
        if output is not None and output.oom:
            self.oom_killed.add(task_id)
        if output is not None and task_id not in self.orphans and any(
                conn.task_id == task_id and not conn.closed
                for fs in self.functions.values() for conn in fs.workers):
            self.exited.append(task_id)  # `disconnected` crashes its inputs, after the tail
            self.pending_tails[task_id] = output
            asyncio.get_running_loop().call_later(TAIL_WAIT_S, self._tail_wait_over, task_id)
            return
        self._gone_now(task_id, output)

    def _tail_wait_over(self, task_id: str) -> None:
        """Its connection stayed open (a node that died takes no TCP reset with it)."""
        output = self.pending_tails.pop(task_id, None)
        if output is not None:
            self._gone_now(task_id, output)

    def _gone_now(self, task_id: str, output: Any) -> None:
        if output is not None:
            self._add_output_tail(task_id, output)
        old = self.orphans.pop(task_id, None)
        if old is not None:
            log.info("worker %s exited while disconnected", task_id)
            self._crash_inputs(old)
            return
        self.exited.append(task_id)  # its connection may close after this report
        for fs in list(self.functions.values()):
            for conn in list(fs.workers):
                if conn.task_id == task_id:
                    # Still connected as far as we know (a node that died takes no TCP reset
                    # with it): the backend's word is final; do not wait for a heartbeat.
                    log.info("worker %s ended but its connection is still open", task_id)
                    fs.workers.remove(conn)
                    conn.closed = True
                    self._crash_inputs(conn)

    def disconnected(self, conn: Conn) -> None:
        conn.closed = True
        for call_id in conn.subscriptions:
            subs = self.subscribers.get(call_id)
            if subs:
                subs.discard(conn)
                if not subs:
                    del self.subscribers[call_id]
        for app_id in conn.owned_apps:
            owners = self.app_owners.get(app_id)
            if owners is not None:
                owners.discard(conn)
                if not owners:
                    self._reap_later(app_id)
        if conn.role != "worker":
            return
        tail = self.pending_tails.pop(conn.task_id, None)
        if tail is not None:  # its process ended and every frame it sent is in: fill in the rest
            self._add_output_tail(conn.task_id, tail)
        fs = self.functions.get(conn.function_id)
        if fs is not None and conn in fs.workers:
            fs.workers.remove(conn)
        if conn.running and conn.task_id in self.exited:  # its process is known to be dead
            self._crash_inputs(conn)
        elif conn.running:
            # It may come back (a dropped connection, not a dead process): hold its inputs.
            log.info("worker %s disconnected holding %d inputs; keeping them for %gs",
                     conn.task_id, len(conn.running), RECONNECT_GRACE)
            self.orphans[conn.task_id] = conn
            asyncio.get_running_loop().call_later(RECONNECT_GRACE, self._orphan_expired, conn)
        if fs is not None:
            self._dispatch(fs)

    def _orphan_expired(self, conn: Conn) -> None:
        if self.orphans.get(conn.task_id) is conn:
            del self.orphans[conn.task_id]
            log.warning("worker %s did not reconnect within %gs", conn.task_id, RECONNECT_GRACE)
            self._crash_inputs(conn)

    def _crash_inputs(self, conn: Conn) -> None:
        """The worker is gone for good: each input it held is a crashed attempt."""
        from mctl.core.serialization import serialize_exception
        from mctl.exception import ContainerCrashedError

        fs = self.functions.get(conn.function_id)
        how = _how_it_ended(self.exit_codes.get(conn.task_id), conn.task_id in self.oom_killed)
        of = f" of {fs.spec.tag}" if fs is not None else ""
        for rec in list(conn.running.values()):
            if rec.done or rec.worker is not conn:
                continue
            message = f"The container ({conn.task_id}) running input {rec.input_id}{of} {how}"
            if self._retry_delay(rec, "crashed", fs) is None:  # its last attempt
                if rec.attempts > 1 and fs is not None:
                    retries = fs.spec.retries.max_retries if fs.spec.retries else 0
                    message += (f"; {fs.spec.tag} failed after {rec.attempts} attempts "
                                f"(retries={retries})")
                message += f".{self._logs_hint(conn.function_id)}"
            else:
                message += "."
            err = serialize_exception(ContainerCrashedError(message))
            self._finish_attempt(rec, "crashed", err, fs)
        conn.running.clear()
        self._schedule_flush()
        if fs is not None:
            self._dispatch(fs)

    def _logs_hint(self, function_id: str) -> str:
        """Where a crashed container's output is: `mctl run` (an ephemeral app) has printed it
        already, above the error; a deployed or detached app's is in its logs."""
        fs = self.functions.get(function_id)
        app_id = fs.app_id if fs is not None else None
        if app_id is None or self.app_modes.get(app_id) not in ("deployed", "detached"):
            return ""
        spec = self.apps.get(app_id)
        name = getattr(spec, "name", None) or app_id
        return f" See its output with `mctl app logs {name}`."

    def _on_put_inputs(self, conn: Conn, header: dict[str, Any], payloads: list[bytes]) -> None:
        fid = header["function_id"]
        fs = self.functions.get(fid)
        if fs is None or fs.stopped:
            conn.send({"type": "error", "rid": header.get("rid"), "code": "not_found",
                       "message": f"Function {fid} is not running; deploy or run its app first."})
            return
        call_id = header["call_id"]
        start = header.get("start", 0)
        blob_flags = header.get("blobs") or ()
        now = time.time()
        store = self.store
        if start == 0:
            store.new_calls.append((call_id, fid, now))
        if header.get("subscribe"):  # .remote and .map skip a separate subscribe round trip
            # Before the inputs: an input of a failing function gets its output right away.
            self.subscribers.setdefault(call_id, set()).add(conn)
            conn.subscriptions.add(call_id)
        for i, payload in enumerate(payloads):
            idx = start + i
            input_id = ids.input_id(call_id, idx)
            if input_id in self.live:
                continue  # a chunk resent after a reconnect
            is_blob = i in blob_flags
            rec = InputRec(input_id, fid, call_id, idx, payload, is_blob, now)
            self.live[input_id] = rec
            store.new_inputs.append((input_id, fid, call_id, idx, payload, int(is_blob), now))
            if fs.failure is not None:  # it cannot start: the input fails at once
                self._store_output(rec, 0, "failure", fs.failure, False, final=True)
            else:
                self._queue(fs, rec)
        self._acks.append((conn, {"type": "ack", "rid": header.get("rid")}))
        if self.metrics is not None:
            self.metrics.inputs_received(fs, len(payloads))
        self._on_pending(fs)
        self._dispatch(fs)
        self._schedule_flush()

    def enqueue_internal(self, fs: FunctionState, payload: bytes) -> str:
        """Create a one-input call from inside the control plane (schedules)."""
        call_id = ids.new_id("call")
        now = time.time()
        rec = InputRec(ids.input_id(call_id, 0), fs.spec.function_id, call_id, 0, payload, False, now)
        self.live[rec.input_id] = rec
        self.store.new_calls.append((call_id, fs.spec.function_id, now))
        self.store.new_inputs.append((rec.input_id, rec.function_id, call_id, 0, payload, 0, now))
        if fs.failure is not None:
            self._store_output(rec, 0, "failure", fs.failure, False, final=True)
        else:
            self._queue(fs, rec)
        self._on_pending(fs)
        self._dispatch(fs)
        self._schedule_flush()
        return call_id

    # --- web requests (server/gateway.py) ------------------------------------------------------
    def enqueue_request(self, fs: FunctionState, payload: bytes,
                        sink: Callable[[str, bytes, bool], None]) -> InputRec:
        """An HTTP request or WebSocket for a web function: queued and dispatched like any input,
        so the autoscaler sees it (and starts a worker for the first one), but not stored: the
        connection that waits for it does not outlive this process. Its outputs go to
        `sink(status, payload, final)` as they arrive, and it is never retried."""
        call_id = ids.new_id("call")
        rec = InputRec(ids.input_id(call_id, 0), fs.spec.function_id, call_id, 0, payload, False,
                       time.time())
        rec.sink = sink
        self.live[rec.input_id] = rec
        if self.metrics is not None:
            self.metrics.inputs_received(fs, 1)
        self._queue(fs, rec)
        self._on_pending(fs)
        self._dispatch(fs)
        return rec

    def send_to_input(self, rec: InputRec, header: dict[str, Any], payloads: list[bytes]) -> None:
        """More of a web request (a body chunk, a WebSocket message) for the worker running it."""
        if rec.done:
            return
        header = {"type": "input_data", "id": rec.input_id, **header}
        if rec.worker is not None:
            rec.worker.send(header, payloads)
        else:
            rec.backlog.append((header, payloads))

    def cancel_request(self, rec: InputRec) -> None:
        """The HTTP client went away: forget the request and tell its worker to stop it."""
        if rec.done:
            return
        rec.done = True
        self.live.pop(rec.input_id, None)
        fs = self.functions.get(rec.function_id)
        if rec.worker is not None:
            rec.worker.running.pop(rec.input_id, None)
            rec.worker.send({"type": "cancel", "input_ids": [rec.input_id]})
            rec.worker = None
            if fs is not None:
                fs.running -= 1
        elif rec.queued and fs is not None:
            fs.n_pending -= 1  # its queue entry is skipped as done

    def _queue(self, fs: FunctionState, rec: InputRec, front: bool = False) -> None:
        if front:
            fs.pending.appendleft(rec)
        else:
            fs.pending.append(rec)
        rec.queued = True
        fs.n_pending += 1

    def _on_pending(self, fs: FunctionState) -> None:
        fs.last_active = time.monotonic()
        if self.autoscaler is not None and fs.n_pending:
            self.autoscaler.poke(fs.spec.function_id)

    def fail_function(self, function_id: str, error: bytes, text: str) -> None:
        """The function cannot start or be placed: fail what waits, and all new inputs, with
        `error` until a new version is deployed. Logged once."""
        fs = self.functions.get(function_id)
        if fs is None or fs.failure is not None:
            return
        fs.failure, fs.failure_text = error, text
        self.append_log(fs.app_id, "start", fs.spec.tag, f"mctl: {text}")
        while fs.pending:
            rec = fs.pending.popleft()
            if rec.done:
                continue
            rec.queued = False
            fs.n_pending -= 1
            self._store_output(rec, 0, "failure", error, False, final=True)
        self._schedule_flush()

    def _on_subscribe(self, conn: Conn, header: dict[str, Any]) -> None:
        call_id = header["call_id"]
        row = self.store.call(call_id)
        if row is None:
            conn.send({"type": "error", "rid": header.get("rid"), "code": "not_found",
                       "message": f"No function call {call_id}; it may have expired."})
            return
        self.subscribers.setdefault(call_id, set()).add(conn)
        conn.subscriptions.add(call_id)
        # Outputs gathered this turn are not in the database yet and were pushed only to earlier
        # subscribers: commit them now so the replay below sees them (else a lost wake-up).
        if self.store.dirty:
            self.store.commit()
        # Replay what is stored; later outputs are pushed as they are committed.
        items: list[dict[str, Any]] = []
        payloads: list[bytes] = []
        size = 0
        for idx, seq, status, payload, is_blob in self.store.outputs_of(call_id):
            items.append({"call_id": call_id, "idx": idx, "seq": seq, "status": status,
                          "blob": bool(is_blob)})
            payloads.append(payload)
            size += len(payload)
            if size > CHUNK_BYTES:
                conn.send({"type": "outputs", "items": items}, payloads)
                items, payloads, size = [], [], 0
        if items:
            conn.send({"type": "outputs", "items": items}, payloads)
        conn.send({"type": "ack", "rid": header.get("rid"), "cancelled": bool(row[1])})

    def cancel_call(self, call_id: str) -> None:
        self.store.cancel_call(call_id)
        for rec in list(self.live.values()):
            if rec.call_id == call_id and not rec.done:
                rec.done = True
                del self.live[rec.input_id]
                fs = self.functions.get(rec.function_id)
                if rec.worker is not None:
                    rec.worker.running.pop(rec.input_id, None)
                    rec.worker.send({"type": "cancel", "input_ids": [rec.input_id]})
                    if fs:
                        fs.running -= 1
                elif fs and rec.queued:
                    fs.n_pending -= 1
        for conn in self.subscribers.get(call_id, ()):
            conn.send({"type": "cancelled", "call_id": call_id})

    # --- dispatch ------------------------------------------------------------------------------
    def _dispatch(self, fs: FunctionState) -> None:
        if not fs.n_pending or not fs.workers or fs.restoring or fs.awaited:
            return
        limit = fs.prefetch
        cap = fs.spec.container_max_inputs  # Modal's max_inputs: a container's lifetime inputs
        room = [(w, limit - len(w.running) if cap is None
                 else min(limit - len(w.running), cap - w.dispatched))
                for w in fs.workers if not w.draining]
        room = [(w, r) for w, r in room if r > 0]
        if not room:
            return
        share = math.ceil(fs.n_pending / len(room))
        now = time.time()
        for worker, free in room:
            take = min(free, share)
            items: list[dict[str, Any]] = []
            payloads: list[bytes] = []
            size = 0
            backlogged: list[InputRec] = []
            while take and fs.pending:
                rec = fs.pending.popleft()
                if rec.done:
                    continue
                rec.queued = False
                fs.n_pending -= 1
                take -= 1
                rec.worker, rec.started = worker, now
                rec.attempts += 1
                worker.dispatched += 1
                worker.running[rec.input_id] = rec
                fs.running += 1
                item = {"id": rec.input_id, "call_id": rec.call_id, "idx": rec.idx,
                        "blob": rec.is_blob, "attempt": rec.attempts}
                if rec.sink is not None:
                    item["http"] = True
                    if rec.backlog:
                        backlogged.append(rec)
                items.append(item)
                payloads.append(rec.payload)
                size += len(rec.payload)
                if size > CHUNK_BYTES:
                    worker.send({"type": "inputs", "items": items}, payloads)
                    items, payloads, size = [], [], 0
            if items:
                worker.send({"type": "inputs", "items": items}, payloads)
            for rec in backlogged:  # after the input itself, in order
                for header, data in rec.backlog:
                    worker.send(header, data)
                rec.backlog = []
            if not fs.n_pending:
                break

    def _on_outputs(self, conn: Conn, header: dict[str, Any], payloads: list[bytes]) -> None:
        fs = self.functions.get(conn.function_id)
        durations = []
        for item, payload in zip(header["items"], payloads):
            rec = self.live.get(item["id"])
            if rec is None or rec.done:
                conn.running.pop(item["id"], None)
                continue  # already finished elsewhere: the first result stays
            status = item["status"]
            final = item.get("final", True)
            if "dur" in item:
                durations.append(item["dur"])
            if item.get("exiting"):  # a timed-out worker about to exit: no retry goes to it
                self.drain(conn)
            if not final:
                self._store_output(rec, item.get("seq", 0), status, payload, item.get("blob", False),
                                   final=False)
                continue
            self._finish_attempt(rec, status, payload, fs, item.get("seq", 0),
                                 item.get("blob", False))
        if "seq" in header:  # acknowledged once this turn's commit has stored them
            conn.outputs_seq = header["seq"]
            self._output_acks.add(conn)
        if not conn.running:
            conn.idle_since = time.monotonic()
            cap = fs.spec.container_max_inputs if fs is not None else None
            if cap is not None and conn.dispatched >= cap:
                self.drain(conn)  # its inputs are done: it exits, the pool starts another
        if fs is not None:
            if durations:
                avg = sum(durations) / len(durations)
                fs.exec_ewma = avg if fs.exec_ewma is None else 0.7 * fs.exec_ewma + 0.3 * avg
            fs.last_active = time.monotonic()
            self._dispatch(fs)
        self._schedule_flush()

    def _finish_attempt(self, rec: InputRec, status: str, payload: bytes,
                        fs: FunctionState | None, seq: int = 0, is_blob: bool = False) -> None:
        """Record the end of an attempt, wherever the input is now (a worker, the queue, or
        waiting for a retry): retry a failure under the function's policy, else store it."""
        task_id = rec.worker.task_id if rec.worker is not None else ""
        if rec.worker is not None:
            rec.worker.running.pop(rec.input_id, None)
            if fs is not None:
                fs.running -= 1
        elif rec.queued and fs is not None:  # requeued meanwhile (its worker came back late)
            fs.pending.remove(rec)
            fs.n_pending -= 1
            rec.queued = False
        rec.worker = None
        delay = self._retry_delay(rec, status, fs)
        if status in FINAL_FAILURES and fs is not None:
            if status == "timeout" and delay is None and rec.attempts > 1:
                payload, is_blob = self._timed_out_after_retries(rec, fs), False
            self._log_failed_attempt(rec, status, payload, is_blob, fs, task_id, delay)
        if delay is not None:
            assert fs is not None
            log.info("retrying %s (attempt %d) in %.1fs after %s", rec.input_id,
                     rec.attempts + 1, delay, status)
            asyncio.get_running_loop().call_later(delay, self._requeue, fs, rec)
            return
        self._store_output(rec, seq, status, payload, is_blob, final=True)
        if fs is not None and fs.spec.schedule is not None and rec.sink is None:
            fs.last_failure = None if status not in FINAL_FAILURES else {
                "at": time.time(), "call_id": rec.call_id, "status": status,
                "error": _error_line(payload, is_blob)}
        if self.metrics is not None and fs is not None:
            self.metrics.input_finished(fs, status, time.time() - rec.created)

    def _retry_delay(self, rec: InputRec, status: str, fs: FunctionState | None) -> float | None:
        """Seconds until a failed attempt is retried under the function's policy; None when it
        is not (it succeeded, it was the last attempt, a web request, a stopped function)."""
        if status not in FINAL_FAILURES or fs is None or fs.stopped or rec.sink is not None:
            return None
        policy = fs.spec.retries
        if policy is None or rec.attempts > policy.max_retries:
            return None
        return policy.delay(rec.attempts)

    def _timed_out_after_retries(self, rec: InputRec, fs: FunctionState) -> bytes:
        """The caller's error for an input whose last attempt timed out: it names the function
        and the attempts (the worker's own error knows neither)."""
        from mctl.core.serialization import serialize_exception
        from mctl.exception import FunctionTimeoutError

        return serialize_exception(FunctionTimeoutError(
            f"Input {rec.input_id} of {fs.spec.tag} timed out after {fs.spec.timeout:g}s; "
            f"{fs.spec.tag} failed after {rec.attempts} attempts "
            f"(retries={fs.spec.retries.max_retries if fs.spec.retries else 0})."))

    def _log_failed_attempt(self, rec: InputRec, status: str, payload: bytes, is_blob: bool,
                            fs: FunctionState, task_id: str, retry_in: float | None) -> None:
        """A failed attempt in its app's logs, on stderr: one line naming the function, input,
        call and attempt, then the error as its caller sees it (the user's frames only). Done
        here, where every backend's results and crashes arrive, once per attempt. A web
        request's exception is logged by its worker (runtime/web.py); an ephemeral app's last
        failure gets the line without the traceback, which its caller (`mctl run`) prints."""
        if fs.stopped or (rec.sink is not None and status != "crashed"):
            return
        from mctl.core.serialization import describe_error

        what = {"failure": "failed", "timeout": "timed out", "crashed": "crashed"}[status]
        where = f"input {rec.input_id}, call {rec.call_id}"
        policy = fs.spec.retries
        if policy is not None and policy.max_retries and rec.sink is None:
            where += f", attempt {rec.attempts} of {policy.max_retries + 1}"
        if retry_in is not None:
            where += f"; retrying in {retry_in:.1f}s"
        ephemeral_last = retry_in is None and self.app_modes.get(fs.app_id) == "ephemeral"
        log.info("%s %s (%s) in app %s", fs.spec.tag, what, where, fs.app_id)
        lines = [f"mctl: {fs.spec.tag} {what} ({where})" + ("" if ephemeral_last else ":")]
        if not ephemeral_last:
            text = ("(the error is too large to show here; its caller gets it)" if is_blob
                    else describe_error(payload))
            lines += _capped(text.splitlines())
        for line in lines:
            self.append_log(fs.app_id, task_id or "control", fs.spec.tag, line, stream="stderr")

    def _requeue(self, fs: FunctionState, rec: InputRec) -> None:
        if rec.done or fs.stopped or rec.worker is not None or rec.queued:
            return
        if fs.failure is not None:
            self._store_output(rec, 0, "failure", fs.failure, False, final=True)
            return
        self._queue(fs, rec, front=True)
        self._on_pending(fs)
        self._dispatch(fs)

    def _store_output(self, rec: InputRec, seq: int, status: str, payload: bytes, is_blob: bool,
                      final: bool) -> None:
        if rec.sink is not None:  # a web request: straight to its waiting HTTP handler
            if final:
                rec.done = True
                self.live.pop(rec.input_id, None)
            rec.sink(status, payload, final)
            return
        now = time.time()
        self.store.new_outputs.append((rec.call_id, rec.idx, seq, status, payload, int(is_blob), now))
        if final:
            rec.done = True
            self.live.pop(rec.input_id, None)
            self.store.done_inputs.append((rec.input_id,))
        for conn in self.subscribers.get(rec.call_id, ()):
            batch = self._pushes.get(conn)
            if batch is None:
                batch = self._pushes[conn] = ([], [])
            batch[0].append({"call_id": rec.call_id, "idx": rec.idx, "seq": seq, "status": status,
                             "blob": is_blob})
            batch[1].append(payload)
        self._schedule_flush()

    # --- group commit --------------------------------------------------------------------------
    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.store.dirty:
            self.store.commit()
        acks, self._acks = self._acks, []
        for conn, msg in acks:
            conn.send(msg)
        workers, self._output_acks = self._output_acks, set()
        for conn in workers:  # outputs are stored: the worker may forget them
            conn.send({"type": "outputs_ack", "upto": conn.outputs_seq})
        pushes, self._pushes = self._pushes, {}
        for conn, (items, payloads) in pushes.items():
            conn.send({"type": "outputs", "items": items}, payloads)

    # --- logs ----------------------------------------------------------------------------------
    def append_log(self, app_id: str, task_id: str, function: str, line: str,
                   stream: str = "stdout") -> None:
        """One line of an app's logs; `stream`: "stdout" or "stderr" (where the client prints
        it)."""
        self.store.new_logs.append((app_id, time.time(), task_id, function, line, stream))
        if self.log_sink is not None:
            self.log_sink(app_id, task_id, function, line, stream)
        event = self.log_events.pop(app_id, None)
        if event is not None:
            asyncio.get_running_loop().call_soon(event.set)
        self._schedule_flush()

    async def wait_logs(self, app_id: str, timeout: float) -> None:
        event = self.log_events.setdefault(app_id, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass


def _how_it_ended(code: int | None, oom: bool = False) -> str:
    """`exited with code 3 before it finished`, `was killed by signal 9 (SIGKILL) before it
    finished`, or the unknown case; `oom`: the backend knows the kernel's OOM killer did it.
    A SIGKILL the backend cannot explain gets no guess (it may be a user's `kill -9`)."""
    if oom:
        signal_9 = "by signal 9 (SIGKILL) " if code == -9 else ""
        return (f"was killed {signal_9}before it finished — out of memory (the kernel's "
                "OOM killer ended it); give the function more `memory=`")
    if code is None:
        return "crashed or was killed before it finished"
    if code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown"
        return f"was killed by signal {-code} ({name}) before it finished"
    return f"exited with code {code} before it finished"


def _error_line(payload: bytes, is_blob: bool) -> str:
    """The last line of an error's text (`ValueError: scheduled failure`)."""
    from mctl.core.serialization import describe_error

    if is_blob:
        return "(a large error; see the app's logs)"
    lines = describe_error(payload).splitlines()
    return lines[-1] if lines else ""


def _capped(lines: list[str], keep: int = 200) -> list[str]:
    """At most `keep` lines of a traceback: its start and its end (the error itself)."""
    if len(lines) <= keep:
        return lines
    head, tail = keep // 4, keep - keep // 4
    return [*lines[:head], f"  ... {len(lines) - head - tail} lines left out ...",
            *lines[-tail:]]


def _pool_id(function_id: str, version: int) -> str:
    from mctl.core.launch import pool_id

    return pool_id(function_id, version)


def deployed_app_id(name: str) -> str:
    import hashlib

    return "ap-" + hashlib.sha256(f"deployed/{name}".encode()).hexdigest()[:22]
