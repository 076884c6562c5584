"""Arguments and results travel as cloudpickle bytes; errors name what could not be pickled."""

from __future__ import annotations

import contextlib
import re
import sys
from typing import Any

from mctl.exception import RemoteError, SerializationError


def dumps(obj: Any) -> bytes:
    import cloudpickle

    return cloudpickle.dumps(obj, protocol=5)


def loads(data: bytes) -> Any:
    import pickle

    return pickle.loads(data)


def serialize_args(args: tuple[Any, ...], kwargs: dict[str, Any], where: str) -> bytes:
    """Pickle a call's arguments; on failure say which argument broke it."""
    try:
        return dumps((args, kwargs))
    except Exception as exc:
        for i, arg in enumerate(args):
            _check_one(arg, f"positional argument {i}", where, exc)
        for key, value in kwargs.items():
            _check_one(value, f"argument {key!r}", where, exc)
        raise SerializationError(f"Could not pickle the arguments of {where}: {exc}") from exc


def _check_one(value: Any, label: str, where: str, original: Exception) -> None:
    try:
        dumps(value)
    except Exception as exc:
        raise SerializationError(
            f"{label} of {where} ({type(value).__name__}) cannot be pickled: {exc}. "
            "Pass plain data, or create the object inside the function.") from original


def serialize_result(value: Any, where: str) -> bytes:
    """Pickle what a function returned (or yielded); on failure say whose result it is."""
    try:
        return dumps(value)
    except Exception as exc:
        raise SerializationError(
            f"The result of {where} ({type(value).__name__}) cannot be pickled: {exc}. Return "
            "plain data (numbers, strings, lists, dicts, dataclasses), or keep the object in "
            "the container (a Volume, an attribute of an @app.cls instance).") from None


class _PortableException:
    """An exception pickled inside its own bytes, with its type's name and its message: a caller
    that cannot rebuild the exception (its class is not importable there, or its __init__ takes
    other arguments than its args) still gets both."""

    def __init__(self, exc: BaseException) -> None:
        self.type_name = type(exc).__name__
        self.message = str(exc)
        try:
            self.data = dumps(exc)
        except Exception:
            self.data = dumps(RemoteError(f"{self.type_name}: {self.message}"))

    def __reduce__(self) -> Any:
        return (_rebuild_exception, (self.data, self.type_name, self.message))


def _rebuild_exception(data: bytes, type_name: str, message: str) -> BaseException:
    try:
        exc = loads(data)
    except Exception as err:
        return RemoteError(f"{type_name}: {message} (the remote exception could not be rebuilt "
                           f"here: {err})")
    if not isinstance(exc, BaseException):
        return RemoteError(f"{type_name}: {message}")
    return exc


def serialize_exception(exc: BaseException) -> bytes:
    """Pickle an exception with its traceback text (the user's frames, not mctl's)."""
    from mctl.core.tracebacks import format_user_traceback

    return dumps((_PortableException(exc), format_user_traceback(exc)))


def describe_error(payload: bytes) -> str:
    """The traceback text of a `serialize_exception` payload, read without running anything in
    it: the control plane, which logs failed inputs, never unpickles the user's objects (only
    `_rebuild_exception`'s arguments, plain strings and bytes, are let through)."""
    import io
    import pickle

    class _TextOnly(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) == (__name__, "_rebuild_exception"):
                return lambda data, type_name, message: f"{type_name}: {message}"
            raise pickle.UnpicklingError(f"{module}.{name} is not read here")

    try:
        exc, tb = _TextOnly(io.BytesIO(payload)).load()
    except Exception:  # noqa: BLE001 - not an error payload we know
        return "(the error could not be read here; its caller gets it)"
    text = tb if isinstance(tb, str) and tb.strip() else str(exc)
    return text.rstrip("\n")


class RemoteTraceback(Exception):
    """Set as `__cause__` of a re-raised remote exception whose traceback cannot be rebuilt as
    frames (a chained one), so the remote traceback is printed."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f"in the remote function:\n\n{self.tb}"


# Printed as `RemoteTraceback: ...`, not with mctl's module path.
RemoteTraceback.__module__ = "builtins"

_FRAME = re.compile(r'^  File "(?P<file>.+)", line (?P<line>\d+), in (?P<name>.+)$')


def _remote_frames(tb: str) -> list[tuple[str, int, str]] | None:
    """The frames of a plain (unchained) traceback text, or None when it is chained."""
    if tb.count("Traceback (most recent call last):") > 1:
        return None
    return [(m["file"], int(m["line"]), m["name"]) for m in map(_FRAME.match, tb.splitlines())
            if m]


class _Raise(Exception):
    pass


def _fake_traceback(frames: list[tuple[str, int, str]]) -> Any:
    """Traceback objects for the remote frames (file, line, function), so Python prints them as
    part of the caller's own traceback, as Modal does."""
    import linecache
    import types

    tb = None
    for filename, lineno, name in reversed(frames):
        # A call as wide as the line's code: Python shows the line without position markers.
        width = max(len(linecache.getline(filename, lineno).strip()), 4)
        source = "\n" * (lineno - 1) + "_r(" + " " * (width - 4) + ")"
        try:
            code = compile(source, filename, "exec")
            code = code.replace(co_name=name)
            exec(code, {"_r": _raiser, "__name__": "__remote__"})
        except _Raise:
            caught = sys.exc_info()[2]
            assert caught is not None and caught.tb_next is not None
            here = caught.tb_next
            tb = types.TracebackType(tb, here.tb_frame, here.tb_lasti, here.tb_lineno)
        except Exception:  # noqa: BLE001 - a frame we cannot rebuild: leave it out
            continue
    return tb


def _raiser() -> None:
    raise _Raise


def raise_remote(payload: bytes) -> None:
    """Re-raise a remote exception with its own type, with the remote frames after the caller's
    (or, for a chained one, the remote traceback attached as its cause)."""
    try:
        exc, tb = loads(payload)
    except Exception as err:  # an older worker's exception whose class is not importable here
        raise RemoteError(f"The remote function raised an exception that could not be "
                          f"unpickled here: {err}") from None
    frames = _remote_frames(tb)
    with contextlib.suppress(AttributeError, TypeError):
        exc._mctl_remote = True
    if frames is None:
        exc.__cause__ = RemoteTraceback(tb)
        raise exc
    exc.__cause__ = None
    exc.__suppress_context__ = True
    raise exc.with_traceback(_fake_traceback(frames))
