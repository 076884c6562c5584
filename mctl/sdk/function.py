"""`Function` handles, `FunctionCall` and `gather`.

A handle is created by `@app.function` (hydrated when its app runs or is deployed) or by
`Function.from_name` (hydrated on first use by asking the control plane).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, Iterator

from mctl.core.serialization import serialize_args
from mctl.exception import InvalidError
from mctl.sdk.lazy import invoke

if TYPE_CHECKING:
    from mctl.core.client import Client
    from mctl.sdk.app import App


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    import asyncio

    return await asyncio.to_thread(fn, *args)


class Dual:
    """A callable with an `.aio` twin, as in Modal: `f.remote(x)` and `await f.remote.aio(x)`."""

    def __init__(self, sync: Callable[..., Any], aio: Callable[..., Any]) -> None:
        self._sync = sync
        self.aio = aio

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._sync(*args, **kwargs)
        except Exception as exc:
            if not _is_remote(exc):
                raise
            # The remote traceback is attached as the cause; the local frames below this call
            # are mctl's client, not the user's: start the local traceback at the user's call.
            raise exc.with_traceback(None)  # noqa: B904 - the same exception, re-raised


def _is_remote(exc: BaseException) -> bool:
    from mctl.core.serialization import RemoteTraceback

    return isinstance(exc.__cause__, RemoteTraceback)


def _arg_sets(iters: tuple[Iterable[Any], ...], kwargs: dict[str, Any]) -> Iterator[Any]:
    for args in zip(*iters):
        yield args, kwargs


async def _arg_sets_aio(iters: tuple[Any, ...], kwargs: dict[str, Any]) -> AsyncIterator[Any]:
    if len(iters) == 1 and hasattr(iters[0], "__aiter__"):
        async for arg in iters[0]:
            yield (arg,), kwargs
    else:
        for args in zip(*iters):
            yield args, kwargs


class Invocable:
    """The calling API shared by functions and class methods."""

    _is_generator = False

    def __init__(self) -> None:
        self.remote = Dual(self._remote, self._remote_aio)
        self.remote_gen = Dual(self._remote_gen, self._remote_gen_aio)
        self.spawn = Dual(self._spawn, self._spawn_aio)
        self.map = Dual(self._map, self._map_aio)
        self.starmap = Dual(self._starmap, self._starmap_aio)
        self.for_each = Dual(self._for_each, self._for_each_aio)
        self.spawn_map = Dual(self._spawn_map, self._spawn_map_aio)

    # subclasses provide the target and the local callable
    def _target(self) -> invoke.Target:
        raise NotImplementedError

    def _describe(self) -> str:
        raise NotImplementedError

    def _check_not_generator(self, what: str) -> None:
        if self._is_generator:
            raise InvalidError(f"{self._describe()} is a generator; call it with .remote_gen(), "
                               f"not .{what}().")

    # The target comes first: a handle from `from_name` learns whether it is a generator there.
    def _remote(self, *args: Any, **kwargs: Any) -> Any:
        target = self._target()
        self._check_not_generator("remote")
        return invoke.call(target, args, kwargs)

    async def _remote_aio(self, *args: Any, **kwargs: Any) -> Any:
        target = await _in_thread(self._target)
        self._check_not_generator("remote")
        return await invoke.call_aio(target, args, kwargs)

    def _remote_gen(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        target = self._target()
        if not self._is_generator:
            raise InvalidError(f"{self._describe()} is not a generator; use .remote().")
        return invoke.call_gen(target, args, kwargs)

    async def _remote_gen_aio(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        target = await _in_thread(self._target)
        if not self._is_generator:
            raise InvalidError(f"{self._describe()} is not a generator; use .remote.aio().")
        async for value in invoke.call_gen_aio(target, args, kwargs):
            yield value

    def _spawn(self, *args: Any, **kwargs: Any) -> FunctionCall:
        target = self._target()
        return FunctionCall(invoke.spawn(target, [(args, kwargs)]), target.client.url, 1)

    async def _spawn_aio(self, *args: Any, **kwargs: Any) -> FunctionCall:
        target = await _in_thread(self._target)
        call_id = await invoke.spawn_aio(target, [(args, kwargs)])
        return FunctionCall(call_id, target.client.url, 1)

    def _map(self, *iters: Iterable[Any], kwargs: dict[str, Any] | None = None,
             order_outputs: bool = True, return_exceptions: bool = False,
             wrap_returned_exceptions: bool = True) -> Iterator[Any]:
        if not iters:
            raise InvalidError(f"{self._describe()}.map() needs at least one iterable of inputs.")
        target = self._target()
        self._check_not_generator("map")
        return invoke.map_sync(target, _arg_sets(iters, kwargs or {}), order_outputs,
                               return_exceptions)

    async def _map_aio(self, *iters: Any, kwargs: dict[str, Any] | None = None,
                       order_outputs: bool = True, return_exceptions: bool = False,
                       wrap_returned_exceptions: bool = True) -> AsyncIterator[Any]:
        target = await _in_thread(self._target)
        self._check_not_generator("map")
        async for value in invoke.map_aio(target, _arg_sets_aio(iters, kwargs or {}),
                                          order_outputs, return_exceptions):
            yield value

    def _starmap(self, input_iterator: Iterable[tuple[Any, ...]], *,
                 kwargs: dict[str, Any] | None = None, order_outputs: bool = True,
                 return_exceptions: bool = False, wrap_returned_exceptions: bool = True
                 ) -> Iterator[Any]:
        target = self._target()
        self._check_not_generator("starmap")
        sets = ((tuple(args), kwargs or {}) for args in input_iterator)
        return invoke.map_sync(target, sets, order_outputs, return_exceptions)

    async def _starmap_aio(self, input_iterator: Any, *, kwargs: dict[str, Any] | None = None,
                           order_outputs: bool = True, return_exceptions: bool = False,
                           wrap_returned_exceptions: bool = True) -> AsyncIterator[Any]:
        target = await _in_thread(self._target)

        async def sets() -> AsyncIterator[Any]:
            async for args in invoke._aiter(input_iterator):
                yield tuple(args), kwargs or {}

        async for value in invoke.map_aio(target, sets(), order_outputs, return_exceptions):
            yield value

    def _for_each(self, *iters: Iterable[Any], kwargs: dict[str, Any] | None = None,
                  ignore_exceptions: bool = False) -> None:
        for _ in self._map(*iters, kwargs=kwargs, order_outputs=False,
                           return_exceptions=ignore_exceptions):
            pass

    async def _for_each_aio(self, *iters: Any, kwargs: dict[str, Any] | None = None,
                            ignore_exceptions: bool = False) -> None:
        async for _ in self._map_aio(*iters, kwargs=kwargs, order_outputs=False,
                                     return_exceptions=ignore_exceptions):
            pass

    def _spawn_map(self, *iters: Iterable[Any], kwargs: dict[str, Any] | None = None
                   ) -> FunctionCall:
        target = self._target()
        sets = list(_arg_sets(iters, kwargs or {}))
        return FunctionCall(invoke.spawn(target, sets), target.client.url, len(sets))

    async def _spawn_map_aio(self, *iters: Any, kwargs: dict[str, Any] | None = None
                             ) -> FunctionCall:
        target = await _in_thread(self._target)
        sets = [s async for s in _arg_sets_aio(iters, kwargs or {})]
        return FunctionCall(await invoke.spawn_aio(target, sets), target.client.url, len(sets))


class Function(Invocable):
    """A remote function: `f.remote(x)`, `f.map(xs)`, `f.spawn(x)`, `f.local(x)`, ..."""

    def __init__(self, app: App | None, tag: str, raw_f: Callable[..., Any] | None,
                 options: dict[str, Any], *, is_generator: bool = False,
                 is_async: bool = False) -> None:
        super().__init__()
        self.app = app
        self.tag = tag
        self.raw_f = raw_f
        self.options = options
        self._is_generator = is_generator
        self.is_async = is_async
        self._function_id: str | None = None
        self._server_url: str | None = None
        self._lookup: tuple[str, str] | None = None  # (app name, tag) for from_name
        if raw_f is not None:
            self.__doc__ = raw_f.__doc__
            self.__name__ = getattr(raw_f, "__name__", tag)
            self.__qualname__ = getattr(raw_f, "__qualname__", tag)
            self.__module__ = getattr(raw_f, "__module__", __name__)

    @property
    def raw_object(self) -> Any:
        return self.raw_f

    def spec_fields(self) -> dict[str, Any]:
        schedule = self.options.get("schedule")
        return {"kind": "function", "is_generator": self._is_generator, "is_async": self.is_async,
                "schedule": schedule.spec_fields() if schedule is not None else None,
                "web": self.options.get("web")}

    def remote_object(self) -> Any:
        return self.raw_f

    def get_raw_f(self) -> Callable[..., Any]:
        assert self.raw_f is not None
        return self.raw_f

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise InvalidError(f"Call {self.tag} with .remote(...) to run it remotely or .local(...) "
                           "to run it here; calling it directly is ambiguous.")

    def local(self, *args: Any, **kwargs: Any) -> Any:
        if self.raw_f is None:
            raise InvalidError(f"{self.tag} was looked up by name; its code is not here to run "
                               "locally.")
        return self.raw_f(*args, **kwargs)

    def _describe(self) -> str:
        return f"Function {self.tag}"

    # --- hydration -----------------------------------------------------------------------------
    def _hydrate(self, function_id: str, server_url: str) -> None:
        self._function_id, self._server_url = function_id, server_url

    @property
    def object_id(self) -> str:
        self._target()
        assert self._function_id is not None
        return self._function_id

    def _target(self) -> invoke.Target:
        from mctl.core.client import client_for

        if self._function_id is None:
            self._resolve()
        assert self._function_id is not None and self._server_url is not None
        return invoke.Target(client_for(self._server_url), self._function_id, self._payload)

    def _payload(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
        return serialize_args(args, kwargs, self.tag)

    def _resolve(self) -> None:
        if self._lookup is None:
            raise InvalidError(
                f"Function {self.tag} is not running: call it inside `with app.run():`, from "
                "`mctl run`, or look up a deployed one with mctl.Function.from_name(app, name).")
        from mctl.core.client import run_sync

        server_url, record = run_sync(lookup(*self._lookup))
        fspec = record["function"]
        if fspec["kind"] != "function":
            raise InvalidError(f"{self._lookup[1]} in app {self._lookup[0]} is a class; use "
                               "mctl.Cls.from_name.")
        self._is_generator = fspec["is_generator"]
        self._hydrate(fspec["function_id"], server_url)

    def get_web_url(self) -> str | None:
        """The URL of this function's web endpoint (`@fastapi_endpoint`, `@asgi_app`, ...);
        None if it is not a web function."""
        self._target()
        return web_url_of(self._server_url, self._function_id)

    @property
    def web_url(self) -> str | None:
        return self.get_web_url()

    @staticmethod
    def from_name(app_name: str, name: str, *, environment_name: str | None = None) -> Function:
        """A deployed function, looked up lazily on first call."""
        fn = Function(None, name, None, {})
        fn._lookup = (app_name, name)
        return fn

    def hydrate(self) -> Function:
        self._target()
        return self


def web_url_of(server_url: str | None, function_id: str | None,
               method: str | None = None) -> str | None:
    """Ask the control plane for a web endpoint's URL (it knows the routing: path or host)."""
    from mctl.core.client import client_for, run_sync

    assert server_url is not None and function_id is not None
    params = {"function_id": function_id, **({"method": method} if method else {})}
    endpoints = run_sync(client_for(server_url).http("GET", "/api/web", params=params))
    return endpoints[0]["url"] if endpoints else None


