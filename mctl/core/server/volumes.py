"""HTTP routes for volumes and their files (`Volume.listdir`, `read_file`, `batch_upload`, ...,
and `mctl volume`). Reading needs an invoke token, changing a deploy token; task tokens may not
use these routes: inside a function a volume is a directory at its mount path."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from aiohttp import web

from mctl.core import volume_files
from mctl.exception import AlreadyExistsError, NotFoundError

# an error's kind, which the client turns back into the same exception
_KINDS: list[tuple[type[BaseException], int]] = [
    (FileNotFoundError, 404), (FileExistsError, 409), (IsADirectoryError, 400),
    (NotFoundError, 404), (AlreadyExistsError, 409)]


def _errors(handler: Any) -> Any:
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except tuple(k for k, _ in _KINDS) as exc:
            status = next(s for k, s in _KINDS if isinstance(exc, k))
            return web.json_response({"error": str(exc) if not isinstance(exc, OSError)
                                      else exc.args[0], "kind": type(exc).__name__},
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
    target = await asyncio.to_thread(volume_files.write_target, name, path,
                                     _flag(request, "force"), _flag(request, "create"))
    size = await asyncio.to_thread(volume_files.write_stream, target,
                                   _Body(request, asyncio.get_running_loop()), mode)
    return web.json_response({"path": path, "size": size})


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


def add_volume_routes(app: web.Application, rules: dict[Any, tuple[str | None, str]],
                      task_no: str) -> None:
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
    for _, _, handler, scope in routes:
        rules[handler] = (scope, task_no)
    app.add_routes([web.route(method, path, handler) for method, path, handler, _ in routes])
