"""Modal's `modal.functions` path: `from mctl.functions import Function, FunctionCall, gather`."""

from __future__ import annotations

from mctl.sdk.function import Function, FunctionCall, gather

__all__ = ["Function", "FunctionCall", "gather"]
