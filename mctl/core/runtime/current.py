"""The input a worker is running right now, for `mctl.current_input_id()` and
`mctl.current_function_call_id()`: a context variable, so each runner thread and each async
task sees its own input."""

from __future__ import annotations

import contextvars
from typing import Any

_current: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "mctl_current_input", default=None)


def set_input(item: dict[str, Any]) -> None:
    """Called by the worker as it starts an input (a dispatch item: its id and call_id)."""
    _current.set((item["id"], item.get("call_id", "")))


def input_id() -> str | None:
    current = _current.get()
    return current[0] if current else None


def function_call_id() -> str | None:
    current = _current.get()
    return current[1] or None if current else None
