"""Arguments and results travel as cloudpickle bytes; errors name what could not be pickled."""

from __future__ import annotations

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


def serialize_exception(exc: BaseException) -> bytes:
    """Pickle an exception with its traceback text (the user's frames, not mctl's); fall back to
    a RemoteError when the exception cannot be pickled."""
    from mctl.core.tracebacks import format_user_traceback

    tb = format_user_traceback(exc)
    try:
        return dumps((exc, tb))
    except Exception:
        return dumps((RemoteError(f"{type(exc).__name__}: {exc}"), tb))


class RemoteTraceback(Exception):
    """Set as `__cause__` of a re-raised remote exception, so the remote traceback is printed."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f"the remote function failed:\n\n{self.tb}"


def raise_remote(payload: bytes) -> None:
    """Re-raise a remote exception with its own type and the remote traceback attached."""
    try:
        exc, tb = loads(payload)
    except Exception as err:  # the exception's class is not importable here
        raise RemoteError(f"The remote function raised an exception that could not be "
                          f"unpickled here: {err}") from None
    exc.__cause__ = RemoteTraceback(tb)
    raise exc
