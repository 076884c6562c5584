"""The control plane's HTTP face (aiohttp): the WebSocket data plane, a JSON admin API, blobs,
/metrics. Every route but /healthz needs a token (see `auth`). `start_server` wires store, tokens,
audit log, control plane, scheduler and schedules together."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from aiohttp import WSMsgType, web

from mctl.core import protocol
from mctl.core.server import (auth, build_logs, containers, dictqueue_http, environments,
                              gateway, sandbox_relay, sandboxes, secret_direct, variants)
from mctl.core.server.audit import PRINCIPAL_KEY, Audit
from mctl.core.server.control import Conn, ControlPlane
from mctl.core.server.store import Store
from mctl.core.spec import AppSpec
from mctl.exception import Error, NotFoundError

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("mctl.server")

CONTROL = web.AppKey("control", ControlPlane)
# Each handler's rule: (user scope needed or None for open, what a task token may do there).
RULES = web.AppKey("rules", dict)
# Open WebSockets by token id, closed when their token is revoked.
SOCKETS = web.AppKey("sockets", dict)
TASK_NO, TASK_ANY, TASK_OWN_APP, TASK_OWN_FUNCTION = "no", "any", "own_app", "own_function"


def _control(request: web.Request) -> ControlPlane:
    return request.app[CONTROL]


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def ws_handler(request: web.Request) -> web.WebSocketResponse:
    control = _control(request)
    principal: auth.Principal = request[PRINCIPAL_KEY]
    ws = web.WebSocketResponse(max_msg_size=protocol.MAX_FRAME, heartbeat=30)
    await ws.prepare(request)
    conn = Conn(ws.send_bytes, request.remote or "")
    conn.principal = principal
    sockets = request.app[SOCKETS].setdefault(principal.token_id, set())
    sockets.add(ws)
    try:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                header, payloads = protocol.decode(msg.data)
                denial = auth.ws_denial(principal, conn, header, control)
                if denial is not None:
                    log.warning("refused %s from %s (%s): %s", header.get("type"), request.remote,
                                principal.who(), denial)
                    conn.send({"type": "error", "rid": header.get("rid"), "code": "forbidden",
                               "message": denial})
                    if header.get("type") == "hello":
                        break  # a refused registration ends the session
                    continue
                try:
                    control.handle(conn, header, payloads)
                except Exception as exc:  # a bad message must not take the connection down
                    log.exception("error handling %s", header.get("type"))
                    conn.send({"type": "error", "rid": header.get("rid"), "message": str(exc)})
    finally:
        sockets.discard(ws)
        control.disconnected(conn)
        if not ws.closed:
            await asyncio.sleep(0)  # let the refusal go out before closing
            await ws.close()
    return ws


def _find_app(control: ControlPlane, name: str, stopped: bool = False) -> dict[str, Any]:
    """The app with this id, else the deployed app of this name, else the one running detached
    or ephemeral app of this name (`mctl run --detach`); several such: refused, naming them.
    `stopped` (logs, history): else the newest stopped app of this name."""
    app = control.store.find_app(name)
    if app is not None:
        return app
    apps = control.store.apps()
    running = [a for a in apps
               if a["name"] == name and a["mode"] != "deployed" and a["state"] == "running"]
    if len(running) == 1:
        return running[0]
    if running:
        from mctl.exception import InvalidError

        raise InvalidError(f"{len(running)} running apps are named {name!r}: "
                           f"{', '.join(a['app_id'] for a in running)}; pass one of these ids.")
    named = [a for a in apps if a["name"] == name]  # oldest first
    if stopped and named:
        return named[-1]
    if named:
        raise NotFoundError(f"No running app named {name!r}; the newest of that name, "
                            f"{named[-1]['app_id']} ({named[-1]['mode']}), is stopped. "
                            "`mctl app list --all` shows stopped apps.")
    raise NotFoundError(f"No app named {name!r}; `mctl app list` shows the apps.")


def _schedule_problem(spec: AppSpec) -> str | None:
    """What is wrong with the first bad cron schedule of the app's functions, naming it."""
    from mctl.core.cron import cron_problem

    for tag, fspec in spec.functions.items():
        sched = fspec.schedule
        if sched is not None and sched.kind == "cron":
            problem = cron_problem(sched.cron)
            if problem:
                return f"Function {tag}'s schedule: {problem}"
    return None


