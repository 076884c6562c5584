"""A worker's side of web functions: each HTTP request or WebSocket is an input whose payload is
the request head (and body); the worker serves it in-process through ASGI and answers with
output items, each an encoded frame `{"k": ...}` + bytes:

    full (status, headers) + body   the whole response, final: the common case
    start (status, headers)         then body chunks, then a final `end`: a streamed response
    ws_accept / ws_send / ws_close  a WebSocket's side, then a final `end`

More of the request arrives as `input_data` frames (`body`, `end`, `ws_text`, `ws_bytes`,
`ws_disconnect`). `@fastapi_endpoint` gets a FastAPI app made around the function; `@asgi_app`
and `@wsgi_app` the user's app; `@web_server` a proxy to the port the user's server listens on.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any

from mctl.core import protocol
from mctl.core.serialization import serialize_exception
from mctl.exception import FunctionTimeoutError, InvalidError

if TYPE_CHECKING:
    from mctl.core.runtime.worker import Worker
    from mctl.core.spec import WebSpec

CHUNK = 192 * 1024  # response body pieces stay under the blob threshold


class WebRunner:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.apps: dict[str | None, Any] = {}     # class method (None: the function) -> ASGI app
        self.states: dict[str | None, dict[str, Any]] = {}  # lifespan state, per app
        self.inboxes: dict[str, asyncio.Queue[tuple[dict[str, Any], bytes]]] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.sem = asyncio.Semaphore(worker.fspec.max_inputs)
        self.lock = asyncio.Lock()
        self.lifespans: list[Any] = []

    # --- from the worker's connection ----------------------------------------------------------
    def accept(self, item: dict[str, Any], payload: bytes) -> None:
        input_id = item["id"]
        self.inboxes[input_id] = asyncio.Queue()
        task = asyncio.get_running_loop().create_task(self._serve(input_id, payload))
        self.tasks[input_id] = task

        def done(_: Any) -> None:
            self.tasks.pop(input_id, None)
            self.inboxes.pop(input_id, None)

        task.add_done_callback(done)

    def deliver(self, header: dict[str, Any], payloads: list[bytes]) -> None:
        inbox = self.inboxes.get(header["id"])
        if inbox is not None:
            inbox.put_nowait((header, payloads[0] if payloads else b""))

    def cancel(self, input_ids: list[str]) -> None:
        for input_id in input_ids:  # the HTTP client went away
            self.worker.attempts.pop(input_id, None)
            task = self.tasks.get(input_id)
            if task is not None:
                task.cancel()

    # --- serving -------------------------------------------------------------------------------
    async def _serve(self, input_id: str, payload: bytes) -> None:
        async with self.sem:
            self.worker._started()
            try:
                await self._serve_one(input_id, payload)
            finally:  # the volumes' automatic commit follows the response here
                error = await asyncio.to_thread(self.worker._autocommit)
                if error is not None:
                    print(f"mctl: committing volumes after web request {input_id} failed",
                          file=sys.stderr, flush=True)

    async def _serve_one(self, input_id: str, payload: bytes) -> None:
        head, parts = protocol.decode(payload)
        reply = Responder(self.worker, input_id, head["type"])
        try:
            app = await self._app(head.get("endpoint_method"))
        except BaseException as exc:  # noqa: BLE001 - the user's code may raise anything
            traceback.print_exc()
            reply.failed(exc)
            return
        scope = _scope(head, self.states.get(head.get("endpoint_method"), {}))
        receive = Receiver(head, parts[0] if parts else b"", self.inboxes[input_id])
        try:
            await asyncio.wait_for(app(scope, receive, reply.send), self.worker.fspec.timeout)
        except asyncio.TimeoutError:
            print(f"mctl: web request {input_id} timed out after "
                  f"{self.worker.fspec.timeout:g}s", file=sys.stderr, flush=True)
            reply.timed_out()
        except asyncio.CancelledError:
            return
        except BaseException as exc:  # noqa: BLE001
            traceback.print_exc()
            reply.failed(exc)
        else:
            reply.finish()

    async def _app(self, method: str | None) -> Any:
        app = self.apps.get(method)
        if app is not None:
            return app
        async with self.lock:
            if method not in self.apps:
                self.apps[method] = await self._build(method)
        return self.apps[method]

    async def _build(self, method: str | None) -> Any:
        worker = self.worker
        fspec = worker.fspec
        if method is None:
            fn, web = worker.raw, fspec.web
        else:
            obj = await asyncio.to_thread(worker._instance, {})
            fn, web = getattr(obj, method), fspec.methods[method].web
        assert web is not None
        if web.kind == "fastapi":
            app = _fastapi_app(fn, web)
        elif web.kind == "asgi":
            app = await _call_user(fn)
        elif web.kind == "wsgi":
            return WsgiAdapter(await _call_user(fn))
        else:
            await _call_user(fn)
            await _wait_for_port(web)
            return PortProxy(web.port)  # type: ignore[arg-type]
        self.states[method] = await self._lifespan(app)
        return app

    async def _lifespan(self, app: Any) -> dict[str, Any]:
        """Run the app's lifespan startup (FastAPI's startup events and lifespan); an app that
        does not speak lifespan is served without it, as uvicorn does by default."""
        state: dict[str, Any] = {}
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        inbox.put_nowait({"type": "lifespan.startup"})
        started: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        async def send(message: dict[str, Any]) -> None:
            if message["type"].startswith("lifespan.startup") and not started.done():
                started.set_result(message)

        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"},
                 "state": state}
        task = asyncio.get_running_loop().create_task(app(scope, inbox.get, send))
        await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
        if started.done():
            message = started.result()
            if message["type"] == "lifespan.startup.failed":
                raise RuntimeError(f"The app's startup failed: {message.get('message', '')}")
            self.lifespans.append((task, inbox))
        return state


async def _call_user(fn: Any) -> Any:
    if inspect.iscoroutinefunction(fn):
        return await fn()
    result = await asyncio.to_thread(fn)
    return await result if inspect.isawaitable(result) else result


def _fastapi_app(fn: Any, web: WebSpec) -> Any:
    try:
        from fastapi import FastAPI
        from fastapi.middleware.cors import CORSMiddleware
    except ImportError:
        raise InvalidError("@fastapi_endpoint needs FastAPI in the function's image; install it "
                           "with `pip install 'mctl[web]'`.") from None
    api = FastAPI(docs_url="/docs" if web.docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if web.docs else None)
    api.add_api_route("/", fn, methods=[web.method])
    api.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"],
                       allow_headers=["*"])
    return api


async def _wait_for_port(web: WebSpec) -> None:
    deadline = time.monotonic() + web.startup_timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", web.port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise InvalidError(f"The @web_server did not accept connections on port "
                                   f"{web.port} within {web.startup_timeout:g}s; start the "
                                   "server in the function (e.g. subprocess.Popen) or raise "
                                   "startup_timeout.") from None
            await asyncio.sleep(0.05)


def _scope(head: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    host, _, port = head["server"].partition(":")
    scope = {
        "type": head["type"], "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1", "scheme": head["scheme"], "path": head["path"],
        "raw_path": head["path"].encode(), "query_string": head["query_string"].encode(),
        "root_path": head["root_path"],
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in head["headers"]],
        "client": (head["client"], 0), "server": (host, int(port) if port.isdigit() else 80),
        "state": dict(state),
    }
    if head["type"] == "http":
        scope["method"] = head["method"]
    else:
        scope["scheme"] = "wss" if head["scheme"] == "https" else "ws"
        protocols = next((v for k, v in head["headers"] if k == "sec-websocket-protocol"), "")
        scope["subprotocols"] = [p.strip() for p in protocols.split(",") if p.strip()]
    return scope


class Receiver:
    """ASGI `receive`: the body that came with the input, then what arrives as input_data."""

    def __init__(self, head: dict[str, Any], body: bytes,
                 inbox: asyncio.Queue[tuple[dict[str, Any], bytes]]) -> None:
        self.kind = head["type"]
        self.first: dict[str, Any] | None = (
            {"type": "http.request", "body": body, "more_body": head.get("more_body", False)}
            if self.kind == "http" else {"type": "websocket.connect"})
        self.more = head.get("more_body", False)
        self.inbox = inbox

    async def __call__(self) -> dict[str, Any]:
        if self.first is not None:
            message, self.first = self.first, None
            return message
        if self.kind == "http" and not self.more:
            await asyncio.Event().wait()  # no more body: only a disconnect (a cancel) follows
        header, data = await self.inbox.get()
        kind = header["k"]
        if kind == "body":
            return {"type": "http.request", "body": data, "more_body": True}
        if kind == "end":
            self.more = False
            return {"type": "http.request", "body": b"", "more_body": False}
        if kind == "ws_text":
            return {"type": "websocket.receive", "text": data.decode()}
        if kind == "ws_bytes":
            return {"type": "websocket.receive", "bytes": data}
        return {"type": "websocket.disconnect", "code": header.get("code", 1000)}


class Responder:
    """ASGI `send`: turns the app's messages into output items of the input."""

    def __init__(self, worker: Worker, input_id: str, kind: str) -> None:
        self.worker, self.input_id, self.kind = worker, input_id, kind
        self.start = time.monotonic()
        self.head: dict[str, Any] | None = None
        self.head_sent = False
        self.done = False
        self.seq = 0

    def _emit(self, header: dict[str, Any], data: bytes = b"", final: bool = False,
              status: str = "item") -> None:
        if self.done:
            return
        if final:
            self.done = True
            status = "success" if status == "item" else status
        self.worker._emit(self.input_id, status, protocol.encode(header, [data]), self.seq,
                          final=final, dur=time.monotonic() - self.start if final else None)
        self.seq += 1

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.head = {"status": message["status"],
                         "headers": [[k.decode("latin-1"), v.decode("latin-1")]
                                     for k, v in message.get("headers", ())]}
        elif kind == "http.response.body":
            body, more = message.get("body", b""), message.get("more_body", False)
            if not self.head_sent and not more and len(body) <= CHUNK:
                self._emit({"k": "full", **(self.head or {"status": 200, "headers": []})}, body,
                           final=True)
                return
            if not self.head_sent:
                self._emit({"k": "start", **(self.head or {"status": 200, "headers": []})})
                self.head_sent = True
            for i in range(0, len(body), CHUNK):
                self._emit({"k": "body"}, body[i:i + CHUNK])
            if not more:
                self._emit({"k": "end"}, final=True)
        elif kind == "websocket.accept":
            self._emit({"k": "ws_accept", "subprotocol": message.get("subprotocol")})
        elif kind == "websocket.send":
            if message.get("text") is not None:
                self._emit({"k": "ws_send", "text": True}, message["text"].encode())
            else:
                self._emit({"k": "ws_send"}, message.get("bytes") or b"")
        elif kind == "websocket.close":
            self._emit({"k": "ws_close", "code": message.get("code", 1000)})
        await asyncio.sleep(0)  # let the outputs go out between a streaming app's sends

    def finish(self) -> None:
        if self.kind == "http" and not self.head_sent:
            self.failed(RuntimeError("The web app returned without sending a response."))
        else:
            self._emit({"k": "end"}, final=True)

    def failed(self, exc: BaseException) -> None:
        if self.head_sent or self.kind != "http":
            self._emit({"k": "end"}, final=True)  # mid-response: the gateway cuts it short
        elif not self.done:
            self.done = True
            self.worker._emit(self.input_id, "failure", serialize_exception(exc), self.seq,
                              dur=time.monotonic() - self.start)

    def timed_out(self) -> None:
        if self.head_sent or self.kind != "http":
            self._emit({"k": "end"}, final=True)
        elif not self.done:
            self.done = True
            self.worker._emit(self.input_id, "timeout", serialize_exception(FunctionTimeoutError(
                f"Web request {self.input_id} timed out after {self.worker.fspec.timeout:g}s.")),
                self.seq)


