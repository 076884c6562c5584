"""Errors mctl raises, with the names Modal users know (`modal.exception`)."""

from __future__ import annotations


class Error(Exception):
    """Base class of every mctl error."""


class InvalidError(Error):
    """The app, a decorator or an argument is wrong; the message says what to write instead."""


class DeprecationError(InvalidError):
    """A name that Modal removed; the message names the current spelling."""


class NotFoundError(Error):
    """An app, function, call or object name that the control plane does not know."""


class AlreadyExistsError(Error):
    """An object of that name exists already (e.g. a secret created without --force)."""


class ExecutionError(Error):
    """The platform failed to run an input (not the user's code)."""


class ConnectionError(Error):  # noqa: A001 - mirrors modal.exception.ConnectionError
    """The control plane could not be reached."""


class FunctionTimeoutError(Error, TimeoutError):
    """An input ran past its function's `timeout`."""


class OutputExpiredError(TimeoutError):
    """`FunctionCall.get(timeout=...)` waited longer than asked."""


class InputCancellation(Error):
    """The call was cancelled with `FunctionCall.cancel()`."""


class RemoteError(Error):
    """A remote exception that could not be unpickled on the caller's side."""


class SerializationError(InvalidError):
    """An argument or result could not be pickled."""


class ContainerCrashedError(ExecutionError):
    """The worker running an input died (killed, out of memory) and no retry was left."""


class AuthError(Error):
    """The control plane refused the token: missing, invalid, revoked, or without the scope."""


class RequestSizeError(Error):
    """A request was too large, e.g. a Queue item over 1 MiB (as modal.exception.RequestSizeError)."""


class SandboxTimeoutError(Error, TimeoutError):
    """A sandbox reached its `timeout` and was stopped (its returncode is -1)."""


class SandboxTerminatedError(Error):
    """A sandbox was terminated before its command finished."""
