"""Volumes as directories: `local` keeps them under `$MCTL_HOME/volumes/<name>` on the control
plane's machine; `shared-path` under `$MCTL_VOLUME_SHARED_PATH/<name>`, a directory every node
mounts (NFS, Lustre, CephFS), so that workers on cluster nodes bind the same directory.

Workers see the directory itself (bound at the mount path), so a write is visible to every other
worker once the file is closed: `commit` and `reload` have nothing to move."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import mctl
from mctl.core.config import home
from mctl.core.plugin_types import VolumeDriver
from mctl.exception import InvalidError, NotFoundError


def _root() -> Path:
    return home() / "volumes"


def _shared_root() -> Path:
    """The `shared-path` driver's directory: it must exist (mounted), never be made here."""
    raw = os.environ.get("MCTL_VOLUME_SHARED_PATH", "")
    if not raw:
        raise InvalidError("The shared-path volume driver needs MCTL_VOLUME_SHARED_PATH; set it to "
                           "a directory every node mounts (e.g. an NFS export).")
    path = Path(raw)
    if not path.is_dir():
        raise InvalidError(f"MCTL_VOLUME_SHARED_PATH={raw} is not a directory here; mount the "
                           f"shared file system there (or fix the path) and start again.")
    return path


def mount(name: str, create: bool, root: Callable[[], Path] = _root) -> str:
    path = root() / name
    if not path.exists():
        if not create:
            raise NotFoundError(f"Volume {name!r} does not exist; pass create_if_missing=True or "
                                f"run `mctl volume create {name}`.")
        path.mkdir(parents=True)
    return str(path)


def list_volumes(root: Callable[[], Path] = _root) -> list[str]:
    try:
        return sorted(p.name for p in root().iterdir() if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:
        return []


def delete(name: str, root: Callable[[], Path] = _root) -> bool:
    path = root() / name
    if not path.is_dir():
        return False
    # Move aside first: the name is free at once, and a half-deleted volume is never visible.
    doomed = root() / f".deleting-{name}-{os.getpid()}"
    os.rename(path, doomed)
    shutil.rmtree(doomed)
    return True


@mctl.hookimpl
def mctl_register_volume_drivers():
    yield VolumeDriver(name="local", mount=mount, list=list_volumes, delete=delete)
    yield VolumeDriver(name="shared-path",
                       mount=lambda name, create: mount(name, create, _shared_root),
                       list=lambda: list_volumes(_shared_root),
                       delete=lambda name: delete(name, _shared_root))