async def lookup(app_name: str, tag: str) -> tuple[str, dict[str, Any]]:
    from mctl.core.client import client_for
    from mctl.core.config import configured_server_url

    url = configured_server_url()
    if url is None:
        from mctl.exception import NotFoundError

        raise NotFoundError(f"No mctl server to look up {app_name}/{tag} on: deploy the app with "
                            "`mctl deploy`, or set MCTL_SERVER_URL.")
    record = await client_for(url).http("GET", "/api/functions/lookup",
                                        params={"app": app_name, "name": tag})
    return url, record


class FunctionCall:
    """A reference to a spawned call: `.get()`, `.cancel()`, `FunctionCall.from_id(id)`."""

    def __init__(self, object_id: str, server_url: str | None = None, num_inputs: int = 1) -> None:
        self.object_id = object_id
        self._server_url = server_url
        self._num_inputs = num_inputs
        self.get = Dual(self._get, self._get_aio)
        self.cancel = Dual(self._cancel, self._cancel_aio)

    def num_inputs(self) -> int:
        return self._num_inputs

    def _client(self) -> Client:
        from mctl.core.client import client_for
        from mctl.core.config import configured_server_url
        from mctl.core.runner import running_server_url

        # The app running in this process (`mctl run`, `with app.run():`) knows its calls, even
        # on an embedded control plane; else the configured one (deployed apps, workers).
        url = self._server_url or running_server_url() or configured_server_url()
        if url is None:
            raise InvalidError("No mctl server is configured to look up this function call on; "
                               "set MCTL_SERVER_URL, or call from_id inside `with app.run():`.")
        return client_for(url)

    def _get(self, timeout: float | None = None, *, index: int = 0) -> Any:
        from mctl.core.client import run_sync

        return invoke.decode(*run_sync(invoke.wait_output(self._client(), self.object_id, index,
                                                          timeout)))

    async def _get_aio(self, timeout: float | None = None, *, index: int = 0) -> Any:
        from mctl.core.client import run_async

        return invoke.decode(*await run_async(invoke.wait_output(self._client(), self.object_id,
                                                                 index, timeout)))

    def _cancel(self, terminate_containers: bool = False) -> None:
        from mctl.core.client import run_sync

        run_sync(self._client().cancel(self.object_id))

    async def _cancel_aio(self, terminate_containers: bool = False) -> None:
        from mctl.core.client import run_async

        await run_async(self._client().cancel(self.object_id))

    @staticmethod
    def gather(*function_calls: FunctionCall) -> list[Any]:
        """Wait for several spawned calls; results in the same order (modal.FunctionCall.gather)."""
        return gather(*function_calls)

    @staticmethod
    def from_id(function_call_id: str) -> FunctionCall:
        """The call `function_call_id`, on the control plane of the app running in this process
        (if one runs here), else on the configured one."""
        from mctl.core.runner import running_server_url

        return FunctionCall(function_call_id, running_server_url())

    def __repr__(self) -> str:
        return f"FunctionCall({self.object_id!r})"


def gather(*function_calls: FunctionCall) -> list[Any]:
    """Wait for several spawned calls; results in the same order."""
    return [fc.get() for fc in function_calls]
