"""HTTP routes for volumes and their files (`Volume.listdir`, `read_file`, `batch_upload`, ...,
and `mctl volume`). Reading needs an invoke token, changing a deploy token; task tokens may not
use these routes: inside a function a volume is a directory at its mount path.

The `/sync/` routes are how workers of a copying driver (`store`) fill and publish their working
copies (`mctl.core.volume_sync`): the manifest, which objects the store lacks, objects up and
down in packs (records of an 8-byte big-endian length and the bytes), and the commit. A task
token may use them only for the volumes its function mounts (and commit only to one it mounts
writable)."""

from __future__ import annotations

import asyncio
import functools
import os
from typing import Any

from aiohttp import web

from mctl.core import volume_files
from mctl.exception import AlreadyExistsError, InvalidError, NotFoundError


class StoreFull(OSError):
    """A driver's storage is full or read-only (any OSError with ENOSPC, EDQUOT or EROFS)."""


def _full(exc: BaseException) -> bool:
    import errno

    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)

# an error's kind, which the client turns back into the same exception
_KINDS: list[tuple[type[BaseException], int]] = [
    (StoreFull, 507), (FileNotFoundError, 404), (FileExistsError, 409), (IsADirectoryError, 400),
    (NotFoundError, 404), (AlreadyExistsError, 409)]


def _errors(handler: Any) -> Any:
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            try:
                return await handler(request)
            except OSError as exc:
                if _full(exc) and not isinstance(exc, StoreFull):
                    raise StoreFull(exc.errno, exc.strerror or str(exc)) from None
                raise
        except tuple(k for k, _ in _KINDS) as exc:
            status = next(s for k, s in _KINDS if isinstance(exc, k))
            message = (str(exc) if not isinstance(exc, OSError)
                       else exc.strerror if exc.errno is not None else exc.args[0])
            return web.json_response({"error": message, "kind": type(exc).__name__},
                                     status=status)
    return wrapped


def _flag(request: web.Request, key: str) -> bool:
    return request.query.get(key) in ("1", "true")


def _audit(request: web.Request, action: str, target: str, **details: Any) -> None:
    from mctl.core.server.http import _control

    _control(request).audit(request, action, target, **details)


@_errors
async def list_volumes(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(volume_files.list_volumes))


@_errors
async def create_volume(request: web.Request) -> web.Response:
    body = await request.json()
    name = body.get("name")
    created = await asyncio.to_thread(volume_files.create, name, bool(body.get("exist_ok")))
    if created:
        _audit(request, "volume.create", name)
    return web.json_response({"name": name, "created": created})


@_errors
async def delete_volume(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    found = await asyncio.to_thread(volume_files.delete, name)
    if found:
        _audit(request, "volume.delete", name)
    return web.json_response({"name": name, "deleted": found})


@_errors
async def list_entries(request: web.Request) -> web.Response:
    entries = await asyncio.to_thread(volume_files.listdir, request.match_info["name"],
                                      request.query.get("path", "/"), _flag(request, "recursive"))
    return web.json_response(entries)


@_errors
async def get_file(request: web.Request) -> web.StreamResponse:
    path = await asyncio.to_thread(volume_files.open_file, request.match_info["name"],
                                   request.query.get("path", ""))
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})


class _Body:
    """The request body as a blocking stream, read on a worker thread from the event loop."""

    def __init__(self, request: web.Request, loop: asyncio.AbstractEventLoop) -> None:
        self.content, self.loop = request.content, loop

    def read(self, n: int) -> bytes:
        return asyncio.run_coroutine_threadsafe(self.content.read(n), self.loop).result()


@_errors
async def put_file(request: web.Request) -> web.Response:
    name, path = request.match_info["name"], request.query.get("path", "")
    mode = int(request.query["mode"], 8) if request.query.get("mode") else None
    try:
        size = await asyncio.to_thread(volume_files.write_file, name, path,
                                       _flag(request, "force"), _flag(request, "create"),
                                       _Body(request, asyncio.get_running_loop()), mode)
    except OSError as exc:
        if _full(exc):
            await _drain(request)  # so the client reads the answer, not a reset connection
        raise
    return web.json_response({"path": path, "size": size})


async def _drain(request: web.Request) -> None:
    while await request.content.read(1 << 20):
        pass


@_errors
async def remove_file(request: web.Request) -> web.Response:
    name, path = request.match_info["name"], request.query.get("path", "")
    await asyncio.to_thread(volume_files.remove, name, path, _flag(request, "recursive"))
    return web.json_response({"path": path, "removed": True})


@_errors
async def copy_files(request: web.Request) -> web.Response:
    body = await request.json()
    await asyncio.to_thread(volume_files.copy, request.match_info["name"],
                            list(body.get("src_paths") or []), str(body.get("dst_path", "")))
    return web.json_response({"copied": True})


