"""`@app.cls` classes: `Model(size=2).predict.remote(x)`, lifecycle hooks, `Cls.from_name`."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mctl.core.serialization import serialize_args
from mctl.exception import InvalidError
from mctl.sdk.lazy import invoke
from mctl.sdk.function import Function, Invocable
from mctl.sdk.partial import ENTER, EXIT, METHOD, WEB, Parameter, PartialFunction

if TYPE_CHECKING:
    from mctl.sdk.app import App


def parameters_of(user_cls: type) -> dict[str, Parameter]:
    out: dict[str, Parameter] = {}
    for klass in reversed(user_cls.__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, Parameter):
                out[name] = value
    return out


def partials_of(user_cls: type, flag: str) -> dict[str, PartialFunction]:
    out: dict[str, PartialFunction] = {}
    for klass in reversed(user_cls.__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, PartialFunction) and flag in value.flags:
                out[name] = value
    return out


def remote_methods(user_cls: type) -> dict[str, PartialFunction]:
    """Methods callable from outside: `@method()`s and web endpoints (which need no `@method`)."""
    out = partials_of(user_cls, METHOD)
    out.update(partials_of(user_cls, WEB))
    return out


def bind_params(user_cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Check constructor arguments against the class's `parameter()`s."""
    params = parameters_of(user_cls)
    if args:
        raise InvalidError(f"{user_cls.__name__}(...) takes parameters by keyword only, e.g. "
                           f"{user_cls.__name__}({next(iter(params), 'name')}=...).")
    unknown = set(kwargs) - set(params)
    if unknown:
        raise InvalidError(f"{user_cls.__name__} has no parameter {', '.join(sorted(unknown))}; "
                           f"its parameters are {', '.join(params) or 'none'}.")
    values = {}
    for name, param in params.items():
        if name in kwargs:
            values[name] = kwargs[name]
        elif param.has_default:
            values[name] = param.default
        else:
            raise InvalidError(f"{user_cls.__name__} needs parameter {name!r}.")
    return values


def construct_instance(user_cls: type, params: dict[str, Any]) -> Any:
    """Create the user's object with its parameters set, without a user __init__ signature."""
    obj = user_cls.__new__(user_cls)
    for name, value in params.items():
        obj.__dict__[name] = value
    init = user_cls.__init__
    if init is not object.__init__:
        init(obj)
    return obj


def run_lifecycle(obj: Any, flag: str) -> None:
    import asyncio

    for name in partials_of(type(obj), flag):
        result = getattr(obj, name)()
        if inspect.iscoroutine(result):
            asyncio.run(result)


@dataclass(frozen=True)
class ClassRunner:
    """A class's lifecycle in a container (core's `ClassRunner` protocol); pickled as is for
    `serialized=True` classes."""

    user_cls: type

    def new_instance(self, params: dict[str, Any]) -> Any:
        obj = construct_instance(self.user_cls, params)
        run_lifecycle(obj, ENTER)
        return obj

    def close_instance(self, obj: Any) -> None:
        run_lifecycle(obj, EXIT)


