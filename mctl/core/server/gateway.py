"""The web gateway: HTTP and WebSocket traffic to web functions, through their workers.

Routing. By path (always): `/web/<app>/<endpoint>/<rest>` reaches the endpoint with path
`/<rest>` (ASGI `root_path` is the prefix). By host (when the operator sets `MCTL_WEB_DOMAIN`,
or `web_domain` in server.toml): `<app>--<endpoint>.<domain>/<rest>`. `<app>` is a deployed app's
name, or `<name>-dev` for an ephemeral app (`mctl run`, `mctl serve`; the newest wins);
`<endpoint>` is the decorator's `label`, else the function's name, else `<Class>-<method>`.

Each request is one input of the function (`ControlPlane.enqueue_request`): queued like any
other, so the autoscaler starts a worker for the first request. The input's payload is the
request head (JSON) and its body when small; a larger or streamed body and a WebSocket's messages
follow as `input_data` frames to the worker that took the input. The worker answers with output
items (see `core/runtime/web.py`): a response head, body chunks, WebSocket messages, then a final
item; they reach this handler without touching the store.

Web endpoints are public unless declared with `requires_proxy_auth=True`: then a request needs
`Modal-Key` (token id) and `Modal-Secret` (the token) of a `proxy`-scope token.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from mctl.core import protocol

if TYPE_CHECKING:
    from mctl.core.server.control import ControlPlane, InputRec
    from mctl.core.spec import WebSpec

log = logging.getLogger("mctl.gateway")

PREFIX = "/web/"
INLINE_BODY = 1 << 20    # request bodies up to this travel inside the input
CHUNK = 256 * 1024       # streamed request bodies go in chunks of this
# Waiting for a worker (a cold start) is not the function's time: this much is added to its
# timeout before the gateway gives up on a request.
QUEUE_GRACE = float(os.environ.get("MCTL_WEB_QUEUE_GRACE", "60"))
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailers", "transfer-encoding", "upgrade", "host", "modal-key", "modal-secret"}
PROXY_AUTH_REFUSED = ("Unauthorized: this endpoint requires proxy auth. Send the Modal-Key (token "
                      "id) and Modal-Secret (token) headers of a token made with `mctl token create "
                      "--scope proxy`.\n")


@dataclass(frozen=True)
class Endpoint:
    app_id: str
    app_slug: str
    name: str
    function_id: str
    method: str | None   # the class method, for a class's endpoint
    web: WebSpec


def web_domain() -> str:
    return os.environ.get("MCTL_WEB_DOMAIN", "").strip().lstrip("*.").lower()


class Routes:
    """Endpoints by (app slug, endpoint name), rebuilt when the running apps change."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control
        self._key: tuple[Any, ...] = ()
        self._table: dict[tuple[str, str], Endpoint] = {}

    def table(self) -> dict[tuple[str, str], Endpoint]:
        control = self.control
        key = tuple((app_id, id(spec)) for app_id, spec in control.apps.items())
        if key != self._key:
            self._table = self._build()
            self._key = key
        return self._table

    def _build(self) -> dict[tuple[str, str], Endpoint]:
        control = self.control
        table: dict[tuple[str, str], Endpoint] = {}
        for app_id, spec in control.apps.items():
            mode = control.app_modes.get(app_id)
            slug = spec.name if mode == "deployed" else f"{spec.name}-dev"
            for fspec in spec.functions.values():
                if fspec.web is not None:
                    name = fspec.web.label or fspec.tag
                    table[(slug.lower(), name.lower())] = Endpoint(
                        app_id, slug, name, fspec.function_id, None, fspec.web)
                for mname, mspec in fspec.methods.items():
                    if mspec.web is not None:
                        name = mspec.web.label or f"{fspec.tag}-{mname}"
                        table[(slug.lower(), name.lower())] = Endpoint(
                            app_id, slug, name, fspec.function_id, mname, mspec.web)
        return table

    def find(self, slug: str, name: str) -> Endpoint | None:
        return self.table().get((slug.lower(), name.lower()))

    def url(self, endpoint: Endpoint, origin: str) -> str:
        domain = web_domain()
        if domain:
            scheme = origin.split("://", 1)[0]
            return f"{scheme}://{endpoint.app_slug}--{endpoint.name}.{domain}".lower()
        return f"{origin}{PREFIX}{endpoint.app_slug}/{endpoint.name}"


