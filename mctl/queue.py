"""Modal's `modal.queue` path: `from modal.queue import Queue` becomes `from mctl.queue import
Queue`."""

from __future__ import annotations

from mctl.sdk.queue import Queue

__all__ = ["Queue"]
