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


PARAMETER_TYPES = (str, int, bool, bytes)  # what Modal's class parameters may be


def constructor_params(user_cls: type) -> dict[str, Parameter]:
    """The `parameter()`s a caller sets (`init=False` ones are the class's own business)."""
    return {n: p for n, p in parameters_of(user_cls).items() if p.init}


def parameter_annotations(user_cls: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for klass in reversed(user_cls.__mro__):
        out.update(inspect.get_annotations(klass))
    return out


def bind_params(user_cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Check constructor arguments against the class's `parameter()`s: names, required ones and
    the declared types. Runs where the instance is made too, for callers of `Cls.from_name`."""
    params = constructor_params(user_cls)
    cls_name = user_cls.__name__
    init_args = _custom_init_args(user_cls)
    if init_args and (args or set(kwargs) - set(params)):
        decl = "; ".join(f"{n}: int = modal.parameter()" for n in init_args)
        raise InvalidError(
            f"{cls_name} takes its arguments in __init__({', '.join(['self', *init_args])}), "
            f"which mctl does not support on an @app.cls (Modal deprecates a custom __init__ "
            f"there too): declare them as class parameters instead, `{decl}` in the class body "
            f"(a parameter is a str, int, bool or bytes; import mctl as modal), drop the "
            f"__init__ (or use @modal.enter() for setup), and "
            f"call {cls_name}({', '.join(f'{n}=...' for n in init_args)}).")
    if args:
        raise InvalidError(f"{cls_name}(...) takes parameters by keyword only, e.g. "
                           f"{cls_name}({next(iter(params), 'name')}=...)" + (
                               "." if params else f"; it declares none: declare one in the class "
                               "body as `name: str = modal.parameter()`."))
    unknown = set(kwargs) - set(params)
    if unknown:
        raise InvalidError(f"{cls_name} has no parameter {', '.join(sorted(unknown))}; "
                           f"its parameters are {', '.join(params) or 'none'}" + (
                               "." if params else f" (declare one in the class body as "
                               f"`{sorted(unknown)[0]}: str = modal.parameter()`)."))
    annotations = parameter_annotations(user_cls)
    values = {}
    for name, param in params.items():
        if name in kwargs:
            values[name] = kwargs[name]
            _check_type(cls_name, name, kwargs[name], annotations.get(name))
        elif param.has_default:
            values[name] = param.default
        else:
            raise InvalidError(f"{cls_name} needs parameter {name!r}: {cls_name}({name}=...).")
    return values


def _custom_init_args(user_cls: type) -> list[str]:
    """The arguments (besides self) of a class's own __init__; [] for none or object's."""
    init = user_cls.__init__
    if init is object.__init__:
        return []
    try:
        sig = inspect.signature(init)
    except (TypeError, ValueError):
        return []
    return [n for n, p in list(sig.parameters.items())[1:]
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _check_type(cls_name: str, name: str, value: Any, annotation: Any) -> None:
    if isinstance(annotation, str):  # `from __future__ import annotations` in the user's file
        annotation = {t.__name__: t for t in PARAMETER_TYPES}.get(annotation)
    if annotation not in PARAMETER_TYPES:
        return
    if isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
        return
    raise InvalidError(f"{cls_name} parameter {name!r} is declared {annotation.__name__} but was "
                       f"given {type(value).__name__} {value!r}.")


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
        # Checked here too: a caller through Cls.from_name has no class to check against.
        obj = construct_instance(self.user_cls, bind_params(self.user_cls, (), params))
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
        if getattr(self, "_base", None) is not None:
            return self._resolve_variant()
        if self._service._function_id is not None:
            return
        if self._lookup is None:
            self._service._resolve()  # raises the "not running" error
        from mctl.core.client import run_sync
        from mctl.sdk.function import lookup

        assert self._lookup is not None
        url, record = run_sync(lookup(*self._lookup))
        self._looked_up_app_id = record.get("app_id", "")
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

    # Modal's `Cls.with_options` keywords; `region` and `cloud` are accepted and have no effect.
    _WITH_OPTIONS = {"cpu", "memory", "gpu", "env", "secrets", "volumes", "retries",
                     "max_containers", "buffer_containers", "scaledown_window", "timeout",
                     "region", "cloud", "min_containers"}
    _WITH_OPTIONS_RENAMED = {"concurrency_limit": "max_containers",
                             "container_idle_timeout": "scaledown_window"}

    def _variant(self, given: dict[str, Any]) -> Cls:
        """A handle whose calls run on a variant of this class: a function of its own with
        these options (created in the control plane on first use, then reused)."""
        base = getattr(self, "_base", None) or self
        variant = Cls(self.app, self.tag, self.user_cls, self.options)
        variant._base = base  # type: ignore[attr-defined]
        variant._variant_options = {**getattr(self, "_variant_options", {}), **given}  # type: ignore[attr-defined]
        variant._methods = self._methods
        variant._lookup = self._lookup
        return variant

    def _overrides(self, app_id: str) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
        """The variant's options as FunctionSpec fields, and the values of inline secrets."""
        from mctl.core.spec import parse_gpus, parse_request_limit
        from mctl.sdk.retries import Retries
        from mctl.sdk.secret import Secret
        from mctl.sdk.volume import read_only_paths, validate_mounts

        opts: dict[str, Any] = getattr(self, "_variant_options", {})
        out: dict[str, Any] = {}
        resources: dict[str, Any] = {}
        scaling: dict[str, Any] = {}
        inline: dict[str, dict[str, str]] = {}
        for key, value in opts.items():
            if key in ("cpu", "memory"):  # one number, or Modal's (request, limit)
                try:
                    request, limit = parse_request_limit(key, value)
                except ValueError as exc:
                    raise InvalidError(f"{self.tag}.with_options(): {exc}.") from None
                resources["cpu" if key == "cpu" else "memory_mb"] = request
                resources["cpu_limit" if key == "cpu" else "memory_limit_mb"] = limit
            elif key == "gpu":  # one type, or Modal's fallback list
                try:
                    gpu, fallbacks = parse_gpus(value)
                except ValueError as exc:
                    raise InvalidError(f"{self.tag}.with_options(): {exc}.") from None
                resources["gpu"] = gpu.model_dump() if gpu else None
                resources["gpu_fallbacks"] = [g.model_dump() for g in fallbacks]
            elif key in ("min_containers", "max_containers", "buffer_containers",
                         "scaledown_window"):
                scaling[key] = value
            elif key == "timeout":
                out["timeout"] = value
            elif key == "retries":
                retries = Retries.coerce(value)
                out["retries"] = retries.policy().model_dump() if retries else None
            elif key == "env":  # added to the class's own
                if not isinstance(value, dict) or not all(
                        isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
                    raise InvalidError(f"{self.tag}.with_options(env=...) must be a dict of str "
                                       "to str.")
                out["env"] = dict(value)
            elif key == "secrets":  # replace the class's (the app's included), as in Modal
                if isinstance(value, Secret) or not all(isinstance(x, Secret) for x in value):
                    raise InvalidError(f"{self.tag}.with_options(secrets=...) must be a list of "
                                       "mctl.Secret objects.")
                out["secrets"] = [x.ref(app_id) for x in value]
                for x in value:
                    if x.name is None:
                        inline[x.ref(app_id)["name"]] = dict(x.values or {})
            elif key == "volumes":  # replace the class's mounts (the app's included), as in Modal
                out["volumes"] = validate_mounts(value)
                out["read_only_volumes"] = read_only_paths(value)
            elif key in ("max_inputs", "target_inputs"):
                out[key] = value
            elif key == "max_batch_size":
                out["batch_max_size"] = value
            elif key == "wait_ms":
                out["batch_wait_ms"] = value
        if resources:
            out["resources"] = resources
        if scaling:
            out["autoscaling"] = scaling
        return out, inline

    def _resolve_variant(self) -> None:
        from mctl.core.client import client_for, run_sync

        base: Cls = self._base  # type: ignore[attr-defined]
        base._resolve()
        self._methods = base._methods
        service = base._service
        assert service._function_id is not None and service._server_url is not None
        if getattr(self, "_made_from", None) == service._function_id:
            return  # already made for this run of the class
        self._made_from = service._function_id
        app_id = base._app_id()
        overrides, inline = self._overrides(app_id)
        if not overrides:  # e.g. only region=/cloud=: the class itself
            self._service._hydrate(service._function_id, service._server_url)
            return
        record = run_sync(client_for(service._server_url).http(
            "POST", f"/api/functions/{service._function_id}/variants",
            {"overrides": overrides, "secrets": inline}))
        self._service._hydrate(record["function_id"], service._server_url)

    def _app_id(self) -> str:
        if self.app is not None and self.app.app_id is not None:
            return self.app.app_id
        return getattr(self, "_looked_up_app_id", "")

    def with_options(self, **options: Any) -> Cls:
        """Calls through the returned class run with these options, on a variant of the class
        with its own containers (Modal's `Model.with_options(gpu="A100")()`)."""
        from mctl.sdk.deprecated import warn_once

        for old, new in self._WITH_OPTIONS_RENAMED.items():
            if old in options:
                if options.get(new) is not None:
                    raise InvalidError(f"with_options() got both {old}= and {new}=; keep {new}=.")
                warn_once(f"with_options.{old}", f"with_options({old}=...) is an older Modal "
                          f"spelling; use with_options({new}=...).", stacklevel=2)
                options[new] = options.pop(old)
        if "allow_concurrent_inputs" in options:
            warn_once("with_options.allow_concurrent_inputs", "with_options("
                      "allow_concurrent_inputs=...) is an older Modal spelling; use "
                      ".with_concurrency(max_inputs=...).", stacklevel=2)
            value = options.pop("allow_concurrent_inputs")
            if value is not None:
                options["max_inputs"] = value
        unknown = sorted(set(options) - self._WITH_OPTIONS - {"max_inputs"})
        if unknown:
            raise InvalidError(f"Cls.with_options() got unknown options {', '.join(unknown)}; "
                               f"it takes {', '.join(sorted(self._WITH_OPTIONS))}.")
        given = {k: v for k, v in options.items()
                 if v is not None and k not in ("region", "cloud")}
        if "volumes" in given and not given["volumes"]:
            del given["volumes"]
        if "secrets" in given and not given["secrets"]:
            del given["secrets"]
        return self._variant(given)

    def with_concurrency(self, *, max_inputs: int, target_inputs: int | None = None) -> Cls:
        """Calls through the returned class run up to `max_inputs` inputs at once per
        container (Modal's `Model.with_concurrency(max_inputs=...)`)."""
        if not isinstance(max_inputs, int) or max_inputs < 1:
            raise InvalidError(f"with_concurrency(max_inputs={max_inputs!r}) must be a positive "
                               "int.")
        if target_inputs is not None and (not isinstance(target_inputs, int)
                                          or not 1 <= target_inputs <= max_inputs):
            raise InvalidError(f"with_concurrency(target_inputs={target_inputs!r}) must be an int "
                               f"from 1 to max_inputs ({max_inputs}).")
        return self._variant({"max_inputs": max_inputs, "target_inputs": target_inputs})

    def with_batching(self, *, max_batch_size: int, wait_ms: int) -> Cls:
        """Calls through the returned class are batched up to `max_batch_size` inputs, waiting
        at most `wait_ms` (Modal's `Model.with_batching(...)`); its methods take and return
        lists, as `@mctl.batched` methods do."""
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise InvalidError(f"with_batching(max_batch_size={max_batch_size!r}) must be a "
                               "positive int.")
        if not isinstance(wait_ms, int) or wait_ms < 0:
            raise InvalidError(f"with_batching(wait_ms={wait_ms!r}) must be a non-negative int.")
        return self._variant({"max_batch_size": max_batch_size, "wait_ms": wait_ms})


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

