"""Stackable modifiers: `@method`, `@enter`, `@exit`, `@concurrent`, `@batched`, `parameter()`.

Each returns (or updates) a `PartialFunction` that carries flags and params until `@app.function`
or `@app.cls` reads them. Setting the same param twice is an error.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from mctl.exception import InvalidError

# Flags a PartialFunction may carry.
METHOD, ENTER, EXIT, CONCURRENT, BATCHED = "method", "enter", "exit", "concurrent", "batched"
WEB = "web"  # set by the decorators in sdk/web.py


@dataclass
class PartialFunction:
    raw_f: Callable[..., Any] | None
    flags: set[str] = field(default_factory=set)
    params: dict[str, Any] = field(default_factory=dict)

    def add(self, flag: str, **params: Any) -> PartialFunction:
        if flag in self.flags:
            raise InvalidError(f"@{flag} is applied twice to {self.name}; remove one of them.")
        for key, value in params.items():
            if key in self.params:
                raise InvalidError(f"{key} is set twice on {self.name}; set it in one decorator.")
            self.params[key] = value
        self.flags.add(flag)
        return self

    @property
    def name(self) -> str:
        return getattr(self.raw_f, "__qualname__", repr(self.raw_f))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Calling the undecorated thing locally keeps working, as in Modal.
        assert self.raw_f is not None
        return self.raw_f(*args, **kwargs)

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None or self.raw_f is None:
            return self
        return self.raw_f.__get__(obj, objtype)


def _wrap(f: Any, decorator: str) -> PartialFunction:
    if isinstance(f, PartialFunction):
        return f
    if isinstance(f, type):
        raise InvalidError(f"@{decorator} applies to a function or method, not the class "
                           f"{f.__name__}.")
    if not callable(f):
        raise InvalidError(f"@{decorator} must decorate a function, got {type(f).__name__}.")
    return PartialFunction(f)


def _no_parens_check(name: str, args: tuple[Any, ...]) -> None:
    if args:
        raise InvalidError(f"Use @mctl.{name}() with parentheses, not @mctl.{name}.")


def method(*args: Any, is_generator: bool | None = None) -> Callable[[Any], PartialFunction]:
    """Mark a method of an `@app.cls` class as remotely callable."""
    _no_parens_check("method", args)

    def wrapper(f: Any) -> PartialFunction:
        pf = _wrap(f, METHOD)
        gen = is_generator if is_generator is not None else (
            inspect.isgeneratorfunction(pf.raw_f) or inspect.isasyncgenfunction(pf.raw_f))
        return pf.add(METHOD, is_generator=gen)

    return wrapper


def enter(*args: Any, snap: bool = False) -> Callable[[Any], PartialFunction]:
    """Run this method once when a container starts, before any input."""
    _no_parens_check("enter", args)
    return lambda f: _wrap(f, ENTER).add(ENTER)


def exit(*args: Any) -> Callable[[Any], PartialFunction]:  # noqa: A001 - Modal's name
    """Run this method once when a container stops."""
    _no_parens_check("exit", args)
    return lambda f: _wrap(f, EXIT).add(EXIT)


def concurrent(*args: Any, max_inputs: int, target_inputs: int | None = None) -> Callable[[Any], Any]:
    """Let one container run up to `max_inputs` inputs at once; autoscale towards `target_inputs`."""
    _no_parens_check("concurrent", args)
    if not isinstance(max_inputs, int) or max_inputs < 1:
        raise InvalidError(f"@concurrent(max_inputs={max_inputs!r}) must be a positive int.")
    if target_inputs is not None and not 1 <= target_inputs <= max_inputs:
        raise InvalidError(f"@concurrent(target_inputs={target_inputs}) must be between 1 and "
                           f"max_inputs={max_inputs}.")

    def wrapper(f: Any) -> Any:
        if isinstance(f, type):  # on an @app.cls class: stored for app.cls to read
            if getattr(f, "_mctl_concurrent", None):
                raise InvalidError(f"@concurrent is applied twice to {f.__name__}.")
            f._mctl_concurrent = {"max_inputs": max_inputs, "target_inputs": target_inputs}
            return f
        return _wrap(f, CONCURRENT).add(CONCURRENT, max_inputs=max_inputs,
                                        target_inputs=target_inputs)

    return wrapper


def batched(*args: Any, max_batch_size: int, wait_ms: int) -> Callable[[Any], PartialFunction]:
    """Call the function with lists of up to `max_batch_size` inputs, waiting `wait_ms` to fill one."""
    _no_parens_check("batched", args)
    if not isinstance(max_batch_size, int) or not 1 <= max_batch_size <= 1000:
        raise InvalidError(f"@batched(max_batch_size={max_batch_size!r}) must be from 1 to 1000.")
    if not isinstance(wait_ms, int) or not 0 <= wait_ms < 10 * 60 * 1000:
        raise InvalidError(f"@batched(wait_ms={wait_ms!r}) must be from 0 to 600000.")
    return lambda f: _wrap(f, BATCHED).add(BATCHED, max_batch_size=max_batch_size, wait_ms=wait_ms)


_NO_DEFAULT = object()


class Parameter:
    """A class attribute of an `@app.cls` set per instance: `size: int = mctl.parameter(default=1)`."""

    def __init__(self, default: Any = _NO_DEFAULT, init: bool = True) -> None:
        self.default = default
        self.init = init
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @property
    def has_default(self) -> bool:
        return self.default is not _NO_DEFAULT

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        try:
            return obj.__dict__[self.name]
        except KeyError:
            if self.has_default:
                return self.default
            raise AttributeError(self.name) from None


def parameter(*, default: Any = _NO_DEFAULT, init: bool = True) -> Any:
    """Declare a class parameter: `name: str = mctl.parameter()`."""
    return Parameter(default=default, init=init)