class Cls:
    """The handle `@app.cls` returns; calling it gives an instance handle with remote methods."""

    def __init__(self, app: App | None, tag: str, user_cls: type | None,
                 options: dict[str, Any]) -> None:
        self.app = app
        self.tag = tag
        self.user_cls = user_cls
        self.options = options
        self._service = Function(app, tag, None, options)  # the function the methods run on
        self._methods: dict[str, bool] = {}  # name -> is_generator
        if user_cls is not None:
            for name, pf in remote_methods(user_cls).items():
                self._methods[name] = bool(pf.params.get("is_generator"))
            self.__doc__ = user_cls.__doc__
            self.__name__ = user_cls.__name__
            self.__qualname__ = user_cls.__qualname__
        self._lookup: tuple[str, str] | None = None

    @property
    def raw_object(self) -> Any:
        return self.user_cls

    def spec_fields(self) -> dict[str, Any]:
        assert self.user_cls is not None
        methods = {}
        for name, pf in remote_methods(self.user_cls).items():
            fn = pf.raw_f
            methods[name] = {
                "is_generator": bool(pf.params.get("is_generator")),
                "is_async": inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn),
                "web": pf.params.get("web")}
        return {"kind": "class", "methods": methods}

    def remote_object(self) -> ClassRunner:
        assert self.user_cls is not None
        return ClassRunner(self.user_cls)

    def _hydrate(self, function_id: str, server_url: str) -> None:
        self._service._hydrate(function_id, server_url)

    def _resolve(self) -> None:
        if self._service._function_id is not None:
            return
        if self._lookup is None:
            self._service._resolve()  # raises the "not running" error
        from mctl.core.client import run_sync
        from mctl.sdk.function import lookup

        assert self._lookup is not None
        url, record = run_sync(lookup(*self._lookup))
        fspec = record["function"]
        if fspec["kind"] != "class":
            raise InvalidError(f"{self._lookup[1]} in app {self._lookup[0]} is a function; use "
                               "mctl.Function.from_name.")
        self._methods = {name: m["is_generator"] for name, m in fspec["methods"].items()}
        self._service._hydrate(fspec["function_id"], url)

    def __call__(self, *args: Any, **kwargs: Any) -> Obj:
        params = bind_params(self.user_cls, args, kwargs) if self.user_cls is not None else kwargs
        return Obj(self, params)

    @staticmethod
    def from_name(app_name: str, name: str, *, environment_name: str | None = None) -> Cls:
        cls = Cls(None, name, None, {})
        cls._lookup = (app_name, name)
        return cls

    def hydrate(self) -> Cls:
        self._resolve()
        return self

    # Modal creates a variant of the class's containers for these; mctl runs every call on the
    # containers the class was deployed with, and says so once.
    _WITH_OPTIONS = {"cpu", "memory", "gpu", "env", "secrets", "volumes", "retries",
                     "max_containers", "buffer_containers", "scaledown_window", "timeout",
                     "region", "cloud", "min_containers"}

    def _variant(self, what: str, options: dict[str, Any]) -> Cls:
        from mctl.sdk.deprecated import warn_once

        given = {k: v for k, v in options.items() if v is not None}
        if given:
            warn_once(f"Cls.{what}", f"{self.tag}.{what}({', '.join(sorted(given))}=...) is not "
                      "applied by mctl: calls run on the class's containers as declared; set "
                      "these in @app.cls(...) instead.", stacklevel=3)
        variant = Cls(self.app, self.tag, self.user_cls, {**self.options, **given})
        variant._service = self._service  # the same function, the same containers
        variant._methods = self._methods
        variant._lookup = self._lookup
        return variant

    def with_options(self, **options: Any) -> Cls:
        """Modal's per-call-site options (`Model.with_options(gpu="A100")()`)."""
        unknown = sorted(set(options) - self._WITH_OPTIONS)
        if unknown:
            raise InvalidError(f"Cls.with_options() got unknown options {', '.join(unknown)}; "
                               f"it takes {', '.join(sorted(self._WITH_OPTIONS))}.")
        return self._variant("with_options", options)

    def with_concurrency(self, *, max_inputs: int, target_inputs: int | None = None) -> Cls:
        """Modal's `Model.with_concurrency(max_inputs=...)`."""
        return self._variant("with_concurrency", {"max_inputs": max_inputs,
                                                  "target_inputs": target_inputs})

    def with_batching(self, *, max_batch_size: int, wait_ms: int) -> Cls:
        """Modal's `Model.with_batching(max_batch_size=..., wait_ms=...)`."""
        return self._variant("with_batching", {"max_batch_size": max_batch_size,
                                               "wait_ms": wait_ms})


class Obj:
    """An instance handle: `Model(size=2)`. Methods are looked up as attributes."""

    def __init__(self, cls: Cls, params: dict[str, Any]) -> None:
        self._cls = cls
        self._params = params
        self._local: Any = None

    def __getattr__(self, name: str) -> Method:
        if name.startswith("_"):
            raise AttributeError(name)
        cls = self._cls
        if cls.user_cls is None:
            cls._resolve()
        if name not in cls._methods:
            raise AttributeError(f"{cls.tag} has no @mctl.method() named {name!r}; its methods "
                                 f"are {', '.join(cls._methods) or 'none'}.")
        return Method(self, name, cls._methods[name])

    def _local_instance(self) -> Any:
        if self._local is None:
            assert self._cls.user_cls is not None
            self._local = ClassRunner(self._cls.user_cls).new_instance(self._params)
        return self._local


class Method(Invocable):
    def __init__(self, obj: Obj, name: str, is_generator: bool) -> None:
        super().__init__()
        self._obj = obj
        self._name = name
        self._is_generator = is_generator

    def _describe(self) -> str:
        return f"{self._obj._cls.tag}.{self._name}"

    def _target(self) -> invoke.Target:
        cls = self._obj._cls
        cls._resolve()
        target = cls._service._target()
        name, params = self._name, self._obj._params

        def payload(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
            from mctl.core.serialization import dumps

            try:
                return dumps((name, params, args, kwargs))
            except Exception:
                serialize_args(args, kwargs, self._describe())  # names the bad argument
                raise

        target.payload = payload
        return target

    def local(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._obj._local_instance(), self._name)(*args, **kwargs)

    def get_web_url(self) -> str | None:
        """The URL of this method's web endpoint; None if it is not one."""
        from mctl.sdk.function import web_url_of

        cls = self._obj._cls
        cls._resolve()
        service = cls._service
        return web_url_of(service._server_url, service._function_id, self._name)

    @property
    def web_url(self) -> str | None:
        return self.get_web_url()

