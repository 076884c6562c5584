"""`mctl container list|logs|stop`: the workers ("containers" in Modal's words) of running apps,
as the backend places them and as the control plane sees them connected."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mctl.exception import NotFoundError

if TYPE_CHECKING:
    from mctl.core.server.control import ControlPlane


async def containers(control: ControlPlane, app_filter: str | None = None) -> list[dict[str, Any]]:
    """Every worker of every pool: id, app, function, version, host, state, inputs it runs."""
    scaler = control.autoscaler
    if scaler is None:
        return []
    connected = {c.task_id: c for fs in control.functions.values() for c in fs.workers}
    names = {a["app_id"]: a["name"] for a in control.store.apps()}
    out = []
    for pid, pool in list(scaler.pools.items()):
        name = names.get(pool.app_id, "")
        if app_filter and app_filter not in (name, pool.app_id):
            continue
        for worker in await scaler.backend.list_workers(pid):
            conn = connected.get(worker.worker_id)
            state = worker.state
            if conn is not None and state not in ("stopping", "exited"):
                state = "draining" if conn.draining else ("busy" if conn.running else "idle")
            out.append({
                "container_id": worker.worker_id, "app_id": pool.app_id, "app": name,
                "function": pool.spec.tag, "version": pool.version, "host": worker.host,
                "state": state, "inputs": len(conn.running) if conn else 0,
                "connected_at": getattr(conn, "hello_at", None), "detail": worker.detail})
    return out


def _find(control: ControlPlane, task_id: str) -> dict[str, Any]:
    """The app a container belongs to, from the live pools or, once it is gone, its logs."""
    scaler = control.autoscaler
    for fs in control.functions.values():
        for conn in fs.workers:
            if conn.task_id == task_id:
                return {"app_id": fs.app_id, "conn": conn}
    row = control.store.db.execute("SELECT app_id FROM logs WHERE task_id = ? LIMIT 1",
                                   (task_id,)).fetchone()
    if row is not None:
        return {"app_id": row[0], "conn": None}
    known = scaler is not None and any(task_id in p.ready for p in scaler.pools.values())
    if known:
        return {"app_id": None, "conn": None}
    raise NotFoundError(f"No container {task_id!r}; `mctl container list` shows the running ones.")


async def list_route(request: web.Request) -> web.Response:
    from mctl.core.server.http import _control

    return web.json_response(await containers(_control(request), request.query.get("app")))


async def logs_route(request: web.Request) -> web.Response:
    from mctl.core.server.http import _control

    control = _control(request)
    task_id = request.match_info["task_id"]
    found = _find(control, task_id)
    after = int(request.query.get("after", 0))
    wait = min(float(request.query.get("wait", 0)), 60.0)

    def rows() -> list[tuple[Any, ...]]:
        return control.store.db.execute(
            "SELECT id, ts, function, line FROM logs WHERE task_id = ? AND id > ? ORDER BY id "
            "LIMIT 1000", (task_id, after)).fetchall()

    got = rows()
    if not got and wait and found["app_id"]:
        await control.wait_logs(found["app_id"], wait)
        got = rows()
    return web.json_response([{"id": r[0], "ts": r[1], "function": r[2], "line": r[3]}
                              for r in got])


async def stop_route(request: web.Request) -> web.Response:
    """Drain the container: it finishes the inputs it holds and exits; the pool replaces it if
    its function still needs one."""
    from mctl.core.server.http import _control

    control = _control(request)
    task_id = request.match_info["task_id"]
    conn = _find(control, task_id)["conn"]
    if conn is None or control.autoscaler is None:
        raise NotFoundError(f"Container {task_id!r} is not running.")
    await control.autoscaler.stop_worker(conn)
    control.audit(request, "container.stop", task_id)
    return web.json_response({"container_id": task_id, "state": "draining",
                              "inputs": len(conn.running), "at": time.time()})
