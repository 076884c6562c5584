"""Modal's `modal.dict` path: `from modal.dict import Dict` becomes `from mctl.dict import Dict`."""

from __future__ import annotations

from mctl.sdk.dict import Dict

__all__ = ["Dict"]
