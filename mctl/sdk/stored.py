"""What `Dict` and `Queue` share: lazy lookup by name, ephemeral objects, `.aio` twins, and
the control plane they live on.

A handle made by `from_name` resolves on first use, against the control plane of the app running
in this process (`app.run()`), else `MCTL_SERVER_URL` (a worker's own) or the active profile's
server, else the background server (`mctl deploy`'s). So a module-level `Queue.from_name(...)`
names the same queue in the caller and in every worker of the app.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from typing import Any, AsyncIterator, Callable, Iterator

from mctl.exception import InvalidError, NotFoundError
from mctl.sdk.function import Dual


def server_url() -> str:
    from mctl.core import config, runner

    return runner.running_server_url() or config.named_server_url() \
        or runner.ensure_background_server()


# True while a blocking call drives an operation in the caller's thread (see `_drive`).
_blocking: contextvars.ContextVar[bool] = contextvars.ContextVar("mctl_blocking", default=False)


_noted: set[tuple[str, str]] = set()


def _note_if_throwaway(url: str, label: str, name: str) -> None:
    """A named Dict or Queue on the control plane `mctl run` started in this process (state in
    a temp dir) is gone when the run ends, unlike Modal's: say so once per name, with the fix."""
    from mctl.core import runner

    if url not in runner._embedded_urls or (label, name) in _noted:
        return
    _noted.add((label, name))
    print(f"mctl: {label} {name!r} lives in this run's own control plane and is gone when the run "
          "ends; to keep it, start a server (`mctl server start`, or set MCTL_SERVER_URL) and "
          "run again.", file=sys.stderr, flush=True)


def _drive(awaitable: Any) -> Any:
    """Run an operation's coroutine to its end in this thread, without an event loop.

    Operations are written once, as coroutines that await only `StoredObject._call`/`_resolve`;
    in blocking mode those do their request with blocking I/O and never suspend, so the
    coroutine finishes on its first step. (`StopAsyncIteration` from an async generator's
    `__anext__` passes through as the end of iteration.)"""
    token = _blocking.set(True)
    try:
        awaitable.send(None)
    except StopIteration as stop:
        return stop.value
    finally:
        _blocking.reset(token)
    awaitable.close()
    raise RuntimeError("mctl: a blocking Dict/Queue operation tried to suspend.")


