"""`App`: collects functions and classes; `app.run()` runs them, `mctl deploy` keeps them running."""

from __future__ import annotations

import contextlib
import difflib
import inspect
import os
import re
import sys
from typing import Any, Callable, Iterator

from mctl.exception import DeprecationError, InvalidError
from mctl.sdk.cls import Cls
from mctl.sdk.function import Function
from mctl.sdk.image import Image
from mctl.sdk.partial import BATCHED, ENTER, EXIT, METHOD, WEB, PartialFunction
from mctl.sdk.retries import Retries
from mctl.sdk.schedule import Cron, Schedule
from mctl.sdk.secret import Secret
from mctl.sdk.volume import Volume, read_only_paths, validate_mounts

# Modal's older keywords, still accepted with a warning: the keyword of today they set.
RENAMED_KEYWORDS = {
    "concurrency_limit": "max_containers",
    "keep_warm": "min_containers",
    "container_idle_timeout": "scaledown_window",
    "allow_concurrent_inputs": "max_inputs",  # what @mctl.concurrent(max_inputs=...) sets
}

# Modal keywords that were removed, with what to write instead.
REMOVED_KEYWORDS = {
    "_experimental_buffer_containers": "buffer_containers",
}

# Modal keywords that mctl implements under their Modal names (see `_modal_keywords`).
IMPLEMENTED_KEYWORDS = {"max_inputs", "single_use_containers", "restrict_modal_access",
                        "block_network"}

# Modal keywords mctl cannot honour and whose silent absence would surprise or endanger: a true
# (non-empty) value is refused with what to do instead. False/None/empty is accepted.
REFUSED_KEYWORDS = {
    "network_file_systems": "NetworkFileSystem is not supported; use a Volume instead: "
                            "volumes={path: mctl.Volume.from_name(name, create_if_missing=True)}",
    "cloud_bucket_mounts": "CloudBucketMount is not supported; copy the bucket's files into a "
                           "Volume (`mctl volume put`) and mount it with volumes={path: volume}",
    "i6pn": "i6pn (private networking between containers) is not supported; remove i6pn=True",
    "proxy": "static-IP proxies are not supported; remove proxy=",
}

# Modal keywords about placement or performance on Modal's cloud that have no meaning on
# mctl's backends: accepted, with a one-time warning when set to anything but their default.
NO_EFFECT_KEYWORDS = {
    "region", "cloud", "ephemeral_disk", "enable_memory_snapshot", "nonpreemptible",
    "include_source", "experimental_options", "_experimental_scheduler_placement", "rdma",
}

ACCEPTED_FOR_COMPAT = IMPLEMENTED_KEYWORDS | set(REFUSED_KEYWORDS) | NO_EFFECT_KEYWORDS

FUNCTION_KEYWORDS = {
    "image", "schedule", "secrets", "gpu", "cpu", "memory", "volumes", "timeout", "retries",
    "min_containers", "max_containers", "buffer_containers", "scaledown_window", "serialized",
    "name", "env",
}


def _renamed_keywords(decorator: str, kwargs: dict[str, Any], given: dict[str, Any]
                      ) -> dict[str, Any]:
    """Pop the older spellings from `kwargs` (warning once each); their values under today's
    names. `given` holds today's keywords as passed, to refuse both spellings at once."""
    from mctl.sdk.deprecated import warn_once

    out: dict[str, Any] = {}
    for old, new in RENAMED_KEYWORDS.items():
        if old not in kwargs:
            continue
        value = kwargs.pop(old)
        today = ("@mctl.concurrent(max_inputs=...)" if old == "allow_concurrent_inputs"
                 else f"{decorator}({new}=...)")
        if given.get(new) is not None:
            raise InvalidError(f"{decorator}() got both {old}= and {new}=; keep only "
                               f"{today}.")
        warn_once(old, f"{decorator}({old}=...) is an older Modal spelling; use {today}.",
                  stacklevel=4)
        out[new] = value
    return out