ROUTES = web.AppKey("web_routes", Routes)


# --- request handling ------------------------------------------------------------------------------
async def by_path(request: web.Request) -> web.StreamResponse:
    routes = request.app[ROUTES]
    slug, name = request.match_info["app"], request.match_info["endpoint"]
    endpoint = routes.find(slug, name)
    if endpoint is None:
        return _not_found(routes, slug, name)
    tail = request.match_info.get("tail", "")
    return await serve(request, endpoint, "/" + tail.lstrip("/"),
                       f"{PREFIX}{slug}/{name}")


@web.middleware
async def by_host(request: web.Request, handler: Any) -> web.StreamResponse:
    """With a wildcard web domain, `<app>--<endpoint>.<domain>` is a web endpoint, any path."""
    domain = web_domain()
    if domain:
        host = request.host.split(":", 1)[0].lower()
        if host.endswith("." + domain.split(":", 1)[0]):
            label = host[: -len(domain.split(":", 1)[0]) - 1]
            slug, sep, name = label.partition("--")
            if sep:
                endpoint = request.app[ROUTES].find(slug, name)
                if endpoint is None:
                    return _not_found(request.app[ROUTES], slug, name)
                return await serve(request, endpoint, request.path, "")
    return await handler(request)


def _not_found(routes: Routes, slug: str, name: str) -> web.Response:
    """404: no such endpoint; an app of that URL that has stopped says so, and what to do."""
    deployed = not slug.lower().endswith("-dev")
    app_name = slug if deployed else slug[:-len("-dev")]
    stopped = [a for a in routes.control.store.apps()
               if a["name"].lower() == app_name.lower() and a["state"] != "running"
               and (a["mode"] == "deployed") == deployed]
    if stopped:
        app = stopped[-1]
        again = ("`mctl deploy` it again (or `mctl app rollback`)" if deployed else
                 "run it again (`mctl serve` or `mctl run --detach`)")
        return web.Response(status=404, text=f"App {app['name']!r} ({app['app_id']}) is stopped, "
                                             f"so its web endpoint {name!r} does not answer; "
                                             f"{again}.\n")
    return web.Response(status=404, text=f"No web endpoint {name!r} in app {slug!r}; check the "
                                         "URL that `mctl deploy` or `mctl serve` printed.\n")


def _proxy_auth_ok(request: web.Request, control: ControlPlane) -> bool:
    key, secret = request.headers.get("Modal-Key"), request.headers.get("Modal-Secret")
    if not key or not secret:
        return False
    principal = control.tokens.verify(secret)
    return principal is not None and principal.scope == "proxy" and principal.token_id == key


