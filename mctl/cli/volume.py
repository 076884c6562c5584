"""`mctl volume create|list|ls|put|get|rm|delete`: a volume's files through the control plane."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

import click

from mctl.exception import Error


def _run(fn: Callable[[], Any]) -> Any:
    """Errors a user can fix become one-line messages."""
    try:
        return fn()
    except (Error, FileNotFoundError, FileExistsError, IsADirectoryError) as exc:
        raise click.ClickException(str(exc)) from None


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


@click.group(short_help="Manage volumes and their files.")
def volume() -> None:
    """Manage volumes: named directories that functions mount (`volumes={"/data": vol}`).

    The files live with the control plane (started in the background if none runs); these
    commands read and write them through it."""


@volume.command("create")
@click.argument("name")
def volume_create(name: str) -> None:
    """Create volume NAME."""
    from mctl.sdk.volume import create_volume

    _run(lambda: create_volume(name))
    click.echo(f"Created volume {name}")


@volume.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def volume_list(as_json: bool) -> None:
    """List volumes."""
    from mctl.sdk.volume import list_volumes

    rows = _run(list_volumes)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'NAME':<32} CREATED")
    for row in rows:
        click.echo(f"{row['name']:<32} {_when(row['created'])}")


@volume.command("ls")
@click.argument("name")
@click.argument("path", default="/")
@click.option("-r", "--recursive", is_flag=True, help="List everything below PATH.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def volume_ls(name: str, path: str, recursive: bool, as_json: bool) -> None:
    """List the files at PATH (default /) in volume NAME."""
    from mctl.sdk.volume import Volume

    entries = _run(lambda: Volume.from_name(name).listdir(path, recursive=recursive))
    if as_json:
        click.echo(json.dumps([{"path": e.path, "type": e.type.name.lower(), "mtime": e.mtime,
                                "size": e.size} for e in entries], indent=2))
        return
    click.echo(f"{'TYPE':<5} {'SIZE':>12}  {'MODIFIED':<19}  PATH")
    for e in entries:
        kind = "dir" if e.type.name == "DIRECTORY" else "file" if e.type.name == "FILE" else "link"
        suffix = "/" if kind == "dir" else ""
        click.echo(f"{kind:<5} {e.size:>12}  {_when(e.mtime)}  {e.path}{suffix}")


@volume.command("put")
@click.argument("name")
@click.argument("local", type=click.Path(exists=True))
@click.argument("remote", default="/")
@click.option("-f", "--force", is_flag=True, help="Replace files that exist.")
def volume_put(name: str, local: str, remote: str, force: bool) -> None:
    """Upload LOCAL (a file or a directory) to REMOTE in volume NAME. A REMOTE ending in '/'
    is a directory: the file keeps its name there."""
    from mctl.sdk.volume import Volume

    def upload() -> None:
        with Volume.from_name(name).batch_upload(force=force) as batch:
            if os.path.isdir(local):
                batch.put_directory(local, remote)
            else:
                target = remote + os.path.basename(local) if remote.endswith("/") else remote
                batch.put_file(local, target)

    _run(upload)
    click.echo(f"Uploaded {local} to {name}:{remote}")


@volume.command("get")
@click.argument("name")
@click.argument("remote")
@click.argument("local", default=".")
@click.option("-f", "--force", is_flag=True, help="Replace local files that exist.")
def volume_get(name: str, remote: str, local: str, force: bool) -> None:
    """Download REMOTE of volume NAME to LOCAL (a directory, a file, or '-' for stdout).

    A directory REMOTE is downloaded with everything below it, as Modal's `volume get`: into
    LOCAL under its own name when LOCAL is a directory, else to LOCAL itself."""
    from mctl.sdk.volume import Volume

    vol = Volume.from_name(name)
    entries = _run(lambda: vol.listdir(remote, recursive=True))
    key = remote.strip("/")  # a file lists as itself; a directory as what is below it
    is_file = (len(entries) == 1 and entries[0].path.strip("/") == key
               and entries[0].type.name != "DIRECTORY")
    if local == "-":
        if not is_file:
            raise click.ClickException(f"{remote!r} is a directory in volume {name!r}; '-' "
                                       "writes one file's bytes: give a local directory to "
                                       "download it into.")
        _run(lambda: vol.read_file_into_fileobj(remote, sys.stdout.buffer))
        return
    if not is_file:
        _get_directory(vol, name, remote, local, force, entries)
        return
    target = os.path.join(local, os.path.basename(remote.rstrip("/"))) \
        if os.path.isdir(local) else local
    if os.path.exists(target) and not force:
        raise click.ClickException(f"{target} exists; pass --force to replace it.")
    size = _download(vol, remote, target)
    click.echo(f"Downloaded {name}:{remote} to {target} ({size} bytes)", err=True)


def _download(vol: Any, remote: str, target: str) -> int:
    """One file, written whole or not at all."""
    tmp = f"{target}.mctl-part"
    try:
        with open(tmp, "wb") as fh:
            size = _run(lambda: vol.read_file_into_fileobj(remote, fh))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return size


def _get_directory(vol: Any, name: str, remote: str, local: str, force: bool,
                   entries: list[Any]) -> None:
    """Directory `remote` with everything below it: to LOCAL/<its name> when LOCAL is a
    directory (LOCAL itself for the volume's root), else to LOCAL, made. Existing local files
    are checked first: without --force none is replaced and nothing is written."""
    key = remote.strip("/")
    base = local
    if os.path.isdir(local) and key:
        base = os.path.join(local, os.path.basename(key))
    plan = []
    for e in entries:
        rel = e.path.strip("/")[len(key):].lstrip("/") if key else e.path.strip("/")
        target = os.path.join(base, *rel.split("/"))
        kind = e.type.name
        if kind == "DIRECTORY":
            if os.path.exists(target) and not os.path.isdir(target):
                raise click.ClickException(f"{target} exists and is not a directory; move it "
                                           "away to download the directory there.")
        elif kind == "FILE":
            if os.path.isdir(target):
                raise click.ClickException(f"{target} is a local directory; volume file "
                                           f"{e.path} cannot replace it.")
            if os.path.exists(target) and not force:
                raise click.ClickException(f"{target} exists; pass --force to replace it (and "
                                           "every other local file the download would replace).")
            plan.append((e, target))
    os.makedirs(base, exist_ok=True)
    for e in entries:
        if e.type.name == "DIRECTORY":
            rel = e.path.strip("/")[len(key):].lstrip("/") if key else e.path.strip("/")
            os.makedirs(os.path.join(base, *rel.split("/")), exist_ok=True)
    total = 0
    for e, target in plan:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        total += _download(vol, "/" + e.path.strip("/"), target)
    skipped = sum(1 for e in entries if e.type.name not in ("FILE", "DIRECTORY"))
    note = f"; {skipped} symlink{'s' if skipped != 1 else ''} skipped" if skipped else ""
    click.echo(f"Downloaded {name}:{remote} to {base} ({len(plan)} file"
               f"{'s' if len(plan) != 1 else ''}, {total} bytes{note})", err=True)


@volume.command("rm")
@click.argument("name")
@click.argument("path")
@click.option("-r", "--recursive", is_flag=True, help="Remove a directory and its contents.")
def volume_rm(name: str, path: str, recursive: bool) -> None:
    """Remove PATH from volume NAME."""
    from mctl.sdk.volume import Volume

    try:
        _run(lambda: Volume.from_name(name).remove_file(path, recursive=recursive))
    except click.ClickException as exc:
        if not recursive and "is a directory" in exc.message:
            raise click.ClickException(f"{path!r} is a directory in volume {name!r}; pass "
                                       "-r/--recursive to remove it and its contents.") from None
        raise
    click.echo(f"Removed {name}:{path}")


@volume.command("delete")
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--allow-missing", is_flag=True, help="Succeed when there is no such volume.")
def volume_delete(name: str, yes: bool, allow_missing: bool) -> None:
    """Delete volume NAME and every file in it."""
    from mctl.sdk.volume import delete_volume

    if not yes:
        click.confirm(f"Delete volume {name} and all its files?", abort=True)
    found = _run(lambda: delete_volume(name))
    if not found and not allow_missing:
        raise click.ClickException(f"No volume named {name!r}; `mctl volume list` shows them.")
    click.echo(f"Deleted volume {name}" if found else f"No volume named {name}")
