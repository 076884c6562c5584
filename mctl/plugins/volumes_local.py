"""Volumes as directories under `$MCTL_HOME/volumes/<name>` on this machine."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import mctl
from mctl.core.config import home
from mctl.core.plugin_types import VolumeDriver
from mctl.exception import NotFoundError


def _root() -> Path:
    return home() / "volumes"


def mount(name: str, create: bool) -> str:
    path = _root() / name
    if not path.exists():
        if not create:
            raise NotFoundError(f"Volume {name!r} does not exist; pass create_if_missing=True or "
                                f"run `mctl volume create {name}`.")
        path.mkdir(parents=True)
    return str(path)


def list_volumes() -> list[str]:
    try:
        return sorted(p.name for p in _root().iterdir() if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:
        return []


def delete(name: str) -> bool:
    path = _root() / name
    if not path.is_dir():
        return False
    # Move aside first: the name is free at once, and a half-deleted volume is never visible.
    doomed = _root() / f".deleting-{name}-{os.getpid()}"
    os.rename(path, doomed)
    shutil.rmtree(doomed)
    return True


@mctl.hookimpl
def mctl_register_volume_drivers():
    yield VolumeDriver(name="local", mount=mount, list=list_volumes, delete=delete)
