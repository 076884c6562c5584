"""The launch description: everything a scheduler backend needs to start workers of one function
version, and nothing it must not see (no secret values: workers fetch those with their task token).

Core builds one `LaunchSpec` per function version (`build_launch`); every backend renders this one
description — a subprocess, a Slurm job, a Nomad task group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from mctl.core.spec import AppSpec, FunctionSpec, GpuRequest


@dataclass(frozen=True)
class Mount:
    """A volume at a path inside the worker; `host_path` is set when the driver binds a directory
    (`local`, `shared-path`); `synced` when the worker gets a working copy instead (`store`:
    the backend binds `volume_sync.sources(mounts, task_id)` there)."""

    path: str
    volume: str
    host_path: str | None = None
    read_only: bool = False
    synced: bool = False


@dataclass(frozen=True)
class RestartPolicy:
    """How a backend treats a worker that exits: core restarts start failures itself (with back-off),
    so backends should not restart on their own; `attempts` feeds Nomad's `restart` block."""

    attempts: int = 0
    delay_s: float = 1.0


@dataclass(frozen=True)
class LaunchSpec:
    pool_id: str                   # "<function_id>-v<version>": one pool per function version
    app_id: str
    app_name: str
    version: int
    function_id: str
    function: str                  # the function's tag, e.g. "square" or "Model"
    command: tuple[str, ...]       # starts mctl's worker runtime
    env: Mapping[str, str]         # no secret values; add `MCTL_TASK_ID` per worker (`worker_env`)
    image: str                     # what the image builder produced: a python path or an image ref
    image_id: str
    runtime: str = "process"       # "process"/"venv": run `command` as is; "oci": run it in `image`
    files: tuple[tuple[str, str], ...] = ()  # (host path, path inside): added when a worker starts
    # "host": a container borrows the host's mctl environment (same Python version); "image":
    # the image has mctl's dependencies (another Python version), only mctl's package is lent.
    python_deps: str = "host"
    cpu: float | None = None
    memory_mb: int | None = None
    gpu: GpuRequest | None = None
    mounts: tuple[Mount, ...] = ()
    secret_refs: tuple[str, ...] = ()  # names only; values never travel in a launch description
    timeout_s: float = 300.0       # one input's limit; the worker enforces it
    restart: RestartPolicy = RestartPolicy()
    labels: Mapping[str, str] = field(default_factory=dict)
    # The function's own spec (schedule, retries, scaling bounds), for backends that render the
    # whole function into their own job format (Nomad); never holds secret values.
    spec: FunctionSpec | None = None

    def worker_env(self, task_id: str) -> dict[str, str]:
        """The environment of one worker: the shared one plus its own task id."""
        env = dict(self.env)
        env["MCTL_TASK_ID"] = env["MODAL_TASK_ID"] = task_id
        return env

    @property
    def job_name(self) -> str:
        """A name an operator recognises in `squeue` or `nomad status`: mctl-<app>-<function>."""
        return f"mctl-{self.app_name}-{self.function}".replace("_", "-").lower()[:120]


def pool_id(function_id: str, version: int) -> str:
    return f"{function_id}-v{version}"


def build_launch(app_id: str, app: AppSpec, fspec: FunctionSpec, version: int, *, server_url: str,
                 built_image: dict[str, Any], task_token: str | None, environment: str,
                 region: str, provider: str, mounts: tuple[Mount, ...] = ()) -> LaunchSpec:
    """The one launch description of a function version."""
    env: dict[str, str] = {}
    env.update(built_image.get("env") or {})
    env.update(fspec.env)
    for key, value in {"IMAGE_ID": fspec.image_id, "ENVIRONMENT": environment, "REGION": region,
                       "CLOUD_PROVIDER": provider, "IS_REMOTE": "1"}.items():
        env[f"MCTL_{key}"] = env[f"MODAL_{key}"] = value
    env.update({"MCTL_SERVER_URL": server_url, "MCTL_APP_ID": app_id, "MCTL_APP_NAME": app.name,
                "MCTL_APP_VERSION": str(version), "MCTL_FUNCTION_ID": fspec.function_id,
                "PYTHONUNBUFFERED": "1"})
    if task_token:
        env["MCTL_TASK_TOKEN"] = task_token
    import os

    if os.environ.get("MCTL_CA_FILE"):  # workers verify the server's certificate with it
        env["MCTL_CA_FILE"] = os.environ["MCTL_CA_FILE"]
    if mounts and all(m.host_path for m in mounts):
        import json

        env["MCTL_VOLUMES"] = json.dumps({m.path: m.host_path for m in mounts})
    from mctl.core.volume_sync import launch_env

    env.update(launch_env(mounts))
    python = built_image.get("python") or "python3"
    res = fspec.resources
    labels = {"mctl.app": app.name, "mctl.app_id": app_id, "mctl.version": str(version),
              "mctl.function": fspec.tag, "mctl.function_id": fspec.function_id}
    return LaunchSpec(
        pool_id=pool_id(fspec.function_id, version), app_id=app_id, app_name=app.name,
        version=version, function_id=fspec.function_id, function=fspec.tag,
        command=(python, "-m", "mctl.core.runtime"), env=MappingProxyType(env),
        image=built_image.get("image") or python, image_id=fspec.image_id,
        runtime=built_image.get("runtime") or "process",
        files=tuple((host, inside) for host, inside in built_image.get("files") or ()),
        python_deps=built_image.get("python_deps") or "host", cpu=res.cpu,
        memory_mb=res.memory_mb, gpu=res.gpu, mounts=mounts,
        secret_refs=tuple(ref.get("name", "<inline>") for ref in fspec.secrets),
        timeout_s=fspec.timeout, labels=MappingProxyType(labels), spec=fspec)
