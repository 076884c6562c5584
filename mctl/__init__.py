"""mctl: Modal's programming model on your own machines. `import mctl as modal` runs Modal apps.

Importing mctl does no I/O and pulls in no heavy dependency; they load on first use.
"""

from __future__ import annotations

from typing import Any

from mctl import exception
from mctl.core.hookspecs import hookimpl
from mctl.exception import Error
from mctl.runner import deploy_app
from mctl.sdk.app import App
from mctl.sdk.cls import Cls
from mctl.sdk.dict import Dict
from mctl.sdk.function import Function, FunctionCall, gather
from mctl.sdk.image import Image
from mctl.sdk.mount import Mount
from mctl.sdk.partial import batched, concurrent, enter, exit, method, parameter
from mctl.sdk.queue import Queue
from mctl.sdk.retries import Retries
from mctl.sdk.schedule import Cron, Period
from mctl.sdk.secret import Secret
from mctl.sdk.volume import Volume
from mctl.sdk.web import asgi_app, fastapi_endpoint, web_endpoint, web_server, wsgi_app

__version__ = "0.1.0"

__all__ = [
    "App", "Cls", "ContainerProcess", "Cron", "Dict", "Error", "Function", "FunctionCall", "Image", "Mount", "Period",
    "Queue", "Retries", "Sandbox", "Secret", "Volume", "batched", "concurrent", "enter", "exception", "exit",
    "gather", "hookimpl", "current_function_call_id", "current_input_id", "deploy_app",
    "enable_output", "interact", "is_local", "method", "parameter",
    "asgi_app", "fastapi_endpoint", "web_endpoint", "web_server", "wsgi_app",
]

# Names Modal removed, with the spelling to use now.
_REMOVED = {
    "Stub": "mctl.App",
    "build": "@mctl.enter() (images are built from Image methods)",
    "SharedVolume": "mctl.Volume",
    "NetworkFileSystem": "mctl.Volume",
    "lookup": "mctl.Function.from_name / mctl.Cls.from_name",
}
# Current Modal names that mctl does not implement yet.
_NOT_YET: set[str] = set()
# Loaded on first use (`mctl.Sandbox`), so `import mctl` stays small.
_LAZY = {"Sandbox": "mctl.sdk.sandbox", "ContainerProcess": "mctl.sdk.sandbox"}
_REMOVED_KEYWORD_STYLE = {
    "concurrency_limit": "@app.function(max_containers=...)",
    "keep_warm": "@app.function(min_containers=...)",
}


def __getattr__(name: str) -> Any:
    from mctl.exception import DeprecationError

    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _REMOVED:
        raise DeprecationError(f"mctl.{name} (modal.{name}) was removed from Modal's API; use "
                               f"{_REMOVED[name]} instead.")
    if name in _REMOVED_KEYWORD_STYLE:
        raise DeprecationError(f"{name} is no longer a Modal name; use "
                               f"{_REMOVED_KEYWORD_STYLE[name]}.")
    if name in _NOT_YET:
        raise AttributeError(f"mctl.{name} (modal.{name}) is not implemented in mctl yet; see the "
                             "list of differences from Modal in docs/guide.md.")
    raise AttributeError(f"module 'mctl' has no attribute {name!r}")


def enable_output(show_progress: bool = True) -> Any:
    """Modal's `with modal.enable_output():` shows build and run output; mctl always shows a
    run's output, so this is a context manager that does nothing."""
    import contextlib

    return contextlib.nullcontext()


def is_local() -> bool:
    """True outside a worker (as modal.is_local)."""
    import os

    return "MCTL_TASK_ID" not in os.environ


def current_input_id() -> str | None:
    """The id of the input this container is running (None outside one), as Modal's."""
    from mctl.core.runtime import current

    return current.input_id()


def current_function_call_id() -> str | None:
    """The id of the function call (`FunctionCall.object_id`) whose input is running here."""
    from mctl.core.runtime import current

    return current.function_call_id()


def interact() -> None:
    """Modal's `modal.interact()` opens a terminal in a container under `modal run -i`; mctl
    has no interactive mode, so outside a terminal (every worker) this does nothing."""
    import sys

    if sys.stdin is not None and sys.stdin.isatty() and not is_local():
        print("mctl: interact() has no effect: mctl workers have no interactive terminal.",
              file=sys.stderr)
