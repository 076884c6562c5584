"""What plugins register: small frozen dataclasses, one per kind of backend.

A hook yields e.g. `Scheduler(name="local", factory=LocalScheduler)`; the base class normalises and
validates `name`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from mctl.core.launch import LaunchSpec
    from mctl.core.spec import ImageSpec
    from mctl.core.worker_output import OutputTail

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


@dataclass(frozen=True)
class WorkerInfo:
    """One worker a backend started: its task id, where it runs, and its state there."""

    worker_id: str              # the task id (`ta-...`) the worker says hello with
    host: str = ""              # node name, Slurm node or Nomad client
    state: str = "starting"     # starting | running | stopping | exited
    detail: str = ""            # backend's own id or reason (Slurm job id, alloc id, exit code)


class PoolEvents(Protocol):
    """What a backend tells core. Core decides; the backend only reports."""

    def worker_exited(self, pool_id: str, worker_id: str, exit_code: int | None,
                      detail: str, output: OutputTail | None = None) -> None:
        """A worker ended (any reason). `detail`: the last lines of its output, or the reason.
        `exit_code`: negative for a signal. `output`: each line the process wrote to its own
        stdout/stderr fed to a `mctl.core.worker_output.OutputTail` (set its `oom` when the
        backend knows the OOM killer ended it); what the worker printed but could not send
        before it died reaches the app's logs from there."""

    def placement_failed(self, pool_id: str, message: str) -> None:
        """The backend can never place this pool (e.g. "no node offers 3 GPUs of type A100")."""

    def notice(self, pool_id: str, message: str) -> None:
        """A line for the app's logs (shown once by the backend, e.g. a resource it ignores)."""


class SchedulerBackend(Protocol):
    """Places workers; core decides how many (see `mctl.core.server.autoscaler`).

    A backend never reads the control plane's state and never speaks the worker protocol: it gets a
    `LaunchSpec` per function version and counts, and reports exits and placement failures.
    """

    #: True when the backend fires `schedule=` itself (Nomad periodic jobs); else the control
    #: plane fires schedules.
    handles_schedules: bool

    #: Optional (default False). True when a function's new version replaces the old one in
    #: place (Nomad re-registers the same job and its `update` block rolls the allocations):
    #: core then calls `ensure_pool` for the new version *before* `remove_pool` of the old one,
    #: so the backend can tell that the old pool's job lives on under the new version. Backends
    #: without it (local, Slurm) get `remove_pool(old)` at once, beside the new version's start.
    updates_in_place: bool

    async def start(self, events: PoolEvents) -> None: ...
    async def ensure_pool(self, launch: LaunchSpec) -> None:
        """Make sure a pool exists for this launch description (idempotent). May raise
        `PlacementError` when no node can ever run it."""
    async def scale(self, pool_id: str, count: int) -> None:
        """Bring the pool to `count` workers that are not being stopped (start new ones with fresh
        task ids; when above `count`, stop the newest not yet running)."""
    async def stop_worker(self, pool_id: str, worker_id: str, grace_s: float) -> None:
        """Stop one worker: SIGTERM-like first (it drains), killed after `grace_s`."""
    async def remove_pool(self, pool_id: str, grace_s: float) -> None:
        """Stop every worker of the pool and forget it."""
    async def list_workers(self, pool_id: str) -> list[WorkerInfo]: ...
    async def shutdown(self) -> None: ...