def _check_keywords(decorator: str, kwargs: dict[str, Any], allowed: set[str]) -> dict[str, Any]:
    """Modal's keywords beyond mctl's own: options for the implemented ones, an error for the
    refused ones, a warning for those without effect here. Unknown keywords are an error."""
    from mctl.sdk.deprecated import warn_once

    extra: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in REMOVED_KEYWORDS:
            raise DeprecationError(f"{decorator}({key}=...) was removed from Modal's API; use "
                                   f"{REMOVED_KEYWORDS[key]} instead.")
        if key in IMPLEMENTED_KEYWORDS and decorator != "App":
            extra.update(_implemented(decorator, key, value))
            continue
        if key in REFUSED_KEYWORDS:
            if value:
                raise InvalidError(f"{decorator}({key}={value!r}): {REFUSED_KEYWORDS[key]}.")
            continue
        if key in NO_EFFECT_KEYWORDS:
            if value not in (None, False, {}, [], ()):
                warn_once(f"no-effect:{key}", f"{decorator}({key}=...) has no effect on mctl "
                          "(it is about Modal's cloud); it is ignored.", stacklevel=3)
            continue
        raise InvalidError(f"{decorator}() got an unknown keyword {key!r}."
                           f"{did_you_mean(key, allowed | ACCEPTED_FOR_COMPAT)}")
    return extra


