"""Volumes as directories under `$MCTL_HOME/volumes/<name>` on this machine."""

from __future__ import annotations

import mctl
from mctl.core.config import home
from mctl.core.plugin_types import VolumeDriver
from mctl.exception import NotFoundError


def mount(name: str, create: bool) -> str:
    path = home() / "volumes" / name
    if not path.exists():
        if not create:
            raise NotFoundError(f"Volume {name!r} does not exist; pass create_if_missing=True or "
                                f"run `mctl volume create {name}`.")
        path.mkdir(parents=True)
    return str(path)


@mctl.hookimpl
def mctl_register_volume_drivers():
    yield VolumeDriver(name="local", mount=mount)
