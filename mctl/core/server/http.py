"""The control plane's HTTP face (aiohttp): the WebSocket data plane, a JSON admin API, blobs,
/metrics. `start_server` wires store, control plane, scheduler and schedules together."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from aiohttp import WSMsgType, web

from mctl.core import protocol
from mctl.core.server.control import Conn, ControlPlane
from mctl.core.server.store import Store
from mctl.core.spec import AppSpec
from mctl.exception import Error, NotFoundError

log = logging.getLogger("mctl.server")

CONTROL = web.AppKey("control", ControlPlane)


def _control(request: web.Request) -> ControlPlane:
    return request.app[CONTROL]


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def ws_handler(request: web.Request) -> web.WebSocketResponse:
    control = _control(request)
    ws = web.WebSocketResponse(max_msg_size=protocol.MAX_FRAME, heartbeat=30)
    await ws.prepare(request)
    conn = Conn(ws.send_bytes, request.remote or "")
    try:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                header, payloads = protocol.decode(msg.data)
                try:
                    control.handle(conn, header, payloads)
                except Exception as exc:  # a bad message must not take the connection down
                    log.exception("error handling %s", header.get("type"))
                    conn.send({"type": "error", "rid": header.get("rid"), "message": str(exc)})
    finally:
        control.disconnected(conn)
    return ws


def _find_app(control: ControlPlane, name: str) -> dict[str, Any]:
    app = control.store.find_app(name)
    if app is None:
        raise NotFoundError(f"No app named {name!r}; `mctl app list` shows the deployed apps.")
    return app


async def create_app(request: web.Request) -> web.Response:
    from mctl.core import secret_store
    from mctl.core.environment import check_app

    control = _control(request)
    body = await request.json()
    try:
        spec = AppSpec.model_validate(body["spec"])
    except ValueError as exc:
        return _json_error(400, f"Invalid app spec: {exc}")
    secret_store.refuse_values_in_spec(spec)
    # Inline secret values go to the secret backend first; only references reach the database.
    created = secret_store.store_inline(spec, body.get("secrets") or {})
    try:
        check_app(spec)
        app_id, version = await control.create_app(spec, body.get("mode", "ephemeral"),
                                                   body.get("app_id"))
    except BaseException:
        secret_store.forget(created)
        raise
    return web.json_response({"app_id": app_id, "version": version})


async def list_apps(request: web.Request) -> web.Response:
    control = _control(request)
    apps = control.store.apps()
    if request.query.get("all") != "1":
        apps = [a for a in apps if a["mode"] == "deployed" or a["state"] == "running"]
    failing: dict[str, dict[str, str]] = {}
    for fs in control.functions.values():
        if fs.failure is not None:
            failing.setdefault(fs.app_id, {})[fs.spec.tag] = fs.failure_text
    for app in apps:
        app["failing"] = failing.get(app["app_id"], {})
    return web.json_response(apps)


async def get_app(request: web.Request) -> web.Response:
    control = _control(request)
    name = request.match_info["name"]
    app = control.store.find_app(name)
    if app is None:
        return _json_error(404, f"No app named {name!r}.")
    version = int(request.query.get("version", app["version"]))
    return web.json_response({**app, "spec": control.store.version_spec(app["app_id"], version)})


async def stop_app(request: web.Request) -> web.Response:
    control = _control(request)
    app = _find_app(control, request.match_info["name"])
    await control.stop_app(app["app_id"])
    return web.json_response({"app_id": app["app_id"], "state": "stopped"})


async def app_history(request: web.Request) -> web.Response:
    control = _control(request)
    app = _find_app(control, request.match_info["name"])
    return web.json_response({"app": app, "versions": control.store.versions(app["app_id"])})


async def rollback_app(request: web.Request) -> web.Response:
    control = _control(request)
    app = _find_app(control, request.match_info["name"])
    body = await request.json() if request.can_read_body else {}
    target = body.get("version")
    current = app["version"]
    if target is None:
        target = current - 1
    target = int(target)
    if not 1 <= target <= current:
        return _json_error(400, f"App {app['name']} has versions 1 to {current}; there is no "
                                f"version {target} to roll back to.")
    spec = control.store.version_spec(app["app_id"], target)
    if spec is None:
        return _json_error(404, f"App {app['name']} has no version {target}.")
    _, version = await control.create_app(AppSpec.model_validate(spec), app["mode"],
                                          app["app_id"], note=f"rollback to v{target}")
    return web.json_response({"app_id": app["app_id"], "version": version, "from": target})


async def app_logs(request: web.Request) -> web.Response:
    control = _control(request)
    app = _find_app(control, request.match_info["name"])
    after = int(request.query.get("after", 0))
    wait = min(float(request.query.get("wait", 0)), 60.0)
    rows = control.store.logs(app["app_id"], after)
    if not rows and wait:
        await control.wait_logs(app["app_id"], wait)
        rows = control.store.logs(app["app_id"], after)
    return web.json_response([
        {"id": r[0], "ts": r[1], "task_id": r[2], "function": r[3], "line": r[4]} for r in rows])


async def lookup_function(request: web.Request) -> web.Response:
    control = _control(request)
    app_name, tag = request.query["app"], request.query["name"]
    app = control.store.find_app(app_name)
    if app is None or app["state"] != "running":
        return _json_error(404, f"No running app named {app_name!r}; deploy it with `mctl deploy`.")
    spec = control.store.version_spec(app["app_id"], app["version"]) or {}
    fspec = spec.get("functions", {}).get(tag)
    if fspec is None:
        return _json_error(404, f"App {app_name!r} has no function or class {tag!r}; it has "
                                f"{', '.join(spec.get('functions', {})) or 'none'}.")
    return web.json_response({"app_id": app["app_id"], "function": fspec})


async def function_secrets(request: web.Request) -> web.Response:
    """A worker's secret values, fetched at its start: they never travel in a launch
    description, a job spec or the database."""
    from mctl.core.environment import resolve_secrets

    control = _control(request)
    fs = control.functions.get(request.match_info["function_id"])
    if fs is None:
        return _json_error(404, "No such running function.")
    return web.json_response({"env": await asyncio.to_thread(resolve_secrets, fs.spec)})


async def put_blob(request: web.Request) -> web.Response:
    store = _control(request).store
    blob_id = request.match_info["blob_id"]
    if store.refresh_blob(blob_id):  # already here: the upload counts as a fresh use
        return web.json_response({"blob_id": blob_id})
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=store.blob_dir, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as fh:
            async for chunk in request.content.iter_chunked(1 << 20):
                digest.update(chunk)
                fh.write(chunk)
        if blob_id != protocol.blob_id_from_hex(digest.hexdigest()):
            return _json_error(400, f"Blob content does not match its id {blob_id}.")
        store.put_blob_file(blob_id, Path(tmp))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return web.json_response({"blob_id": blob_id})


async def get_blob(request: web.Request) -> web.StreamResponse:
    path = _control(request).store.blob_path(request.match_info["blob_id"])
    if not path.exists():
        return _json_error(404, "No such blob.")
    return web.FileResponse(path)


async def metrics(request: web.Request) -> web.Response:
    body, content_type = _control(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def health(request: web.Request) -> web.Response:
    control = _control(request)
    return web.json_response({"ok": True, "started": control.started, "pid": os.getpid()})


@web.middleware
async def user_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """mctl errors become JSON: 404 for what does not exist, 400 for the rest."""
    try:
        return await handler(request)
    except NotFoundError as exc:
        return _json_error(404, str(exc))
    except Error as exc:
        return _json_error(400, str(exc))


def make_app(control: ControlPlane) -> web.Application:
    app = web.Application(client_max_size=protocol.MAX_FRAME, middlewares=[user_errors])
    app[CONTROL] = control
    app.add_routes([
        web.get("/ws", ws_handler),
        web.get("/healthz", health),
        web.get("/metrics", metrics),
        web.post("/api/apps", create_app),
        web.get("/api/apps", list_apps),
        web.get("/api/apps/{name}", get_app),
        web.post("/api/apps/{name}/stop", stop_app),
        web.get("/api/apps/{name}/history", app_history),
        web.post("/api/apps/{name}/rollback", rollback_app),
        web.get("/api/apps/{name}/logs", app_logs),
        web.get("/api/functions/lookup", lookup_function),
        web.get("/api/functions/{function_id}/secrets", function_secrets),
        web.put("/blobs/{blob_id}", put_blob),
        web.get("/blobs/{blob_id}", get_blob),
    ])
    return app


@dataclass
class RunningServer:
    url: str
    control: ControlPlane
    runner: web.AppRunner
    stop_background: Callable[[], Any]  # cancels schedules and retention

    async def close(self) -> None:
        self.stop_background()
        if self.control.autoscaler is not None:
            await self.control.autoscaler.shutdown()
        await self.runner.cleanup()
        if self.control.store.dirty:
            self.control.store.commit()
        self.control.store.close()


async def start_server(state_dir: Path, host: str = "127.0.0.1", port: int = 0,
                       scheduler_name: str | None = None,
                       log_sink: Callable[[str, str, str, str], None] | None = None,
                       advertise_url: str | None = None,
                       scheduler_options: dict[str, str] | None = None) -> RunningServer:
    """Open the store, start the HTTP server and the scheduler, and recover running apps."""
    from mctl.core import plugins
    from mctl.core.server.autoscaler import Autoscaler
    from mctl.core.server.metrics import Metrics
    from mctl.core.server.schedules import ScheduleRunner

    name = scheduler_name or os.environ.get("MCTL_SCHEDULER", "local")
    options = dict(scheduler_options or {})
    backend = plugins.find("mctl_register_schedulers", name).factory(options)
    store = Store(state_dir)
    control = ControlPlane(store, backend, log_sink)
    Metrics(control)
    runner = web.AppRunner(make_app(control), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound = runner.addresses[0][1]
    url = advertise_url or f"http://{host}:{bound}"
    control.autoscaler = Autoscaler(control, backend, url, options)
    await control.autoscaler.start()
    await control.recover()
    schedules = ScheduleRunner(control)
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(schedules.run()), loop.create_task(retention(store))]
    return RunningServer(url, control, runner, lambda: [t.cancel() for t in tasks])


async def retention(store: Store) -> None:
    """Keep results, logs and blobs for MCTL_RETENTION_DAYS (default 7), as Modal keeps results."""
    import time

    days = float(os.environ.get("MCTL_RETENTION_DAYS", "7"))
    while True:
        await asyncio.sleep(3600)
        try:
            removed = store.gc(time.time() - days * 86400)
            log.info("retention: removed %s", removed)
        except Exception:
            log.exception("retention failed")