async def create_app(request: web.Request) -> web.Response:
    from mctl.core import secret_store
    from mctl.core import ids
    from mctl.core.environment import check_app
    from mctl.core.server.control import deployed_app_id
    from mctl.core.server.image_builds import build_app_images

    control = _control(request)
    body = await request.json()
    try:
        spec = AppSpec.model_validate(body["spec"])
    except ValueError as exc:
        return _json_error(400, f"Invalid app spec: {exc}")
    problem = _schedule_problem(spec)
    if problem:  # a schedule that can never fire would only fail in the schedule runner
        return _json_error(400, problem)
    secret_store.refuse_values_in_spec(spec)
    mode = body.get("mode", "ephemeral")
    if mode not in ("ephemeral", "detached", "deployed"):
        return _json_error(400, f"Unknown app mode {mode!r}; use ephemeral, detached or deployed.")
    # Inline secret values go to the secret backend first; only references reach the database.
    created = secret_store.store_inline(spec, body.get("secrets") or {})
    try:
        check_app(spec)
        app_id = body.get("app_id") or (deployed_app_id(spec.name) if mode == "deployed"
                                        else ids.new_id("app"))
        images = await build_app_images(control, spec, app_id,  # a failed build refuses it
                                        build_id=body.get("build_id"), mode=mode)
        if request.transport is None or request.transport.is_closing():
            # The caller went away while its images built (Ctrl-C on `mctl deploy`): a deploy
            # they abandoned must not go live. The built images stay cached for the next try.
            log.info("deploy of %s abandoned by its client before it finished; nothing stored",
                     spec.name)
            raise web.HTTPBadRequest(text="The client disconnected before the deploy finished.")
        app_id, version = await control.create_app(spec, mode, app_id)
    except BaseException:
        secret_store.forget(created)
        raise
    control.audit(request, "app.deploy", app_id, name=spec.name, mode=mode, version=version)
    return web.json_response({"app_id": app_id, "version": version, "images": images})


async def list_apps(request: web.Request) -> web.Response:
    control = _control(request)
    apps = control.store.apps()
    if request.query.get("all") != "1":
        apps = [a for a in apps if a["mode"] == "deployed" or a["state"] == "running"]
    failing: dict[str, dict[str, str]] = {}
    last_failed: dict[str, dict[str, Any]] = {}  # scheduled functions whose last run failed
    for fs in control.functions.values():
        if fs.failure is not None:
            failing.setdefault(fs.app_id, {})[fs.spec.tag] = fs.failure_text
        if fs.last_failure is not None:
            last_failed.setdefault(fs.app_id, {})[fs.spec.tag] = fs.last_failure
    for app in apps:
        app["failing"] = failing.get(app["app_id"], {})
        app["last_run_failed"] = last_failed.get(app["app_id"], {})
    return web.json_response(apps)


async def get_app(request: web.Request) -> web.Response:
    control = _control(request)
    name = request.match_info["name"]
    app = control.store.find_app(name)
    if app is None:
        return _json_error(404, f"No app named {name!r}.")
    version = int(request.query.get("version", app["version"]))
    # with the class variants (Cls.with_options): their workers load their spec from here
    spec = _redacted(variants.expand_json(control.store, app["app_id"],
                                          control.store.version_spec(app["app_id"], version)))
    return web.json_response({**app, "spec": spec})