async def serve(request: web.Request, endpoint: Endpoint, path: str, root_path: str
                ) -> web.StreamResponse:
    from mctl.core.server.http import CONTROL

    control: ControlPlane = request.app[CONTROL]
    fs = control.functions.get(endpoint.function_id)
    if fs is None or fs.stopped:
        return web.Response(status=404, text="This web endpoint's app is not running.\n")
    if endpoint.web.requires_proxy_auth and not _proxy_auth_ok(request, control):
        return web.Response(status=401, text=PROXY_AUTH_REFUSED)
    if fs.failure is not None:
        return web.Response(status=503, text=f"This web endpoint cannot start: "
                                             f"{fs.failure_text}\n")
    is_ws = request.headers.get("Upgrade", "").lower() == "websocket"
    head = {
        "type": "websocket" if is_ws else "http", "method": request.method, "path": path,
        "raw_path": request.raw_path.split("?", 1)[0], "query_string": request.query_string,
        "root_path": root_path, "scheme": request.scheme, "client": request.remote or "",
        "server": request.host, "endpoint_method": endpoint.method,
        "headers": [[k.lower(), v] for k, v in request.headers.items()
                    if k.lower() not in HOP_BY_HOP or (is_ws and k.lower() == "host")],
    }
    body, more = b"", False
    if not is_ws and request.body_exists:
        length = request.content_length
        if length is not None and length <= INLINE_BODY:
            body = await request.read()
        else:
            more = True
    head["more_body"] = more
    replies: asyncio.Queue[tuple[str, bytes, bool]] = asyncio.Queue()
    rec = control.enqueue_request(fs, protocol.encode(head, [body]),
                                  lambda *reply: replies.put_nowait(reply))
    deadline = asyncio.get_running_loop().time() + fs.spec.timeout + QUEUE_GRACE
    pump = None
    try:
        if is_ws:
            return await _websocket(request, control, rec, replies, deadline)
        if more:
            pump = asyncio.create_task(_pump_body(request, control, rec))
        return await _http(request, replies, deadline)
    finally:
        if pump is not None:
            pump.cancel()
        control.cancel_request(rec)  # nothing if it finished; else the worker stops it


async def _pump_body(request: web.Request, control: ControlPlane, rec: InputRec) -> None:
    async for chunk in request.content.iter_chunked(CHUNK):
        control.send_to_input(rec, {"k": "body"}, [chunk])
    control.send_to_input(rec, {"k": "end"}, [])


async def _next(replies: asyncio.Queue[tuple[str, bytes, bool]], deadline: float
                ) -> tuple[str, bytes, bool] | None:
    remaining = deadline - asyncio.get_running_loop().time()
    try:
        return await asyncio.wait_for(replies.get(), max(remaining, 0.001))
    except asyncio.TimeoutError:
        return None


def _failure(status: str) -> web.Response:
    if status == "timeout":
        return web.Response(status=504, text="The web function timed out.\n")
    if status == "crashed":
        return web.Response(status=502, text="The web function's container stopped before it "
                                             "answered.\n")
    return web.Response(status=500, text="Internal Server Error: the web function raised; its "
                                         "traceback is in the app's logs (`mctl app logs`).\n")


def _headers(raw: list[list[str]]) -> Any:
    from multidict import CIMultiDict

    return CIMultiDict((k, v) for k, v in raw if k.lower() not in HOP_BY_HOP)


async def _http(request: web.Request, replies: asyncio.Queue[tuple[str, bytes, bool]],
                deadline: float) -> web.StreamResponse:
    response: web.StreamResponse | None = None
    while True:
        reply = await _next(replies, deadline)
        if reply is None:
            if response is None:
                return web.Response(status=504, text="The web function did not answer in time.\n")
            request.transport and request.transport.close()  # type: ignore[func-returns-value]
            return response
        status, payload, final = reply
        if status not in ("item", "success"):
            if response is None:
                return _failure(status)
            request.transport and request.transport.close()  # type: ignore[func-returns-value]
            return response
        header, parts = protocol.decode(payload)
        kind = header["k"]
        if kind == "full":  # the whole response in one item: the common case
            headers = _headers(header["headers"])
            headers.popall("content-length", None)
            return web.Response(status=header["status"], headers=headers, body=parts[0])
        if kind == "start":
            response = web.StreamResponse(status=header["status"],
                                          headers=_headers(header["headers"]))
            await response.prepare(request)
        elif kind == "body" and response is not None:
            await response.write(parts[0])
        if final:
            if response is None:
                return web.Response(status=500, text="The web function sent no response.\n")
            await response.write_eof()
            return response