class WsgiAdapter:
    """Serve a WSGI app from ASGI: the app runs on a thread; its chunks stream back."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return  # no lifespan, no WebSocket in WSGI
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def put(item: tuple[str, Any]) -> None:
            loop.call_soon_threadsafe(out.put_nowait, item)

        def run() -> None:
            head: dict[str, Any] = {}

            def start_response(status: str, headers: list[tuple[str, str]],
                               exc_info: Any = None) -> Any:
                head["value"] = (status, headers)
                return lambda data: put(("chunk", data))

            try:
                result = self.app(_environ(scope, bytes(body)), start_response)
                try:
                    for chunk in result:
                        if "sent" not in head:
                            put(("start", head["value"]))
                            head["sent"] = True
                        if chunk:
                            put(("chunk", chunk))
                finally:
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()
                if "sent" not in head:
                    put(("start", head["value"]))
                put(("end", None))
            except BaseException as exc:  # noqa: BLE001
                put(("error", exc))

        loop.run_in_executor(None, run)
        while True:
            kind, value = await out.get()
            if kind == "start":
                status, headers = value
                await send({"type": "http.response.start", "status": int(status.split()[0]),
                            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1"))
                                        for k, v in headers]})
            elif kind == "chunk":
                await send({"type": "http.response.body", "body": value, "more_body": True})
            elif kind == "end":
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            else:
                raise value


def _environ(scope: dict[str, Any], body: bytes) -> dict[str, Any]:
    host, port = scope["server"]
    environ = {
        "REQUEST_METHOD": scope["method"], "SCRIPT_NAME": scope["root_path"],
        "PATH_INFO": scope["path"], "QUERY_STRING": scope["query_string"].decode("latin-1"),
        "SERVER_NAME": host, "SERVER_PORT": str(port), "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": scope["client"][0], "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope["scheme"], "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": True,
        "wsgi.run_once": False, "CONTENT_LENGTH": str(len(body)),
    }
    for raw_key, raw_value in scope["headers"]:
        key, value = raw_key.decode("latin-1"), raw_value.decode("latin-1")
        if key == "content-type":
            environ["CONTENT_TYPE"] = value
        elif key != "content-length":
            name = "HTTP_" + key.upper().replace("-", "_")
            environ[name] = f"{environ[name]},{value}" if name in environ else value
    return environ


class PortProxy:
    """`@web_server`: forward each request to the user's server on localhost:`port`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.session: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        import aiohttp

        if scope["type"] != "http":
            return
        if self.session is None:
            self.session = aiohttp.ClientSession(auto_decompress=False)
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        query = scope["query_string"].decode("latin-1")
        url = f"http://127.0.0.1:{self.port}{scope['path']}" + (f"?{query}" if query else "")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        async with self.session.request(scope["method"], url, headers=headers, data=bytes(body),
                                        allow_redirects=False) as resp:
            await send({"type": "http.response.start", "status": resp.status,
                        "headers": [(k.lower(), v) for k, v in resp.raw_headers]})
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