def _redacted(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """A spec stored by the first release kept `Secret.from_dict` values inline: answer with
    their keys only (workers get values from the secrets route, never from here)."""
    for fspec in (spec or {}).get("functions", {}).values():
        fspec["secrets"] = [{"keys": sorted(ref["values"]), "inline": True}
                            if "values" in ref else ref for ref in fspec.get("secrets", [])]
    return spec


async def stop_app(request: web.Request) -> web.Response:
    control = _control(request)
    app = _find_app(control, request.match_info["name"])
    if app["state"] == "stopped":  # nothing to do: said so, and no second audit entry
        return web.json_response({"app_id": app["app_id"], "name": app["name"],
                                  "state": "stopped", "already": True})
    await control.stop_app(app["app_id"])
    control.audit(request, "app.stop", app["app_id"], name=app["name"])
    return web.json_response({"app_id": app["app_id"], "name": app["name"], "state": "stopped"})


async def app_history(request: web.Request) -> web.Response:
    control = _control(request)
    app = _find_app(control, request.match_info["name"], stopped=True)
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
    if current == 1 and "version" not in body:
        return _json_error(400, f"App {app['name']} has only one version (v1): there is no "
                                "earlier version to roll back to.")
    if not 1 <= target <= current:
        return _json_error(400, f"App {app['name']} has versions 1 to {current}; there is no "
                                f"version {target} to roll back to.")
    spec = control.store.version_spec(app["app_id"], target)
    if spec is None:
        return _json_error(404, f"App {app['name']} has no version {target}.")
    _, version = await control.create_app(AppSpec.model_validate(spec), app["mode"],
                                          app["app_id"], note=f"rollback to v{target}")
    control.audit(request, "app.rollback", app["app_id"], name=app["name"], to_version=target,
                  version=version)
    return web.json_response({"app_id": app["app_id"], "version": version, "from": target})


async def app_logs(request: web.Request) -> web.Response:
    control = _control(request)
    app = _find_app(control, request.match_info["name"], stopped=True)
    after = int(request.query.get("after", 0))
    wait = min(float(request.query.get("wait", 0)), 60.0)
    app_id = app["app_id"]

    def state() -> str:
        """running, stopping (its workers may still print) or stopped (no more lines)."""
        now = control.store.find_app(app_id) or app
        return "stopping" if app_id in control.apps_stopping else now["state"]

    if control.store.new_logs:  # lines not in logs() yet: the flush scheduled with them runs
        await asyncio.sleep(0)
    now, rows = state(), control.store.logs(app_id, after)  # no await between: consistent
    if not rows and wait and now != "stopped":  # a stopped app writes no more lines
        await control.wait_logs(app_id, wait)
        now, rows = state(), control.store.logs(app_id, after)
    listed = [
        {"id": r[0], "ts": r[1], "task_id": r[2], "function": r[3], "line": r[4], "stream": r[5]}
        for r in rows]
    if request.query.get("state") != "1":
        return web.json_response(listed)
    # `mctl app logs -f` ends at "stopped" once it has fewer than a page: those are the last lines.
    return web.json_response({"rows": listed, "state": now, "app_id": app_id,
                              "name": app["name"]})


async def lookup_function(request: web.Request) -> web.Response:
    control = _control(request)
    app_name, tag = request.query["app"], request.query["name"]
    app = control.store.find_app(app_name)
    if app is None or app["state"] != "running":
        return _json_error(404, f"No running app named {app_name!r}; deploy it with `mctl deploy`.")
    spec = _redacted(control.store.version_spec(app["app_id"], app["version"])) or {}
    fspec = spec.get("functions", {}).get(tag)
    if fspec is None:
        return _json_error(404, f"App {app_name!r} has no function or class {tag!r}; it has "
                                f"{', '.join(spec.get('functions', {})) or 'none'}.")
    return web.json_response({"app_id": app["app_id"], "function": fspec})


async def list_secrets(request: web.Request) -> web.Response:
    """Names, keys and dates of the backend's secrets; never values."""
    from mctl.core import secret_store

    infos = await asyncio.to_thread(secret_store.list_secrets,
                                    include_inline=request.query.get("all") == "1")
    return web.json_response([{"name": i.name, "keys": list(i.keys), "created": i.created,
                               "updated": i.updated, "inline": secret_store.is_inline(i.name)}
                              for i in infos])


async def create_secret(request: web.Request) -> web.Response:
    from mctl.core import secret_store

    body = await request.json()
    name, values = body.get("name"), body.get("values")
    if not isinstance(name, str) or not isinstance(values, dict) or not values or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in values.items()):
        return _json_error(400, "A secret needs a name and values: an object of names to strings.")
    overwrite = bool(body.get("overwrite"))
    await asyncio.to_thread(secret_store.create, name, values, overwrite)
    _control(request).audit(request, "secret.create", name, keys=sorted(values),
                            replaced=overwrite)
    return web.json_response({"name": name, "keys": sorted(values)})


async def delete_secret(request: web.Request) -> web.Response:
    from mctl.core import secret_store

    name = request.match_info["name"]
    found = await asyncio.to_thread(secret_store.delete, name)
    if found:
        _control(request).audit(request, "secret.delete", name)
    return web.json_response({"name": name, "deleted": found})