def check_options(scheduler: str, options: dict[str, Any], known: tuple[str, ...]) -> None:
    """Refuse options a backend does not know (a typo must not pass silently)."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        from mctl.exception import InvalidError

        raise InvalidError(f"The {scheduler} scheduler has no option {', '.join(unknown)}; its "
                           f"options are {', '.join(known)}.")


class PlacementError(Exception):
    """Raised by a backend for a pool that no node can ever run; the message says why."""


@dataclass(frozen=True)
class Scheduler(_Registration):
    """`factory(options: dict[str, str]) -> SchedulerBackend`; options come from `mctl server
    --scheduler-option KEY=VALUE` or the server config file."""

    factory: Callable[[dict[str, Any]], SchedulerBackend]


@dataclass(frozen=True)
class ImageBuilder(_Registration):
    """`build(image: ImageSpec, ctx: BuildContext) -> dict` returns how to run it, e.g.
    {"python": "/path/bin/python"} (see `hookspecs.mctl_register_image_builders`).

    `handles(image) -> bool` says whether this builder can build the recipe.
    """

    build: Callable[[ImageSpec, Any], dict[str, Any]]
    handles: Callable[[ImageSpec], bool]


@dataclass(frozen=True)
class SecretInfo:
    """What a listing shows of a secret: never its values."""

    name: str
    keys: tuple[str, ...]
    created: float  # epoch seconds
    updated: float


@dataclass(frozen=True)
class SecretBackend(_Registration):
    """A secret store. Only `resolve` is required; a backend without `create`, `list` or `delete`
    is read-only (its secrets are managed with its own tools).

    - `resolve(name) -> dict[str, str] | None`: a named secret's values, None if unknown.
    - `list() -> list[SecretInfo]`: every secret, without values.
    - `create(name, values, overwrite) -> None`: store `values` under `name`; raise
      `mctl.exception.AlreadyExistsError` if it exists and `overwrite` is false.
    - `delete(name) -> bool`: remove the secret; False if there was none.

    A backend whose workers read values themselves, so that they never pass through the control
    plane (Vault), also gives:

    - `keys(name) -> list[str] | None`: a secret's key names (for the deploy-time check), None if
      unknown; when given, the control plane asks this instead of `resolve`.
    - `grant(app_id, names) -> None`: at deploy, let that app's workers read exactly these
      secrets (and no others); `revoke(app_id) -> None` when the app stops.
    - `worker_access(app_id, names) -> dict`: JSON-able, short-lived means for one worker to read
      these secrets (e.g. a response-wrapped token), sent to it with its task token.
    - `worker_read(access) -> dict[str, str]`: run in the worker, the values read with `access`.

    And any backend may give `configured() -> bool`: False when it is not set up here (Vault
    without VAULT_ADDR), so that a missing secret's message names only the backends in use.
    """

    resolve: Callable[[str], dict[str, str] | None]
    list: Callable[[], list[SecretInfo]] | None = None
    create: Callable[[str, dict[str, str], bool], None] | None = None
    delete: Callable[[str], bool] | None = None
    keys: Callable[[str], list[str] | None] | None = None
    grant: Callable[[str, list[str]], None] | None = None
    revoke: Callable[[str], None] | None = None
    worker_access: Callable[[str, list[str]], dict[str, Any]] | None = None
    worker_read: Callable[[dict[str, Any]], dict[str, str]] | None = None
    configured: Callable[[], bool] | None = None


@dataclass(frozen=True)
class VolumeDriver(_Registration):
    """`mount(volume_name: str, create: bool) -> str`: a host path holding the volume's files
    (`NotFoundError` when it does not exist and `create` is false).

    Optional, for `mctl volume list|delete`: `list() -> list[str]`, the volumes' names;
    `delete(name) -> bool`, remove a volume and its files (False if there was none).

    `copies=True`: the driver keeps the files itself, not in a directory workers can bind (the
    built-in `store`). Each worker then gets a private working copy at the mount path, filled at
    start and by `Volume.reload()`, published by `Volume.commit()` (and when an input returns)
    through the control plane's `/api/volumes/NAME/sync/...` routes; `files` is the object that
    serves the client API (`listdir`, `open_file`, `write`, `remove`, `copy`) and those routes
    (`manifest`, `missing`, `store_pack`, `object_path`, `commit`): see
    `mctl.plugins.volumes_store.Files`. An OSError with ENOSPC, EDQUOT or EROFS from it answers
    507, which clients raise as OSError(ENOSPC).
    """

    mount: Callable[[str, bool], str]
    list: Callable[[], list[str]] | None = None
    delete: Callable[[str], bool] | None = None
    files: Any = None
    copies: bool = False


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
