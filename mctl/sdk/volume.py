"""`Volume`: a named, persistent directory mounted into a function's containers."""

from __future__ import annotations

import re

from mctl.exception import InvalidError

_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$")


class Volume:
    def __init__(self, name: str, create_if_missing: bool = False,
                 environment_name: str | None = None) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidError(f"Invalid volume name {name!r}: use letters, digits, '.', '_' "
                               "and '-', up to 64 characters.")
        self.name = name
        self.create_if_missing = create_if_missing
        self.environment_name = environment_name

    @staticmethod
    def from_name(name: str, *, create_if_missing: bool = False,
                  environment_name: str | None = None) -> Volume:
        return Volume(name, create_if_missing, environment_name)

    def commit(self) -> None:
        """Make writes visible to other containers. Local directories are shared already."""

    def reload(self) -> None:
        """See other containers' commits. Local directories are shared already."""

    def __repr__(self) -> str:
        return f"Volume.from_name({self.name!r})"


def validate_mounts(volumes: dict[str, Volume]) -> dict[str, str]:
    """Check a `volumes=` mapping; return {mount path: volume name}."""
    if not isinstance(volumes, dict):
        raise InvalidError("volumes must be a dict of absolute mount path to mctl.Volume.")
    out: dict[str, str] = {}
    for path, vol in volumes.items():
        if not isinstance(path, str) or not path.startswith("/") or path.rstrip("/") == "":
            raise InvalidError(f"Volume mount path {path!r} must be an absolute path other than '/'.")
        if not isinstance(vol, Volume):
            raise InvalidError(f"volumes[{path!r}] must be a mctl.Volume, got {type(vol).__name__}.")
        out[path.rstrip("/")] = vol.name
    return out
