"""Every hook mctl calls, in one place. A plugin implements some of them with `@mctl.hookimpl`.

Registration hooks return (or yield) small frozen dataclasses from `mctl.core.plugin_types`;
a hook may return one object, a list, or be a generator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import pluggy

if TYPE_CHECKING:
    import click

    from mctl.core.plugin_types import GpuDevice, ImageBuilder, Scheduler, SecretBackend, VolumeDriver

hookspec = pluggy.HookspecMarker("mctl")
hookimpl = pluggy.HookimplMarker("mctl")


@hookspec
def mctl_register_schedulers() -> Iterable[Scheduler]:
    """Register scheduler backends that place workers: `mctl server --scheduler NAME` (or
    `MCTL_SCHEDULER=NAME`) picks one; `--scheduler-option KEY=VALUE` fills `options`.

    Core decides how many workers each function version needs and hands the backend one
    `LaunchSpec` per version (`mctl.core.launch`): the command, environment (no secret values),
    image, cpu, memory, GPU request, mounts and labels. The backend starts and stops workers and
    reports exits (`events.worker_exited`) and what it can never place (raise
    `PlacementError` from `ensure_pool`, or call `events.placement_failed`). It never reads the
    control plane's state nor speaks the worker protocol. See `plugin_types.SchedulerBackend`.

    The example is a complete backend that runs each worker as a local process.

    Example::

        import asyncio, os
        import mctl
        from mctl.core import ids
        from mctl.core.plugin_types import Scheduler, WorkerInfo

        class ProcessBackend:
            handles_schedules = False  # core fires `schedule=` for us

            def __init__(self, options):
                self.options = options
                self.launches = {}  # pool id -> LaunchSpec
                self.procs = {}     # pool id -> {task id: asyncio.subprocess.Process}
                self.stopping = set()

            async def start(self, events):
                self.events = events

            async def ensure_pool(self, launch):
                self.launches[launch.pool_id] = launch
                self.procs.setdefault(launch.pool_id, {})

            def _live(self, pool_id):
                return [t for t in self.procs.get(pool_id, {}) if t not in self.stopping]

            async def scale(self, pool_id, count):
                launch, live = self.launches[pool_id], self._live(pool_id)
                for _ in range(count - len(live)):
                    task_id = ids.new_id("task")
                    env = {**os.environ, **launch.worker_env(task_id)}
                    proc = await asyncio.create_subprocess_exec(*launch.command, env=env)
                    self.procs[pool_id][task_id] = proc
                    asyncio.get_running_loop().create_task(self._watch(pool_id, task_id, proc))
                for task_id in live[count:]:
                    await self.stop_worker(pool_id, task_id, 30)

            async def _watch(self, pool_id, task_id, proc):
                code = await proc.wait()
                self.procs.get(pool_id, {}).pop(task_id, None)
                self.stopping.discard(task_id)
                self.events.worker_exited(pool_id, task_id, code, "")

            async def stop_worker(self, pool_id, worker_id, grace_s):
                proc = self.procs.get(pool_id, {}).get(worker_id)
                if proc is not None and proc.returncode is None:
                    self.stopping.add(worker_id)
                    proc.terminate()  # the worker finishes its inputs, runs @exit, exits
                    loop = asyncio.get_running_loop()
                    loop.call_later(grace_s, lambda: proc.returncode is None and proc.kill())

            async def remove_pool(self, pool_id, grace_s):
                for task_id in list(self.procs.get(pool_id, {})):
                    await self.stop_worker(pool_id, task_id, grace_s)
                self.launches.pop(pool_id, None)

            async def list_workers(self, pool_id):
                return [WorkerInfo(t, "localhost", "stopping" if t in self.stopping else "running")
                        for t in self.procs.get(pool_id, {})]

            async def shutdown(self):
                for pool_id in list(self.procs):
                    await self.remove_pool(pool_id, 5)

        @mctl.hookimpl
        def mctl_register_schedulers():
            yield Scheduler(name="processes", factory=ProcessBackend)
    """


@hookspec
def mctl_register_image_builders() -> Iterable[ImageBuilder]:
    """Register image builders; the first whose `handles(image)` is true builds the image (the
    built-in `oci` builder, which handles every recipe, is asked last).

    `build(image, ctx)` runs in the control plane at deploy, in a thread; it logs with
    `ctx.say(line)` or runs commands with `ctx.run(argv, what=...)` (output streamed to the build
    log, a failure raises `mctl.core.images.ImageBuildError` with the log's tail), reads the
    recipe's files with `ctx.blob_path(blob_id)`, and returns how to run the image: `python`, and
    optionally `env`, `runtime` ("process", "venv" or "oci"), `image` (an OCI reference),
    `workdir` and `files` (host path, container path) to bind at start. It should skip the work
    when its cache already holds `image.image_id`.

    Example::

        import mctl
        from mctl.core.plugin_types import ImageBuilder

        @mctl.hookimpl
        def mctl_register_image_builders():
            yield ImageBuilder(
                name="conda",
                handles=lambda image: (image.recipe["base"] or {}).get("kind") == "micromamba",
                build=lambda image, ctx: {"python": f"/opt/envs/{image.image_id}/bin/python"},
            )
    """


@hookspec
def mctl_register_secret_backends() -> Iterable[SecretBackend]:
    """Register secret stores. `Secret.from_name(n)` asks each in order until one knows `n`;
    `MCTL_SECRET_BACKEND=<name>` (default `local`) picks the one that `mctl secret create/list/
    delete` and the values given in code (`Secret.from_dict`, ...) are written to.

    Only `resolve` is required; leave out `list`, `create` and `delete` for a read-only store.
    `list` must never return values. `create` raises `mctl.exception.AlreadyExistsError` when
    the name exists and `overwrite` is false; `delete` returns False when there was nothing.

    Example::

        import json, os, time
        import mctl
        from mctl.core.plugin_types import SecretBackend, SecretInfo
        from mctl.exception import AlreadyExistsError

        ROOT = "/etc/mysecrets"

        def resolve(name):
            try:
                with open(f"{ROOT}/{name}.json") as fh:
                    return json.load(fh)
            except FileNotFoundError:
                return None

        def list_secrets():
            out = []
            for file in sorted(os.listdir(ROOT)):
                name, stat = file.removesuffix(".json"), os.stat(f"{ROOT}/{file}")
                out.append(SecretInfo(name=name, keys=tuple(sorted(resolve(name))),
                                      created=stat.st_ctime, updated=stat.st_mtime))
            return out

        def create(name, values, overwrite):
            flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
            try:
                fd = os.open(f"{ROOT}/{name}.json", flags, 0o600)
            except FileExistsError:
                raise AlreadyExistsError(f"Secret {name!r} exists; pass --force to replace it.")
            with os.fdopen(fd, "w") as fh:
                json.dump(values, fh)

        def delete(name):
            try:
                os.unlink(f"{ROOT}/{name}.json")
                return True
            except FileNotFoundError:
                return False

        @mctl.hookimpl
        def mctl_register_secret_backends():
            yield SecretBackend(name="etc-json", resolve=resolve, list=list_secrets,
                                create=create, delete=delete)
    """


@hookspec
def mctl_register_volume_drivers() -> Iterable[VolumeDriver]:
    """Register volume drivers; `MCTL_VOLUME_DRIVER=<name>` picks one. Built in: `store` (the
    default: contents in the control plane's store, a working copy per worker), `shared-path`
    (under `$MCTL_VOLUME_SHARED_PATH`, the default when that is set) and `local`
    (`$MCTL_HOME/volumes`). Process workers get the host path bound at the mount path in a
    mount namespace (`mctl.core.mount_namespace`); see `VolumeDriver.copies` for drivers that
    keep the files themselves.

    Example::

        import mctl
        from mctl.core.plugin_types import VolumeDriver

        @mctl.hookimpl
        def mctl_register_volume_drivers():
            yield VolumeDriver(name="nfs", mount=lambda name, create: f"/mnt/nfs/{name}")
    """


@hookspec
def mctl_register_gpu_devices() -> Iterable[GpuDevice]:
    """Register GPU probes; `detect()` must not raise and should answer [] when absent.

    Example::

        import mctl
        from mctl.core.plugin_types import GpuDevice, GpuInfo

        @mctl.hookimpl
        def mctl_register_gpu_devices():
            yield GpuDevice(name="fake", detect=lambda: [GpuInfo("acme", "X1", 16384, 0)])
    """


@hookspec
def mctl_register_commands(cli: click.Group) -> None:
    """Add commands to the `mctl` CLI.

    Example::

        import click, mctl

        @mctl.hookimpl
        def mctl_register_commands(cli):
            @cli.command()
            def hello():
                click.echo("hello from a plugin")
    """
