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
            "SELECT id, ts, function, line, stream FROM logs WHERE task_id = ? AND id > ? "
            "ORDER BY id "
            "LIMIT 1000", (task_id, after)).fetchall()

    got = rows()
    if not got and wait and found["app_id"]:
        await control.wait_logs(found["app_id"], wait)
        got = rows()
    return web.json_response([{"id": r[0], "ts": r[1], "function": r[2], "line": r[3],
                               "stream": r[4]} for r in got])


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


class ExecSession:
    """One `mctl container exec`: what its worker sends back, for the caller's WebSocket."""

    def __init__(self, conn: Any) -> None:
        import asyncio

        self.conn = conn
        self.queue: asyncio.Queue[tuple[dict[str, Any], list[bytes]]] = asyncio.Queue()

    def deliver(self, header: dict[str, Any], payloads: list[bytes]) -> None:
        self.queue.put_nowait((header, payloads))


async def exec_route(request: web.Request) -> web.StreamResponse:
    """A WebSocket that runs one command in a running container (see runtime/exec.py).

    The caller sends first a JSON text message {"argv": [...], "pty": bool, "rows", "cols",
    "term"}, then stdin as binary messages and {"eof": true} when it ends. It receives binary
    messages: one byte 1 (stdout) or 2 (stderr) and the data; and at the end the text message
    {"exit": code}, or {"error": message} if the command could not be run."""
    import asyncio
    import json

    from aiohttp import WSMsgType

    from mctl.core import ids
    from mctl.core.server.http import _control

    control = _control(request)
    task_id = request.match_info["task_id"]
    conn = _find(control, task_id)["conn"]
    ws = web.WebSocketResponse(heartbeat=30)
    await ws.prepare(request)
    try:
        first = await ws.receive(timeout=30)
        spec = json.loads(first.data) if first.type == WSMsgType.TEXT else {}
    except (asyncio.TimeoutError, ValueError):
        spec = {}
    argv = spec.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        await ws.send_json({"error": "Name the command to run: mctl container exec ID -- CMD."})
        await ws.close()
        return ws
    if conn is None or conn.closed:
        await ws.send_json({"error": f"Container {task_id} is not running; `mctl container "
                                     "list` shows the running ones."})
        await ws.close()
        return ws
    exec_id = ids.new_id("exec")
    session = ExecSession(conn)
    control.execs[exec_id] = session
    control.audit(request, "container.exec", task_id, argv=argv[:1])
    conn.send({"type": "exec", "exec_id": exec_id, "argv": argv, "pty": bool(spec.get("pty")),
               "rows": spec.get("rows"), "cols": spec.get("cols"), "term": spec.get("term")})

    async def from_caller() -> None:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                conn.send({"type": "exec_input", "exec_id": exec_id}, [msg.data])
            elif msg.type == WSMsgType.TEXT and json.loads(msg.data).get("eof"):
                conn.send({"type": "exec_input", "exec_id": exec_id, "eof": True})

    reader = asyncio.get_running_loop().create_task(from_caller())
    finished = False
    try:
        while not ws.closed:
            try:
                header, payloads = await asyncio.wait_for(session.queue.get(), 1.0)
            except asyncio.TimeoutError:
                if conn.closed:
                    await ws.send_json({"error": f"Container {task_id} went away."})
                    break
                if reader.done():  # the caller left: its command goes too
                    break
                continue
            if header["type"] == "exec_output":
                await ws.send_bytes(bytes([header.get("stream", 1)]) + b"".join(payloads))
            else:
                finished = True
                await ws.send_json({"exit": header.get("code", 1)})
                break
    finally:
        control.execs.pop(exec_id, None)
        if not finished and not conn.closed:
            conn.send({"type": "exec_kill", "exec_id": exec_id})
        reader.cancel()
        await ws.close()
    return ws
