"""`mctl.Dict`: a durable key-value store on the control plane, shared by callers and workers.

    d = mctl.Dict.from_name("results", create_if_missing=True)
    d["k"] = 1; d.put("k", 2, skip_if_exists=True); d.get("k"); "k" in d; d.pop("k")
    await d.put.aio("k", 3)

Keys and values are cloudpickled; the control plane stores the bytes (its SQLite store), so a
Dict survives a control-plane restart. Use primitive keys: the same key must pickle to the same
bytes everywhere.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from mctl.core.serialization import dumps, loads
from mctl.exception import InvalidError
from mctl.sdk.stored import StoredObject

_MISSING = object()


class Dict(StoredObject):
    """A distributed dictionary (modal.Dict)."""

    kind = "dict"
    label = "Dict"

    def __init__(self, name: str | None = None, *, create_if_missing: bool = False,
                 object_id: str | None = None, server: str | None = None) -> None:
        if name is not None and object_id is None and not isinstance(name, str):
            raise InvalidError("mctl.Dict(...) takes no data; use "
                               "mctl.Dict.from_name(name, create_if_missing=True).")
        super().__init__(name, create_if_missing=create_if_missing, object_id=object_id,
                         server=server)
        self.get = self._twin(self._get)
        self.contains = self._twin(self._contains)
        self.put = self._twin(self._put)
        self.update = self._twin(self._update)
        self.pop = self._twin(self._pop)
        self.len = self._twin(self._len)
        self.clear = self._twin(self._clear)
        self.keys = self._twin_iter(self._keys)
        self.values = self._twin_iter(self._values)
        self.items = self._twin_iter(self._items)

    @staticmethod
    def from_name(name: str, *, environment_name: str | None = None,
                  create_if_missing: bool = False, client: Any = None) -> Dict:
        """The Dict called `name`, looked up on first use (NotFoundError if it does not exist
        and `create_if_missing` is False)."""
        if not isinstance(name, str) or not name:
            raise InvalidError(f"Invalid Dict name {name!r}: pass a non-empty string.")
        return Dict(name, create_if_missing=create_if_missing)

    @staticmethod
    def ephemeral(client: Any = None, environment_name: str | None = None) -> Any:
        """`with mctl.Dict.ephemeral() as d:` a nameless Dict, deleted when the block ends."""
        return Dict._ephemeral()

    @staticmethod
    def delete(name: str, *, allow_missing: bool = False, environment_name: str | None = None,
               client: Any = None) -> None:
        """Delete the named Dict and its entries."""
        Dict._delete(name, allow_missing)

    # --- operations (run on mctl's background loop) --------------------------------------------
    async def _get(self, key: Any, default: Any = None) -> Any:
        reply, out = await self._call("get", {}, [dumps(key)])
        return loads(out[0]) if reply["found"] else default

    async def _contains(self, key: Any) -> bool:
        reply, _ = await self._call("contains", {}, [dumps(key)])
        return bool(reply["found"])

    async def _put(self, key: Any, value: Any, *, skip_if_exists: bool = False) -> bool:
        """Set `key`; with skip_if_exists, leave an existing entry and return False."""
        payloads = _checked([dumps(key), dumps(value)])
        reply, _ = await self._call("put", {"skip_if_exists": skip_if_exists}, payloads)
        return bool(reply["created"])

    async def _update(self, other: Any = None, /, **kwargs: Any) -> None:
        pairs = dict(other or {}, **kwargs)
        if not pairs:
            return
        payloads: list[bytes] = []
        for key, value in pairs.items():
            payloads += [dumps(key), dumps(value)]
        await self._call("put", {}, _checked(payloads))

    async def _pop(self, key: Any, default: Any = _MISSING) -> Any:
        reply, out = await self._call("pop", {}, [dumps(key)])
        if reply["found"]:
            return loads(out[0])
        if default is _MISSING:
            raise KeyError(key)
        return default

    async def _len(self) -> int:
        reply, _ = await self._call("len")
        return int(reply["len"])

    async def _clear(self) -> None:
        await self._call("clear")

    async def _entries(self) -> list[tuple[bytes, bytes]]:
        _, out = await self._call("entries")
        return list(zip(out[0::2], out[1::2]))

    async def _keys(self) -> AsyncIterator[Any]:
        for key, _ in await self._entries():
            yield loads(key)

    async def _values(self) -> AsyncIterator[Any]:
        for _, value in await self._entries():
            yield loads(value)

    async def _items(self) -> AsyncIterator[tuple[Any, Any]]:
        for key, value in await self._entries():
            yield loads(key), loads(value)

    # --- Python's dict operators ---------------------------------------------------------------
    def __getitem__(self, key: Any) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        self.put(key, value)

    def __delitem__(self, key: Any) -> None:
        self.pop(key)

    def __contains__(self, key: Any) -> bool:
        return self.contains(key)

    def __len__(self) -> int:
        return self.len()

    def __bool__(self) -> bool:  # a handle is true, as an object; not a network call
        return True

    def __iter__(self) -> Any:
        return iter(self.keys())


def _checked(payloads: list[bytes]) -> list[bytes]:
    """Refuse an entry over the limit here, before sending it (the server checks too)."""
    from mctl.core.server.dictqueue import DICT_ENTRY_LIMIT
    from mctl.exception import RequestSizeError

    for key, value in zip(payloads[0::2], payloads[1::2]):
        if len(key) + len(value) > DICT_ENTRY_LIMIT:
            raise RequestSizeError(
                f"A Dict entry of {len(key) + len(value):,} bytes (pickled) is over the "
                f"{DICT_ENTRY_LIMIT // (1024 * 1024)} MiB limit; store large data in a "
                "mctl.Volume and put its path in the Dict.")
    return payloads
