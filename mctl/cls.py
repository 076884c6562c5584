"""`from modal.cls import Cls` works as `from mctl.cls import Cls`."""

from __future__ import annotations

from mctl.sdk.cls import Cls

__all__ = ["Cls"]