def did_you_mean(key: str, names: Any) -> str:
    """' Did you mean 'timeout'?' for the nearest of `names`, '' when none is near."""
    close = difflib.get_close_matches(key, sorted(names), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _implemented(decorator: str, key: str, value: Any) -> dict[str, Any]:
    """The options `max_inputs=`, `single_use_containers=`, `restrict_modal_access=` and
    `block_network=` set."""
    if key == "max_inputs":
        if value is None:
            return {}
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidError(f"{decorator}(max_inputs={value!r}): max_inputs must be a positive "
                               "int, the number of inputs a container runs before it exits.")
        return {"container_max_inputs": value}
    if not isinstance(value, bool):
        raise InvalidError(f"{decorator}({key}={value!r}): {key} must be True or False.")
    if key == "single_use_containers":
        return {"container_max_inputs": 1} if value else {}
    return {key: value}  # restrict_modal_access, block_network


def _validate_common(where: str, *, timeout: Any, min_containers: int,
                     max_containers: int | None, buffer_containers: int | None,
                     scaledown_window: Any, schedule: Any, secrets: Any, volumes: Any,
                     image: Any, gpu: Any, cpu: Any, memory: Any, retries: Any,
                     env: Any) -> dict[str, Any]:
    """Check a decorator's options; numeric bounds come from core's spec (`DeclaredOptions`)."""
    from mctl.core.spec import (DeclaredOptions, parse_gpus, parse_request_limit,
                                validate_declared)

    try:
        cpu, cpu_limit = parse_request_limit("cpu", cpu)
        memory, memory_limit = parse_request_limit("memory", memory)
        declared = validate_declared(DeclaredOptions, dict(
            timeout=timeout, min_containers=min_containers, max_containers=max_containers,
            buffer_containers=buffer_containers or 0, scaledown_window=scaledown_window, cpu=cpu,
            memory=memory, env=env or {}))
        for name, limit in (("cpu", cpu_limit), ("memory", memory_limit)):
            if limit is not None:  # the limit under the request's bounds and rule
                validate_declared(DeclaredOptions, dict(
                    timeout=timeout, min_containers=0, scaledown_window=scaledown_window,
                    **{name: limit}))
        gpu_req, gpu_fallbacks = parse_gpus(gpu)
    except ValueError as exc:
        raise InvalidError(f"{where}: {exc}.") from None
    if schedule is not None and not isinstance(schedule, Schedule):
        raise InvalidError(f"{where}: schedule must be mctl.Period(...) or mctl.Cron(...).")
    if isinstance(secrets, Secret) or not all(isinstance(s, Secret) for s in secrets):
        raise InvalidError(f"{where}: secrets must be a list of mctl.Secret objects.")
    if image is not None and not isinstance(image, Image):
        raise InvalidError(f"{where}: image must be an mctl.Image, got {type(image).__name__}.")
    # The user's own values (an int timeout stays an int), now known to be in bounds.
    return {"timeout": timeout, "min_containers": min_containers, "max_containers": max_containers,
            "buffer_containers": declared.buffer_containers,
            "scaledown_window": scaledown_window, "schedule": schedule,
            "secrets": list(secrets), "volumes": validate_mounts(volumes or {}), "image": image,
            "volume_objects": list((volumes or {}).values()),  # create_if_missing, at deploy
            "read_only_volumes": read_only_paths(volumes or {}),
            "gpu": gpu_req, "gpu_fallbacks": gpu_fallbacks, "cpu": cpu, "cpu_limit": cpu_limit,
            "memory": memory, "memory_limit": memory_limit, "retries": Retries.coerce(retries),
            "env": dict(declared.env)}


class App:
    """A group of functions and classes deployed and run together.

    `app = mctl.App("my-app", image=..., secrets=[...], volumes={...})`. An unnamed
    `mctl.App()` takes the name of the file that creates it, as in Modal.
    """

    __mctl_app__ = True  # core's APP_MARKER: how core recognises an App without importing this

    def __init__(self, name: str | None = None, *, image: Image | None = None,
                 secrets: list[Secret] | tuple[Secret, ...] = (),
                 volumes: dict[str, Volume] | None = None, include_source: bool | None = None,
                 tags: dict[str, str] | None = None, **kwargs: Any) -> None:
        if kwargs:
            _check_keywords("App", kwargs, {"image", "secrets", "volumes", "tags"})
        if name is not None and not isinstance(name, str):
            raise InvalidError(f"App name must be a string, got {type(name).__name__}.")
        self._name = name
        self._file_name = _name_of_file(sys._getframe(1).f_globals.get("__file__"))
        self.image = image if image is not None else Image()
        self.secrets = list(secrets)
        self.volumes = volumes or {}
        self.volume_mounts = validate_mounts(self.volumes)  # for every function of the app
        self.read_only_volumes = read_only_paths(self.volumes)
        self.tags = dict(tags or {})
        self.registered_functions: dict[str, Function | Cls] = {}
        self.registered_entrypoints: dict[str, Callable[..., Any]] = {}
        self._app_id: str | None = None
        self._server_url: str | None = None
        self._running = False

    @property
    def name(self) -> str | None:
        return self._name or self._file_name

    @property
    def app_id(self) -> str | None:
        return self._app_id

    @property
    def is_running(self) -> bool:
        return self._running

    # --- decorators ----------------------------------------------------------------------------
    def _older_spellings(self, where: str, kwargs: dict[str, Any], image: Image | None,
                         max_containers: int | None, min_containers: int,
                         scaledown_window: float) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
        """`mounts=` and Modal's renamed keywords, taken out of `kwargs` (each warns once, at the
        user's decorator line: the stack levels count this frame): the
        image and the three scaling settings they set, and what the renamed keywords gave."""
        if "mounts" in kwargs:
            from mctl.sdk.mount import apply_mounts

            image = apply_mounts(image or self.image, kwargs.pop("mounts"), where)
        renamed = _renamed_keywords(where, kwargs, {
            "max_containers": max_containers, "min_containers": min_containers or None,
            "scaledown_window": None if scaledown_window == 60 else scaledown_window})
        return (image, renamed.get("max_containers", max_containers),
                renamed.get("min_containers", min_containers),
                renamed.get("scaledown_window", scaledown_window), renamed)

    def function(self, _warn_parentheses_missing: Any = None, *, image: Image | None = None,
                 schedule: Schedule | None = None, secrets: Any = (),
                 gpu: str | list[str] | None = None,
                 cpu: float | tuple[float, float] | None = None,
                 memory: int | tuple[int, int] | None = None,
                 volumes: dict[str, Volume] | None = None, timeout: float = 300,
                 retries: int | Retries | None = None, min_containers: int = 0,
                 max_containers: int | None = None, buffer_containers: int | None = None,
                 scaledown_window: float = 60, serialized: bool = False,
                 name: str | None = None, env: dict[str, str] | None = None,
                 **kwargs: Any) -> Callable[[Any], Function]:
        """Register a function: `@app.function(gpu="A100", timeout=600)`."""
        if _warn_parentheses_missing is not None:
            raise InvalidError("Use @app.function() with parentheses, not @app.function.")
        image, max_containers, min_containers, scaledown_window, renamed = self._older_spellings(
            "@app.function", kwargs, image, max_containers, min_containers, scaledown_window)
        extra = _check_keywords("@app.function", kwargs, FUNCTION_KEYWORDS)
        options = _validate_common(
            "@app.function", timeout=timeout, min_containers=min_containers,
            max_containers=max_containers, buffer_containers=buffer_containers,
            scaledown_window=scaledown_window, schedule=schedule, secrets=secrets,
            volumes=volumes, image=image, gpu=gpu, cpu=cpu, memory=memory, retries=retries,
            env=env)
        options.update(serialized=serialized, **extra)

        def wrapper(f: Any) -> Function:
            params: dict[str, Any] = {}
            if isinstance(f, PartialFunction):
                bad = f.flags & {METHOD, ENTER, EXIT}
                if bad:
                    raise InvalidError(f"@{sorted(bad)[0]} is for methods of an @app.cls class, "
                                       f"not for the function {f.name}.")
                params = dict(f.params)
                params["flags"] = set(f.flags)
                f = f.raw_f
            if "max_inputs" in renamed:
                if "max_inputs" in params:
                    raise InvalidError("allow_concurrent_inputs= and @mctl.concurrent are both "
                                       "set; keep only @mctl.concurrent(max_inputs=...).")
                params.update(max_inputs=renamed["max_inputs"], target_inputs=None)
            if isinstance(f, type):
                raise InvalidError(f"@app.function cannot decorate the class {f.__name__}; use "
                                   "@app.cls() for classes.")
            if isinstance(f, Function):
                raise InvalidError(f"{f.tag} is decorated with @app.function twice.")
            if not callable(f):
                raise InvalidError(f"@app.function must decorate a function, got "
                                   f"{type(f).__name__}.")
            if "<locals>" in getattr(f, "__qualname__", "") and not serialized:
                raise InvalidError(
                    f"Function {f.__qualname__} is not defined at module level (global scope); "
                    "move it there, or pass serialized=True to ship it with cloudpickle.")
            is_gen = inspect.isgeneratorfunction(f) or inspect.isasyncgenfunction(f)
            is_async = inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f)
            if WEB in params.get("flags", ()) and is_gen:
                raise InvalidError(f"Web function {f.__qualname__} is a generator; return a "
                                   "StreamingResponse from it to stream a response.")
            if BATCHED in params.get("flags", ()) and is_gen:
                raise InvalidError(f"@batched cannot be used on the generator {f.__qualname__}.")
            if schedule is not None and _required_params(f):
                raise InvalidError(f"Scheduled function {f.__qualname__} must take no required "
                                   "arguments: a schedule calls it without any.")
            if isinstance(schedule, Cron) and schedule.never_fires():
                raise InvalidError(f"Function {name or f.__name__} has schedule "
                                   f"Cron({schedule.cron_string!r}), which can never fire (no "
                                   "date matches it, such as February 31); choose a day that the "
                                   "month has.")
            tag = name or f.__qualname__
            self._register(tag, Function(self, tag, f, {**options, **params},
                                         is_generator=is_gen, is_async=is_async))
            return self.registered_functions[tag]  # type: ignore[return-value]

        return wrapper

    def cls(self, _warn_parentheses_missing: Any = None, *, image: Image | None = None,
            secrets: Any = (), gpu: str | list[str] | None = None,
            cpu: float | tuple[float, float] | None = None,
            memory: int | tuple[int, int] | None = None, volumes: dict[str, Volume] | None = None,
            timeout: float = 300, retries: int | Retries | None = None, min_containers: int = 0,
            max_containers: int | None = None, buffer_containers: int | None = None,
            scaledown_window: float = 60, serialized: bool = False, name: str | None = None,
            env: dict[str, str] | None = None, **kwargs: Any) -> Callable[[type], Cls]:
        """Register a class whose `@mctl.method()`s run remotely: `@app.cls(gpu="A10G")`."""
        if _warn_parentheses_missing is not None:
            raise InvalidError("Use @app.cls() with parentheses, not @app.cls.")
        image, max_containers, min_containers, scaledown_window, renamed = self._older_spellings(
            "@app.cls", kwargs, image, max_containers, min_containers, scaledown_window)
        extra = _check_keywords("@app.cls", kwargs, FUNCTION_KEYWORDS - {"schedule"})
        options = _validate_common(
            "@app.cls", timeout=timeout, min_containers=min_containers,
            max_containers=max_containers, buffer_containers=buffer_containers,
            scaledown_window=scaledown_window, schedule=None, secrets=secrets, volumes=volumes,
            image=image, gpu=gpu, cpu=cpu, memory=memory, retries=retries, env=env)
        options.update(serialized=serialized, **extra)

        def wrapper(user_cls: Any) -> Cls:
            from mctl.sdk.cls import partials_of, remote_methods

            if not isinstance(user_cls, type):
                raise InvalidError("@app.cls() decorates a class; use @app.function() for "
                                   "functions.")
            if "<locals>" in user_cls.__qualname__ and not serialized:
                raise InvalidError(f"Class {user_cls.__qualname__} is not defined at module level; "
                                   "move it there, or pass serialized=True.")
            for pf in partials_of(user_cls, BATCHED).values():
                if METHOD not in pf.flags:  # Modal: @batched alone makes a method
                    pf.flags.add(METHOD)
                    pf.params.setdefault("is_generator", False)
            methods = remote_methods(user_cls)
            if not methods:
                raise InvalidError(f"Class {user_cls.__name__} has no @mctl.method(); mark the "
                                   "methods to call remotely.")
            batched = [pf.params for pf in methods.values() if BATCHED in pf.flags]
            cls_options = dict(options)
            if batched:
                cls_options.update(max_batch_size=batched[0]["max_batch_size"],
                                   wait_ms=batched[0]["wait_ms"])
            conc = getattr(user_cls, "_mctl_concurrent", None)
            if conc and "max_inputs" in renamed:
                raise InvalidError("allow_concurrent_inputs= and @mctl.concurrent are both set "
                                   f"on {user_cls.__name__}; keep only @mctl.concurrent.")
            if "max_inputs" in renamed:
                conc = {"max_inputs": renamed["max_inputs"], "target_inputs": None}
            if conc:
                cls_options.update(conc)
            tag = name or user_cls.__name__
            self._register(tag, Cls(self, tag, user_cls, cls_options))
            return self.registered_functions[tag]  # type: ignore[return-value]

        return wrapper

    def local_entrypoint(self, _warn_parentheses_missing: Any = None, *,
                         name: str | None = None) -> Callable[[Callable[..., Any]], Any]:
        """The function `mctl run app.py` calls locally, inside a running app."""
        if _warn_parentheses_missing is not None:
            raise InvalidError("Use @app.local_entrypoint() with parentheses.")

        def wrapper(f: Callable[..., Any]) -> Callable[..., Any]:
            self.registered_entrypoints[name or f.__name__] = f
            return f

        return wrapper

    def _register(self, tag: str, handle: Function | Cls) -> None:
        if tag in self.registered_functions:
            raise InvalidError(f"App {self.name or '(unnamed)'} already has a function named "
                               f"{tag!r}; pass name=... to register another.")
        if self._running:
            raise InvalidError(f"{tag} was added to app {self.name} while it is running; declare "
                               "functions before app.run().")
        self.registered_functions[tag] = handle

    def include(self, other: App) -> App:
        for tag, handle in other.registered_functions.items():
            self._register(tag, handle)
            handle.app = self
        return self

    # --- running -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def run(self, *, show_progress: bool | None = None, detach: bool = False,
            interactive: bool = False, environment_name: str | None = None) -> Iterator[App]:
        """Run the app for the duration of the block: `with app.run(): f.remote(1)`.

        Inside a worker this starts nothing: a worker imports the user's file to find its
        functions, and a module-level `with app.run():` there belongs to the caller's script.
        """
        if _in_worker():
            yield from self._run_in_worker()
            return
        from mctl.core.runner import run_app

        with run_app(self, detach=detach):
            self._running = True
            try:
                yield self
            finally:
                self._running = False

    def _run_in_worker(self) -> Iterator[App]:
        if self._app_id is not None:  # already hydrated: the block runs as written
            yield self
            return
        # Still importing the user's file: what follows is the caller's script. The loader keeps
        # what the file defined up to here (its functions) and runs none of the rest.
        from mctl.core.declared import ImportStopped

        raise ImportStopped()
        yield self  # unreachable; keeps this a generator

    @staticmethod
    def lookup(name: str, *, client: Any = None, environment_name: str | None = None,
               create_if_missing: bool = False) -> App:
        """The deployed app `name` (its functions are reached with Function.from_name); with
        create_if_missing, an empty app of that name is deployed if none exists."""
        from mctl.core.client import client_for, run_sync
        from mctl.exception import NotFoundError
        from mctl.sdk.stored import server_url

        url = server_url()
        try:
            record = run_sync(client_for(url).http("GET", f"/api/apps/{name}"))
        except NotFoundError:
            record = None
        if record is None or record.get("state") != "running":
            if not create_if_missing:
                raise NotFoundError(f"No deployed app named {name!r}; deploy it with `mctl "
                                    "deploy`, or pass create_if_missing=True.")
            from mctl.core.runner import deploy_app

            app = App(name)
            deploy_app(app, name=name)
            return app
        app = App(name)
        app._app_id, app._server_url = record["app_id"], url
        return app

    def deploy(self, *, name: str | None = None, environment_name: str | None = None) -> App:
        """Deploy the app to the control plane (`mctl deploy` from code).

        Inside a worker this deploys nothing: the worker imports the user's file to find its
        functions, and a module-level `app.deploy()` there (with the script after it) belongs to
        whoever ran the file, as a module-level `app.run()` does."""
        if _in_worker():
            self._skip_in_worker()
            return self
        from mctl.core.runner import deploy_app

        deploy_app(self, name=name)
        return self

    def _skip_in_worker(self) -> None:
        """In a worker, `app.deploy()`: nothing once the worker runs; while it still imports the
        user's file, stop the import there (the loader keeps the functions defined above)."""
        if self._app_id is None:
            from mctl.core.declared import ImportStopped

            raise ImportStopped()

    def _hydrate(self, app_id: str, server_url: str) -> None:
        from mctl.core.spec import function_id

        self._app_id, self._server_url = app_id, server_url
        for tag, handle in self.registered_functions.items():
            handle._hydrate(function_id(app_id, tag), server_url)

    def _hydrate_in_worker(self, app_id: str) -> None:
        self._hydrate(app_id, os.environ["MCTL_SERVER_URL"])
        self._running = True

    def __getitem__(self, tag: str) -> Function | Cls:
        return self.registered_functions[tag]

    def __repr__(self) -> str:
        return f"App({self.name!r})"


def _required_params(f: Callable[..., Any]) -> list[str]:
    try:
        sig = inspect.signature(f)
    except (TypeError, ValueError):
        return []
    return [p.name for p in sig.parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                   p.KEYWORD_ONLY)]


def _name_of_file(path: str | None) -> str | None:
    """`scripts/hello world.py` -> `hello-world`: a valid app name from a file's name."""
    if not path:
        return None
    stem = os.path.splitext(os.path.basename(path))[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).lstrip("._-")[:64] or None


def _in_worker() -> bool:
    return os.environ.get("MCTL_IS_REMOTE") == "1" or "MCTL_TASK_ID" in os.environ
