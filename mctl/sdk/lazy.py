"""Keep `import mctl` light: the call machinery (asyncio, aiohttp) loads on the first call."""

from __future__ import annotations

from typing import Any


class _LazyModule:
    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        import importlib

        return getattr(importlib.import_module(self._name), attr)


invoke: Any = _LazyModule("mctl.sdk.invoke")
