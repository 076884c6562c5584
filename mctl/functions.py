"""`from modal.functions import Function, FunctionCall, gather` works with mctl."""

from __future__ import annotations

from mctl.sdk.function import Function, FunctionCall, gather

__all__ = ["Function", "FunctionCall", "gather"]
