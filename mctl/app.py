"""Modal's `modal.app` path: `from modal.app import App` becomes `from mctl.app import App`."""

from __future__ import annotations

from mctl.sdk.app import App

__all__ = ["App"]