# --- working copies (copying drivers) -------------------------------------------------------------
def _store(request: web.Request, write: bool = False) -> tuple[str, Any]:
    """The volume's name and the store module, after checking that a task token's function
    mounts it (writable, for `write`)."""
    from mctl.core.server.audit import PRINCIPAL_KEY
    name = volume_files.check_name(request.match_info["name"])
    if not volume_files.driver().copies:
        raise InvalidError(f"Volume driver {volume_files.driver_name()!r} binds one directory into "
                           "workers; there is no working copy to sync.")
    principal = request.get(PRINCIPAL_KEY)
    if principal is not None and principal.is_task:
        from mctl.core.server.http import _control

        fs = _control(request).functions.get(principal.function_id)
        paths = [p for p, v in (fs.spec.volumes.items() if fs else ()) if v == name]
        if not paths or (write and all(p in fs.spec.read_only_volumes for p in paths)):
            raise _Denied(f"This function does not mount volume {name!r}"
                          + (" writable." if paths else "."))
    return name, volume_files.driver().files


class _Denied(Exception):
    pass


def _sync_errors(handler: Any) -> Any:
    inner = _errors(handler)

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await inner(request)
        except _Denied as exc:
            return web.json_response({"error": str(exc)}, status=403)
        except InvalidError as exc:
            return web.json_response({"error": str(exc)}, status=400)
    return wrapped


@_sync_errors
async def sync_manifest(request: web.Request) -> web.Response:
    name, store = _store(request)
    return web.json_response(await asyncio.to_thread(store.manifest, name))


@_sync_errors
async def sync_missing(request: web.Request) -> web.Response:
    _, store = _store(request, write=True)
    shas = [str(s) for s in await request.json()]
    return web.json_response(await asyncio.to_thread(store.missing, shas))


@_sync_errors
async def sync_upload(request: web.Request) -> web.Response:
    _, store = _store(request, write=True)
    try:
        shas = await asyncio.to_thread(store.store_pack,
                                       _Body(request, asyncio.get_running_loop()))
    except OSError as exc:
        if _full(exc):
            await _drain(request)
        raise
    return web.json_response(shas)


@_sync_errors
async def sync_fetch(request: web.Request) -> web.StreamResponse:
    _, store = _store(request)
    paths = [store.object_path(str(s)) for s in await request.json()]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"Object {path.name[:12]} is not in the volume store.")
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    await resp.prepare(request)
    for path in paths:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            await resp.write(size.to_bytes(8, "big"))
            if size <= volume_files.CHUNK:
                await resp.write(fh.read())
                continue
            while chunk := await asyncio.to_thread(fh.read, volume_files.CHUNK):
                await resp.write(chunk)
    await resp.write_eof()
    return resp


@_sync_errors
async def sync_commit(request: web.Request) -> web.Response:
    name, store = _store(request, write=True)
    body = await request.json()
    return web.json_response(await asyncio.to_thread(store.commit, name, body["changes"]))


def add_volume_routes(app: web.Application, rules: dict[Any, tuple[str | None, str]],
                      task_no: str, task_any: str = "any") -> None:
    """Add the volume routes to `app`, and each route's scope to `rules` (see http.ROUTES)."""
    routes = [
        ("GET", "/api/volumes", list_volumes, "invoke"),
        ("POST", "/api/volumes", create_volume, "deploy"),
        ("DELETE", "/api/volumes/{name}", delete_volume, "deploy"),
        ("GET", "/api/volumes/{name}/entries", list_entries, "invoke"),
        ("GET", "/api/volumes/{name}/files", get_file, "invoke"),
        ("PUT", "/api/volumes/{name}/files", put_file, "deploy"),
        ("DELETE", "/api/volumes/{name}/files", remove_file, "deploy"),
        ("POST", "/api/volumes/{name}/copy", copy_files, "deploy"),
    ]
    sync = [  # working copies; a task token only for its function's volumes (see _store)
        ("GET", "/api/volumes/{name}/sync/manifest", sync_manifest, "invoke"),
        ("POST", "/api/volumes/{name}/sync/missing", sync_missing, "deploy"),
        ("POST", "/api/volumes/{name}/sync/objects", sync_upload, "deploy"),
        ("POST", "/api/volumes/{name}/sync/fetch", sync_fetch, "invoke"),
        ("POST", "/api/volumes/{name}/sync/commit", sync_commit, "deploy"),
    ]
    for _, _, handler, scope in routes:
        rules[handler] = (scope, task_no)
    for _, _, handler, scope in sync:
        rules[handler] = (scope, task_any)
    routes += sync
    app.add_routes([web.route(method, path, handler) for method, path, handler, _ in routes])
