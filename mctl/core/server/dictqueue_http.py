"""HTTP routes of Dicts and Queues. `routes()` gives http.py's route table its rows.

Data operations are `POST /api/objects/{object_id}/{op}` with a `protocol` frame in and out (a
JSON header plus raw pickled payloads): the control plane only moves bytes. Errors come back as
JSON `{"error", "type"}` so the client raises the same mctl exception class. A worker's task
token may use any Dict or Queue, as every container in a Modal workspace can.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from mctl.core import protocol
from mctl.core.server.dictqueue import DictQueueStore, check_partition, check_partition_ttl
from mctl.exception import Error, NotFoundError

if TYPE_CHECKING:
    from mctl.core.server.control import ControlPlane


def _objects(request: web.Request) -> DictQueueStore:
    from mctl.core.server.http import CONTROL

    control: ControlPlane = request.app[CONTROL]
    store = getattr(control, "dict_queue_store", None)
    if store is None:
        store = control.dict_queue_store = DictQueueStore(control.store.db)  # type: ignore[attr-defined]
    return store


def _error(exc: Error) -> web.Response:
    status = 404 if isinstance(exc, NotFoundError) else 400
    return web.json_response({"error": str(exc), "type": type(exc).__name__}, status=status)


def _frame(header: dict[str, Any], payloads: list[bytes] = ()) -> web.Response:  # type: ignore[assignment]
    return web.Response(body=protocol.encode(header, list(payloads)),
                        content_type="application/octet-stream")


async def lookup(request: web.Request) -> web.Response:
    body = await request.json()
    try:
        object_id, created = _objects(request).lookup(
            body.get("kind", ""), body.get("name"), bool(body.get("create_if_missing")))
    except Error as exc:
        return _error(exc)
    return web.json_response({"object_id": object_id, "created": created})


async def create_ephemeral(request: web.Request) -> web.Response:
    body = await request.json()
    try:
        return web.json_response({"object_id": _objects(request).create_ephemeral(
            body.get("kind", ""))})
    except Error as exc:
        return _error(exc)


async def list_objects(request: web.Request) -> web.Response:
    try:
        return web.json_response(_objects(request).list(request.query.get("kind", "")))
    except Error as exc:
        return _error(exc)


async def delete_object(request: web.Request) -> web.Response:
    kind, name = request.match_info["kind"], request.match_info["name"]
    try:
        deleted = _objects(request).delete(kind, name)
    except Error as exc:
        return _error(exc)
    if deleted and not name.startswith(("di-", "qu-")):
        from mctl.core.server.http import CONTROL

        request.app[CONTROL].audit(request, f"{kind}.delete", name)
    return web.json_response({"name": name, "deleted": deleted})


def _still_connected(request: web.Request) -> Any:
    def check() -> bool:
        transport = request.transport
        return transport is not None and not transport.is_closing()

    return check


async def object_op(request: web.Request) -> web.Response:
    """One Dict or Queue operation: the op names it, the frame carries its arguments."""
    store = _objects(request)
    object_id, op = request.match_info["object_id"], request.match_info["op"]
    header, payloads = protocol.decode(await request.read())
    try:
        kind = store.kind_of(object_id)
        if op == "delete":  # an ephemeral object's end (named ones: DELETE, deploy scope)
            return web.json_response({"deleted": store.delete_ephemeral(object_id)})
        handler = (DICT_OPS if kind == "dict" else QUEUE_OPS).get(op)
        if handler is None:
            raise NotFoundError(f"A {kind} has no operation {op!r}.")
        reply, out = await handler(store, object_id, header, payloads, _still_connected(request))
    except Error as exc:
        return _error(exc)
    return _frame(reply, out)


# --- Dict operations: (store, object_id, header, payloads, still_connected) -> (reply, payloads)
async def _dict_get(store: DictQueueStore, oid: str, h: dict[str, Any], p: list[bytes],
                    _: Any) -> Any:
    value = store.dict_get(oid, p[0])
    return {"found": value is not None}, [value] if value is not None else []


async def _dict_contains(store: DictQueueStore, oid: str, h: dict[str, Any], p: list[bytes],
                         _: Any) -> Any:
    return {"found": store.dict_get(oid, p[0]) is not None}, []


async def _dict_put(store: DictQueueStore, oid: str, h: dict[str, Any], p: list[bytes],
                    _: Any) -> Any:
    pairs = list(zip(p[0::2], p[1::2]))
    return {"created": store.dict_put(oid, pairs, bool(h.get("skip_if_exists")))}, []


async def _dict_pop(store: DictQueueStore, oid: str, h: dict[str, Any], p: list[bytes],
                    _: Any) -> Any:
    value = store.dict_pop(oid, p[0])
    return {"found": value is not None}, [value] if value is not None else []


async def _dict_len(store: DictQueueStore, oid: str, h: dict[str, Any], p: list[bytes],
                    _: Any) -> Any:
    return {"len": store.dict_len(oid)}, []


async def _dict_entries(store: DictQueueStore, oid: str, h: dict[str, Any], p: list[bytes],
                        _: Any) -> Any:
    out: list[bytes] = []
    for key, value in store.dict_entries(oid, h.get("limit")):
        out += [key, value]
    return {}, out


async def _dict_clear(store: DictQueueStore, oid: str, h: dict[str, Any], p: list[bytes],
                      _: Any) -> Any:
    store.dict_clear(oid)
    return {}, []


DICT_OPS = {"get": _dict_get, "contains": _dict_contains, "put": _dict_put, "pop": _dict_pop,
            "len": _dict_len, "entries": _dict_entries, "clear": _dict_clear}


# --- Queue operations -------------------------------------------------------------------------
async def _queue_put(store: DictQueueStore, oid: str, h: dict[str, Any], p: list[bytes],
                     connected: Any) -> Any:
    partition = check_partition(h.get("partition"))
    ttl = check_partition_ttl(h.get("partition_ttl"))
    done = await store.queue_put(oid, partition, p, h.get("timeout"), connected, ttl)
    return {"full": not done}, []


async def _queue_get(store: DictQueueStore, oid: str, h: dict[str, Any], p: list[bytes],
                     connected: Any) -> Any:
    partition = check_partition(h.get("partition"))
    n = max(1, int(h.get("n", 1)))
    return {}, await store.queue_get(oid, partition, n, h.get("timeout"), connected)


async def _queue_len(store: DictQueueStore, oid: str, h: dict[str, Any], p: list[bytes],
                     _: Any) -> Any:
    partition = check_partition(h.get("partition"))
    return {"len": store.queue_len(oid, partition, bool(h.get("total")))}, []


async def _queue_peek(store: DictQueueStore, oid: str, h: dict[str, Any], p: list[bytes],
                      _: Any) -> Any:
    """Items after `after` in place; waits up to `timeout` s for one when there are none."""
    partition = check_partition(h.get("partition"))
    after, n = int(h.get("after", 0)), max(1, int(h.get("n", 100)))
    rows = store.queue_peek(oid, partition, after, n)
    if not rows and h.get("timeout"):
        await store.wait_for_item(oid, partition, float(h["timeout"]))
        rows = store.queue_peek(oid, partition, after, n)
    return {"ids": [r[0] for r in rows]}, [r[1] for r in rows]


async def _queue_clear(store: DictQueueStore, oid: str, h: dict[str, Any], p: list[bytes],
                       _: Any) -> Any:
    store.queue_clear(oid, check_partition(h.get("partition")), bool(h.get("all")))
    return {}, []


QUEUE_OPS = {"put": _queue_put, "get": _queue_get, "len": _queue_len, "peek": _queue_peek,
             "clear": _queue_clear}


def routes() -> list[tuple[str, str, Any, str, str]]:
    """Rows for http.ROUTES: (method, path, handler, user scope, what a task token may do)."""
    from mctl.core.server.http import TASK_ANY, TASK_NO

    return [
        ("POST", "/api/objects/lookup", lookup, "invoke", TASK_ANY),
        ("POST", "/api/objects/ephemeral", create_ephemeral, "invoke", TASK_ANY),
        ("GET", "/api/objects", list_objects, "invoke", TASK_NO),
        ("DELETE", "/api/objects/{kind}/{name}", delete_object, "deploy", TASK_NO),
        ("POST", "/api/objects/{object_id}/{op}", object_op, "invoke", TASK_ANY),
    ]