async def function_secrets(request: web.Request) -> web.Response:
    """A worker's secret values, fetched at its start: they never travel in a launch
    description, a job spec or the database."""
    from mctl.core.environment import worker_secrets

    control = _control(request)
    fs = control.functions.get(request.match_info["function_id"])
    if fs is None:
        return _json_error(404, "No such running function.")
    # `delegated`: a backend like Vault gives the worker a means to read the values itself.
    return web.json_response(await asyncio.to_thread(worker_secrets, fs.app_id, fs.spec))


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


async def create_token(request: web.Request) -> web.Response:
    control = _control(request)
    body = await request.json() if request.can_read_body else {}
    record, token = control.tokens.issue(body.get("name"), body.get("scope") or "invoke")
    control.audit(request, "token.create", record["token_id"], name=record["name"],
                  scope=record["scope"])
    return web.json_response({**record, "token": token})  # the only time the secret is shown


async def list_tokens(request: web.Request) -> web.Response:
    tokens = _control(request).tokens.list(include_tasks=request.query.get("all") == "1")
    return web.json_response(tokens)


async def revoke_token(request: web.Request) -> web.Response:
    control = _control(request)
    record = control.tokens.revoke(request.match_info["ref"])
    control.audit(request, "token.revoke", record["token_id"], name=record["name"],
                  scope=record["scope"])
    for ws in list(request.app[SOCKETS].pop(record["token_id"], ())):
        await ws.close(code=4001, message=b"token revoked")
    return web.json_response({**record, "revoked": True})


async def read_audit(request: web.Request) -> web.Response:
    limit = int(request.query.get("limit", 100))
    return web.json_response(_control(request).audit.read(limit))