async def _websocket(request: web.Request, control: ControlPlane, rec: InputRec,
                     replies: asyncio.Queue[tuple[str, bytes, bool]], deadline: float
                     ) -> web.StreamResponse:
    # The app accepts (or refuses) before the handshake is answered, as ASGI servers do.
    reply = await _next(replies, deadline)
    if reply is None:
        return web.Response(status=504, text="The web function did not answer in time.\n")
    status, payload, final = reply
    if status not in ("item", "success"):
        return _failure(status)
    header, _ = protocol.decode(payload)
    if header["k"] != "ws_accept":
        return web.Response(status=403, text="The app refused the WebSocket.\n")
    ws = web.WebSocketResponse(protocols=[header["subprotocol"]] if header.get("subprotocol")
                               else (), heartbeat=30)
    await ws.prepare(request)

    async def upstream() -> None:
        code = 1000
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                control.send_to_input(rec, {"k": "ws_text"}, [msg.data.encode()])
            elif msg.type == WSMsgType.BINARY:
                control.send_to_input(rec, {"k": "ws_bytes"}, [msg.data])
        code = ws.close_code or code
        control.send_to_input(rec, {"k": "ws_disconnect", "code": code}, [])
        replies.put_nowait(("client_closed", b"", True))  # stop waiting for the app

    pump = asyncio.create_task(upstream())
    try:
        while True:
            reply = await _next(replies, deadline)
            if reply is None:
                break
            status, payload, final = reply
            if status == "client_closed":
                break
            if status not in ("item", "success"):
                await ws.close(code=1011)
                break
            header, parts = protocol.decode(payload)
            kind = header["k"]
            if kind == "ws_send":
                if header.get("text"):
                    await ws.send_str(parts[0].decode())
                else:
                    await ws.send_bytes(parts[0])
            elif kind == "ws_close":
                await ws.close(code=header.get("code", 1000))
            if final:
                break
    finally:
        if not ws.closed:
            await ws.close()
        pump.cancel()
    return ws


# --- URLs ------------------------------------------------------------------------------------------
async def list_endpoints(request: web.Request) -> web.Response:
    """Web endpoints and their URLs; `?app=` (name or id), `?function_id=`, `?method=` filter."""
    from mctl.core.server.http import CONTROL

    control: ControlPlane = request.app[CONTROL]
    routes = request.app[ROUTES]
    app_ref = request.query.get("app")
    app_id = None
    if app_ref:
        app = control.store.find_app(app_ref)
        app_id = app["app_id"] if app else app_ref
    fid, method = request.query.get("function_id"), request.query.get("method")
    origin = f"{request.scheme}://{request.host}"
    out = []
    for endpoint in routes.table().values():
        if ((app_id and endpoint.app_id != app_id) or (fid and endpoint.function_id != fid)
                or (fid and (method or None) != endpoint.method)):
            continue
        tag = next((f.tag for f in control.apps[endpoint.app_id].functions.values()
                    if f.function_id == endpoint.function_id), "")
        out.append({"app_id": endpoint.app_id, "function_id": endpoint.function_id,
                    "tag": tag, "method": endpoint.method, "name": endpoint.name,
                    "kind": endpoint.web.kind, "url": routes.url(endpoint, origin),
                    "requires_proxy_auth": endpoint.web.requires_proxy_auth})
    return web.json_response(out)


def attach(app: web.Application) -> None:
    """Add the gateway to the control plane's aiohttp app (called by http.make_app)."""
    from mctl.core.server.http import CONTROL, RULES, TASK_ANY

    app[ROUTES] = Routes(app[CONTROL])
    app.middlewares.insert(0, by_host)
    app.router.add_route("*", PREFIX + "{app}/{endpoint}{tail:(/.*)?}", by_path)
    app.router.add_route("GET", "/api/web", list_endpoints)
    # Web endpoints are public (proxy auth is checked per endpoint); listing them needs invoke.
    app[RULES][by_path] = (None, TASK_ANY)
    app[RULES][list_endpoints] = ("invoke", TASK_ANY)
