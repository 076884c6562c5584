"""Modal's `modal.cls` path: `from modal.cls import Cls` becomes `from mctl.cls import Cls`."""

from __future__ import annotations

from mctl.sdk.cls import Cls

__all__ = ["Cls"]