async def metrics(request: web.Request) -> web.Response:
    body, content_type = _control(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def health(request: web.Request) -> web.Response:
    control = _control(request)
    return web.json_response({"ok": True, "started": control.started, "pid": os.getpid()})


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


@web.middleware
async def after_recovery(request: web.Request, handler: Any) -> web.StreamResponse:
    """Hold requests (but the health check) until `ControlPlane.recover` has brought back the
    running apps: a worker that outlived a previous process may ask for its function's secrets
    or bundle in the moment between this one's first listen and its recovery."""
    if request.path != "/healthz":
        await _control(request).recovered.wait()
    return await handler(request)


@web.middleware
async def authenticate(request: web.Request, handler: Any) -> web.StreamResponse:
    """401 without a valid token, 403 without the scope; the principal goes on the request."""
    from mctl.core.transport import REVOKED, UNAUTHORIZED

    rule = request.app[RULES].get(request.match_info.handler)
    if rule is not None and rule[0] is None:
        return await handler(request)  # open: /healthz
    control = _control(request)
    principal = control.tokens.verify(_bearer(request))
    if principal is None:
        revoked = control.tokens.was_revoked(_bearer(request))
        return web.json_response({"error": REVOKED if revoked else UNAUTHORIZED}, status=401,
                                 headers={"WWW-Authenticate": "Bearer"})
    request[PRINCIPAL_KEY] = principal
    if rule is None:
        return await handler(request)  # no such route: let aiohttp answer 404/405
    scope, task_rule = rule
    if principal.is_task:
        if auth.restricted(principal, control) and not _serves_own_inputs(request):
            return _json_error(403, auth.RESTRICTED)
        if task_rule == TASK_NO:
            return _json_error(403, auth.scope_denial(principal, scope))
        if task_rule == TASK_OWN_APP:
            name = request.match_info.get("name") or request.query.get("app", "")
            app = control.store.find_app(name)
            if app is None or app["app_id"] != principal.app_id:
                return _json_error(403, "A task token may only read its own app; this request "
                                        f"names {name!r}. {auth.OTHER_APP_HINT}")
        if task_rule == TASK_OWN_FUNCTION:
            if request.match_info.get("function_id") != principal.function_id:
                return _json_error(403, "A task token may only read its own function's secrets.")
    elif not principal.has(scope):
        return _json_error(403, auth.scope_denial(principal, scope))
    return await handler(request)


def _serves_own_inputs(request: web.Request) -> bool:
    """What a `restrict_modal_access=True` worker still needs: its app's spec, its secrets, its
    connection, blobs (its bundle, inputs, outputs) and the working copies of its own volumes."""
    path = request.path
    return (request.match_info.handler in (get_app, function_secrets, ws_handler, health,
                                           put_blob, get_blob)
            or (path.startswith("/api/volumes/") and "/sync/" in path))  # own mounts only


@web.middleware
async def user_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """mctl errors become JSON: 404 for what does not exist, 400 for the rest; a bug of ours
    is a JSON 500 that says where to look (its message stays in the log: it may quote values)."""
    try:
        return await handler(request)
    except NotFoundError as exc:
        return _json_error(404, str(exc))
    except Error as exc:
        return _json_error(400, str(exc))
    except (web.HTTPException, asyncio.CancelledError):
        raise
    except Exception as exc:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            raise  # the socket is open: no JSON answer fits there any more
        log.exception("%s %s failed", request.method, request.path)
        return _json_error(500, f"The control plane failed on {request.method} {request.path} "
                                f"({type(exc).__name__}); its log (the output of `mctl server`) "
                                "has the traceback. This is a bug: please report it.")


# method, path, handler, user scope needed (None: open), what a task token may do
ROUTES = [
    ("GET", "/healthz", health, None, TASK_ANY),
    ("GET", "/ws", ws_handler, "invoke", TASK_ANY),  # each message is checked in ws_handler
    ("GET", "/metrics", metrics, "invoke", TASK_NO),
    ("POST", "/api/apps", create_app, "deploy", TASK_NO),
    ("GET", "/api/apps", list_apps, "invoke", TASK_NO),
    ("GET", "/api/apps/{name}", get_app, "invoke", TASK_OWN_APP),
    ("POST", "/api/apps/{name}/stop", stop_app, "deploy", TASK_NO),
    ("GET", "/api/apps/{name}/history", app_history, "invoke", TASK_NO),
    ("POST", "/api/apps/{name}/rollback", rollback_app, "deploy", TASK_NO),
    ("GET", "/api/apps/{name}/logs", app_logs, "deploy", TASK_NO),
    ("GET", "/api/functions/lookup", lookup_function, "invoke", TASK_OWN_APP),
    ("GET", "/api/secrets", list_secrets, "deploy", TASK_NO),
    ("POST", "/api/secrets", create_secret, "deploy", TASK_NO),
    ("DELETE", "/api/secrets/{name}", delete_secret, "deploy", TASK_NO),
    # Secret values, for workers at start: their own function's task token (or an admin).
    ("GET", "/api/functions/{function_id}/secrets", function_secrets, "admin", TASK_OWN_FUNCTION),
    ("PUT", "/blobs/{blob_id}", put_blob, "invoke", TASK_ANY),
    ("GET", "/blobs/{blob_id}", get_blob, "invoke", TASK_ANY),
    ("POST", "/api/tokens", create_token, "admin", TASK_NO),
    ("GET", "/api/tokens", list_tokens, "admin", TASK_NO),
    ("POST", "/api/tokens/{ref}/revoke", revoke_token, "admin", TASK_NO),
    ("GET", "/api/audit", read_audit, "admin", TASK_NO),
    ("GET", "/api/containers", containers.list_route, "invoke", TASK_NO),
    ("GET", "/api/containers/{task_id}/logs", containers.logs_route, "deploy", TASK_NO),
    ("POST", "/api/containers/{task_id}/stop", containers.stop_route, "deploy", TASK_NO),
    ("GET", "/api/containers/{task_id}/exec", containers.exec_route, "deploy", TASK_NO),
    ("GET", "/api/image-builds/{build_id}/log", build_logs.log_route, "deploy", TASK_NO),
]
ROUTES += dictqueue_http.routes()  # mctl.Dict and mctl.Queue
ROUTES += secret_direct.routes()  # `mctl secret create` writing to Vault itself
ROUTES += environments.routes(TASK_ANY)  # `mctl environment list`
ROUTES += variants.routes(TASK_ANY)  # Cls.with_options/with_concurrency/with_batching
ROUTES += sandboxes.routes()  # mctl.Sandbox, `mctl sandbox`
ROUTES += sandbox_relay.routes()  # exec and logs relayed for sandboxes on cluster nodes


def make_app(control: ControlPlane) -> web.Application:
    app = web.Application(client_max_size=protocol.MAX_FRAME,
                          middlewares=[after_recovery, authenticate, user_errors])
    app[CONTROL] = control
    app[RULES] = {handler: (scope, task) for _, _, handler, scope, task in ROUTES}
    app[SOCKETS] = {}
    app.add_routes([web.route(method, path, handler) for method, path, handler, _, _ in ROUTES])
    from mctl.core.server.volumes import add_volume_routes
    add_volume_routes(app, app[RULES], TASK_NO, TASK_ANY)
    gateway.attach(app)
    return app


@dataclass
class RunningServer:
    url: str
    control: ControlPlane
    runner: web.AppRunner
    stop_background: Callable[[], Any]  # cancels schedules and retention

    async def close(self, grace_s: float | None = None) -> None:
        """Stop serving; `grace_s`: how long workers may take to drain (the backend's own
        default if None) where the backend lets it be set."""
        self.stop_background()
        backend = getattr(self.control.autoscaler, "backend", None)
        if grace_s is not None and hasattr(backend, "shutdown_grace_s"):
            backend.shutdown_grace_s = grace_s
        await sandboxes.sandboxes(self.control).shutdown()
        if self.control.autoscaler is not None:
            await self.control.autoscaler.shutdown()
        await self.runner.cleanup()
        if self.control.store.dirty:
            self.control.store.commit()
        self.control.store.close()


async def start_server(state_dir: Path, host: str = "127.0.0.1", port: int = 0,
                       scheduler_name: str | None = None,
                       log_sink: Callable[[str, str, str, str, str], None] | None = None,
                       advertise_url: str | None = None,
                       scheduler_options: dict[str, str] | None = None,
                       ssl_context: ssl.SSLContext | None = None,
                       secret_backend: str | None = None,
                       bootstrap_tokens: bool = False,
                       local_token_file: Path | None = None,
                       ephemeral: bool = False) -> RunningServer:
    """Open the store, start the HTTP(S) server and the scheduler, and recover running apps.

    `bootstrap_tokens`: on first start make an admin token (`auth.bootstrap_local_token`) before
    the first request can arrive. `ephemeral`: an embedded control plane (`mctl run`), whose state
    goes with its process: its containers carry its owner label (sandboxes.EPHEMERAL_LABEL)."""
    from mctl.core import plugins
    from mctl.core.server.autoscaler import Autoscaler
    from mctl.core.server.metrics import Metrics
    from mctl.core.server.schedules import ScheduleRunner

    from mctl.core import secret_store

    secret_store.use_backend(secret_backend)  # None keeps $MCTL_SECRET_BACKEND or local
    from mctl.core import volume_files

    if notice := volume_files.older_default_notice():
        log.warning("%s", notice)
    name = scheduler_name or os.environ.get("MCTL_SCHEDULER", "local")
    options = dict(scheduler_options or {})
    backend = plugins.find("mctl_register_schedulers", name).factory(options)
    store = Store(state_dir)
    control = ControlPlane(store, backend, log_sink)
    if ephemeral:
        control.ephemeral_owner = sandboxes.ephemeral_owner()  # type: ignore[attr-defined]
    control.tokens = auth.TokenStore(store.db)
    control.audit = Audit(Path(state_dir) / "audit.log")
    if bootstrap_tokens:
        done = auth.bootstrap_local_token(control.tokens, local_token_file)
        if done:
            log.info("tokens: %s", done)
    Metrics(control)
    runner = web.AppRunner(make_app(control), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=ssl_context)
    await site.start()
    bound = runner.addresses[0][1]
    url = advertise_url or f"{'https' if ssl_context else 'http'}://{host}:{bound}"
    control.autoscaler = Autoscaler(control, backend, url, options)
    await control.autoscaler.start()
    await sandboxes.sandboxes(control).recover()  # before requests pass (control.recovered)
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
            from mctl.core import volume_files

            if volume_files.driver_name() == "store":  # contents no volume names any more
                from mctl.plugins import volumes_store

                removed["volume_objects"] = await asyncio.to_thread(volumes_store.gc)
            log.info("retention: removed %s", removed)
        except Exception:
            log.exception("retention failed")
