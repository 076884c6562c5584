"""`from modal.dict import Dict` works as `from mctl.dict import Dict`."""

from __future__ import annotations

from mctl.sdk.dict import Dict

__all__ = ["Dict"]
