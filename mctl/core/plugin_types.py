"""What plugins register: small frozen dataclasses, one per kind of backend.

A hook yields e.g. `Scheduler(name="local", factory=LocalScheduler)`; the base class normalises and
validates `name`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from mctl.core.server.control import ControlPlane
    from mctl.core.spec import AppSpec, ImageSpec

_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


@dataclass(frozen=True)
class _Registration:
    name: str

    def __post_init__(self) -> None:
        name = self.name.strip().lower() if isinstance(self.name, str) else self.name
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"{type(self).__name__} name {self.name!r} must be lowercase letters, "
                             "digits, '-' or '_', starting with a letter.")
        object.__setattr__(self, "name", name)


class SchedulerBackend(Protocol):
    """Places workers for the functions of running apps."""

    #: True when the backend fires `schedule=` itself (Nomad periodic jobs); else the control
    #: plane fires schedules.
    handles_schedules: bool

    async def start(self, control: ControlPlane, server_url: str) -> None: ...
    async def apply_app(self, app_id: str, spec: AppSpec, version: int, mode: str) -> None: ...
    async def stop_app(self, app_id: str) -> None: ...
    def on_demand(self, function_id: str) -> None: ...
    async def shutdown(self) -> None: ...


@dataclass(frozen=True)
class Scheduler(_Registration):
    """`factory(options: dict) -> SchedulerBackend`."""

    factory: Callable[[dict[str, Any]], SchedulerBackend]


@dataclass(frozen=True)
class ImageBuilder(_Registration):
    """`build(image: ImageSpec) -> dict` returns how to run it, e.g. {"python": "/path/bin/python"}.

    `handles(image) -> bool` says whether this builder can build the recipe.
    """

    build: Callable[[ImageSpec], dict[str, Any]]
    handles: Callable[[ImageSpec], bool]


@dataclass(frozen=True)
class SecretBackend(_Registration):
    """`resolve(name: str) -> dict[str, str] | None`: a named secret's values, None if unknown."""

    resolve: Callable[[str], dict[str, str] | None]


@dataclass(frozen=True)
class VolumeDriver(_Registration):
    """`mount(volume_name: str, create: bool) -> str`: a host path holding the volume's files."""

    mount: Callable[[str, bool], str]


@dataclass(frozen=True)
class GpuInfo:
    vendor: str
    model: str
    memory_mb: int
    index: int


@dataclass(frozen=True)
class GpuDevice(_Registration):
    """`detect() -> list[GpuInfo]`: the accelerators on this machine; [] when none or no driver."""

    detect: Callable[[], list[GpuInfo]]
