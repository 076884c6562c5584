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
    """Register schedulers that place workers: `MCTL_SCHEDULER=<name>` picks one.

    Example::

        import mctl
        from mctl.core.plugin_types import Scheduler

        class SlurmScheduler:
            handles_schedules = False
            def __init__(self, options): self.options = options
            async def start(self, control, server_url): ...
            async def apply_app(self, app_id, spec, version, mode): ...
            async def stop_app(self, app_id): ...
            def on_demand(self, function_id): ...
            async def shutdown(self): ...

        @mctl.hookimpl
        def mctl_register_schedulers():
            yield Scheduler(name="slurm", factory=SlurmScheduler)
    """


@hookspec
def mctl_register_image_builders() -> Iterable[ImageBuilder]:
    """Register image builders; the first whose `handles(image)` is true builds the image.

    Example::

        import mctl
        from mctl.core.plugin_types import ImageBuilder

        @mctl.hookimpl
        def mctl_register_image_builders():
            yield ImageBuilder(
                name="conda",
                handles=lambda image: image.recipe["base"] == "micromamba",
                build=lambda image: {"python": "/opt/envs/" + image.image_id + "/bin/python"},
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
    """Register volume drivers; `MCTL_VOLUME_DRIVER=<name>` picks one (default `local`).

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
