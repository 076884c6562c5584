"""`from modal.app import App` works as `from mctl.app import App`."""

from __future__ import annotations

from mctl.sdk.app import App

__all__ = ["App"]