class StoredObject:
    """A Dict or Queue handle: `kind` is "dict" or "queue"."""

    kind = ""
    label = ""

    def __init__(self, name: str | None = None, *, create_if_missing: bool = False,
                 object_id: str | None = None, server: str | None = None) -> None:
        self._name = name
        self._create_if_missing = create_if_missing
        self._object_id = object_id
        self._url = server

    # --- identity ------------------------------------------------------------------------------
    @property
    def name(self) -> str | None:
        return self._name

    @property
    def object_id(self) -> str:
        self.hydrate()
        assert self._object_id is not None
        return self._object_id

    def hydrate(self, client: Any = None) -> StoredObject:
        """Look the object up now (Modal does it on first use too); NotFoundError if missing."""
        self._ensure_url()
        _drive(self._resolve())
        return self

    def _ensure_url(self) -> str:
        if self._url is None:
            self._url = server_url()
        return self._url

    async def _resolve(self) -> str:
        if self._object_id is None:
            from mctl.core.client import client_for

            if self._name is None:
                raise InvalidError(f"This {self.label} has no name and no id; make one with "
                                   f"mctl.{self.label}.from_name(...) or .ephemeral().")
            body = {"kind": self.kind, "name": self._name,
                    "create_if_missing": self._create_if_missing}
            if _blocking.get():
                from mctl.core import framehttp

                reply = framehttp.post_json(self._url, "/api/objects/lookup", body)  # type: ignore[arg-type]
            else:
                reply = await client_for(self._url).http(  # type: ignore[arg-type]
                    "POST", "/api/objects/lookup", body)
            self._object_id = reply["object_id"]
            _note_if_throwaway(self._url, self.label, self._name)  # type: ignore[arg-type]
        return self._object_id

    async def _call(self, op: str, header: dict[str, Any] | None = None,
                    payloads: list[bytes] = ()) -> tuple[dict[str, Any], list[bytes]]:  # type: ignore[assignment]
        from mctl.core.client import client_for

        object_id = await self._resolve()
        path = f"/api/objects/{object_id}/{op}"
        if _blocking.get():
            from mctl.core import framehttp

            return framehttp.post_frame(self._url, path, header or {}, list(payloads))  # type: ignore[arg-type]
        return await client_for(self._url).post_frame(  # type: ignore[arg-type]
            path, header or {}, list(payloads))

    # --- sync and .aio twins -------------------------------------------------------------------
    def _twin(self, coro_fn: Callable[..., Any]) -> Dual:
        """`obj.op(...)` blocks (in this thread); `await obj.op.aio(...)` runs on mctl's
        background loop."""
        from mctl.core.client import run_async

        def sync(*args: Any, **kwargs: Any) -> Any:
            self._ensure_url()
            return _drive(coro_fn(*args, **kwargs))

        async def aio(*args: Any, **kwargs: Any) -> Any:
            await self._ensure_url_aio()
            return await run_async(coro_fn(*args, **kwargs))

        return Dual(sync, aio)

    def _twin_iter(self, agen_fn: Callable[..., AsyncIterator[Any]]) -> Dual:
        """A generator: `for x in obj.op()` and `async for x in obj.op.aio()`."""
        from mctl.core.client import run_async

        def sync(*args: Any, **kwargs: Any) -> Iterator[Any]:
            self._ensure_url()
            agen = agen_fn(*args, **kwargs)
            try:
                while True:
                    try:
                        yield _drive(agen.__anext__())
                    except StopAsyncIteration:
                        return
            finally:
                _drive(agen.aclose())

        async def aio(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            await self._ensure_url_aio()
            agen = agen_fn(*args, **kwargs)
            try:
                while True:
                    try:
                        yield await run_async(agen.__anext__())
                    except StopAsyncIteration:
                        return
            finally:
                await run_async(agen.aclose())

        return Dual(sync, aio)

    async def _ensure_url_aio(self) -> None:
        if self._url is None:
            import asyncio

            await asyncio.to_thread(self._ensure_url)

    # --- ephemeral objects and deletion --------------------------------------------------------
    @classmethod
    def _ephemeral(cls) -> _Ephemeral:
        return _Ephemeral(cls)

    @classmethod
    def _delete(cls, name: str, allow_missing: bool = False) -> None:
        from mctl.core.client import client_for, run_sync

        reply = run_sync(client_for(server_url()).http("DELETE",
                                                       f"/api/objects/{cls.kind}/{name}"))
        if not reply["deleted"] and not allow_missing:
            raise NotFoundError(f"{cls.label} {name!r} not found; pass allow_missing=True to "
                                "ignore a missing one.")

    # --- pickling: a handle passed to a function resolves on the other side ---------------------
    def __getstate__(self) -> dict[str, Any]:
        return {"name": self._name, "create_if_missing": self._create_if_missing,
                "object_id": self._object_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"], create_if_missing=state["create_if_missing"],  # type: ignore[misc]
                      object_id=state["object_id"])

    def __repr__(self) -> str:
        what = repr(self._name) if self._name else self._object_id or "ephemeral"
        return f"{self.label}({what})"


class _Ephemeral:
    """`with mctl.Dict.ephemeral() as d:` (or `async with`): a nameless object deleted at exit."""

    def __init__(self, cls: type[StoredObject]) -> None:
        self.cls = cls
        self.obj: StoredObject | None = None

    def _create(self) -> StoredObject:
        from mctl.core import framehttp

        url = server_url()
        reply = framehttp.post_json(url, "/api/objects/ephemeral", {"kind": self.cls.kind})
        self.obj = self.cls(object_id=reply["object_id"], server=url)
        return self.obj

    def _drop(self) -> None:
        if self.obj is not None:
            with contextlib.suppress(Exception):  # the server may be gone already
                _drive(self.obj._call("delete"))

    def __enter__(self) -> Any:
        return self._create()

    def __exit__(self, *exc: Any) -> None:
        self._drop()

    async def __aenter__(self) -> Any:
        import asyncio

        return await asyncio.to_thread(self._create)

    async def __aexit__(self, *exc: Any) -> None:
        import asyncio

        await asyncio.to_thread(self._drop)
