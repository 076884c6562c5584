"""Secrets stored in `$MCTL_HOME/secrets/<name>.json` (mode 600), managed by `mctl secret`."""

from __future__ import annotations

import json
import os
import re

import mctl
from mctl.core.config import home
from mctl.core.plugin_types import SecretBackend
from mctl.exception import InvalidError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _path(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidError(f"Invalid secret name {name!r}: use letters, digits, '.', '_' and '-'.")
    return str(home() / "secrets" / f"{name}.json")


def resolve(name: str) -> dict[str, str] | None:
    try:
        with open(_path(name)) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None


def save(name: str, values: dict[str, str]) -> None:
    path = _path(name)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(values, fh)
    os.replace(tmp, path)


def names() -> list[str]:
    try:
        return sorted(f[:-5] for f in os.listdir(home() / "secrets") if f.endswith(".json"))
    except FileNotFoundError:
        return []


@mctl.hookimpl
def mctl_register_secret_backends():
    yield SecretBackend(name="local", resolve=resolve)
