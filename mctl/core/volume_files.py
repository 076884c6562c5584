"""A volume's files, as the control plane serves them to clients (`Volume.listdir`, `mctl volume`).

Works on the directory the volume driver's `mount` gives, so any driver with a host path works.
Paths are relative to the volume's root ("/a/b" and "a/b" are the same file) and never leave it:
`..` and symlinks that point outside are refused. Writes go to a temporary file in the same
directory and are renamed into place, so a reader sees the old file or the new one, never half.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
from pathlib import Path
from typing import Any, BinaryIO

from mctl.exception import InvalidError, NotFoundError

_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$")
CHUNK = 1 << 20


def driver_name() -> str:
    """`MCTL_VOLUME_DRIVER`; else `shared-path` when `MCTL_VOLUME_SHARED_PATH` names a shared
    directory; else `store` (contents in the control plane's store, copies in workers) -- except
    on a home that already keeps volumes with `local`, the default before `store`: an upgrade
    must not hide them (see `older_default_notice`)."""
    explicit = os.environ.get("MCTL_VOLUME_DRIVER", "").strip()
    if explicit:
        return explicit
    if os.environ.get("MCTL_VOLUME_SHARED_PATH"):
        return "shared-path"
    from mctl.core.config import home

    return "local" if _older_local_volumes(str(home())) else "store"


@functools.lru_cache(maxsize=None)
def _older_local_volumes(home: str) -> tuple[str, ...]:
    """Volumes in the `local` driver's directory; decided once per process and home."""
    try:
        return tuple(sorted(p.name for p in (Path(home) / "volumes").iterdir()
                            if p.is_dir() and not p.name.startswith(".")))
    except OSError:
        return ()


def older_default_notice() -> str | None:
    """A line for the server's log when volumes of the `local` driver (the default before
    `store`) kept this home on `local`."""
    if os.environ.get("MCTL_VOLUME_DRIVER", "").strip() or driver_name() != "local":
        return None
    from mctl.core.config import home

    old = home() / "volumes"
    names = _older_local_volumes(str(home()))
    return (f"Volumes {', '.join(names[:5])}{' ...' if len(names) > 5 else ''} are in {old}: "
            "this server keeps the `local` volume driver (the default before `store`) so they stay "
            "where they are. To move to `store` (volumes on nodes without a shared filesystem), "
            "copy each with `mctl volume create NAME` and `mctl volume put NAME "
            f"{old}/NAME /` on a server started with MCTL_VOLUME_DRIVER=store, then remove {old}.")


def driver() -> Any:
    from mctl.core import plugins

    return plugins.find("mctl_register_volume_drivers", driver_name())


def _files() -> Any:
    """The driver's own client API (a driver that keeps files itself), or None: a directory."""
    return driver().files


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidError(f"Invalid volume name {name!r}: use letters, digits, '.', '_' and '-', "
                           "up to 64 characters.")
    return name


def root(name: str, create: bool = False) -> Path:
    """The volume's directory; NotFoundError when it does not exist and `create` is false."""
    return Path(driver().mount(check_name(name), create)).resolve()


def resolve(base: Path, path: str) -> Path:
    """`path` inside the volume at `base`; an escape is an error."""
    relative = (path or "").lstrip("/")
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise InvalidError(f"Path {path!r} leaves the volume; use a path inside it, such as "
                           "'/data/file.txt'.")
    return target


def _entry(base: Path, path: Path) -> dict[str, Any]:
    st = path.lstat()
    kind = "symlink" if path.is_symlink() else "directory" if path.is_dir() else "file"
    return {"path": path.relative_to(base).as_posix(), "type": kind, "mtime": int(st.st_mtime),
            "size": st.st_size if kind == "file" else 0}


def listdir(name: str, path: str, recursive: bool) -> list[dict[str, Any]]:
    """Entries at `path` (a directory's children, or the file itself), sorted by path."""
    if (files := _files()) is not None:
        return files.listdir(check_name(name), path, recursive)
    base = root(name)
    target = resolve(base, path)
    if not target.exists():
        raise FileNotFoundError(f"No file or directory {path!r} in volume {name!r}.")
    if not target.is_dir():
        return [_entry(base, target)]
    if not recursive:
        return sorted((_entry(base, p) for p in target.iterdir() if not _hidden(p)),
                      key=lambda e: e["path"])
    out = []
    for dirpath, dirnames, filenames in os.walk(target):
        dirnames[:] = [d for d in dirnames if not _hidden(Path(d))]
        for item in (*dirnames, *filenames):
            if not _hidden(Path(item)):
                out.append(_entry(base, Path(dirpath) / item))
    return sorted(out, key=lambda e: e["path"])


def _hidden(path: Path) -> bool:
    return path.name.startswith(".mctl-upload-")  # a write in progress


def open_file(name: str, path: str) -> Path:
    if (files := _files()) is not None:
        return files.open_file(check_name(name), path)
    target = resolve(root(name), path)
    if not target.is_file():
        raise FileNotFoundError(f"No file {path!r} in volume {name!r}"
                                + (" (it is a directory)." if target.is_dir() else "."))
    return target


def write_target(name: str, path: str, force: bool, create: bool = False) -> Path:
    """Where a file upload goes: its parents are made; an existing file without `force` is a
    FileExistsError, a directory there an error."""
    base = root(name, create)
    target = resolve(base, path)
    if target == base or target.is_dir():
        raise IsADirectoryError(f"{path!r} is a directory in volume {name!r}; give a file path.")
    if target.exists() and not force:
        raise FileExistsError(f"{path!r} exists in volume {name!r}; pass force=True (--force) "
                              "to replace it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def temp_for(target: Path) -> Path:
    return target.with_name(f".mctl-upload-{target.name}.{os.getpid()}.{os.urandom(4).hex()}")


def write_file(name: str, path: str, force: bool, create: bool, stream: BinaryIO,
               mode: int | None = None) -> int:
    """Upload one file into the volume (atomically: a reader sees the old file or the new one);
    returns the bytes written."""
    if (files := _files()) is not None:
        return files.write(check_name(name), path, force, create, stream, mode)
    return write_stream(write_target(name, path, force, create), stream, mode)


def write_stream(target: Path, stream: BinaryIO, mode: int | None = None) -> int:
    """Copy `stream` to `target` atomically; returns the bytes written."""
    tmp = temp_for(target)
    written = 0
    try:
        with open(tmp, "wb") as fh:
            while chunk := stream.read(CHUNK):
                fh.write(chunk)
                written += len(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode & 0o7777)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return written


def remove(name: str, path: str, recursive: bool) -> None:
    if (files := _files()) is not None:
        return files.remove(check_name(name), path, recursive)
    base = root(name)
    target = resolve(base, path)
    if target == base:
        raise InvalidError("Removing a volume's root is `mctl volume delete NAME`; give a path "
                           "inside the volume.")
    if not target.exists() and not target.is_symlink():
        raise FileNotFoundError(f"No file or directory {path!r} in volume {name!r}.")
    if target.is_dir() and not target.is_symlink():
        if not recursive:
            raise IsADirectoryError(f"{path!r} is a directory in volume {name!r}; pass "
                                    "recursive=True (-r) to remove it and its contents.")
        shutil.rmtree(target)
    else:
        target.unlink()


def copy(name: str, src_paths: list[str], dst_path: str) -> None:
    """Copy files or directories within a volume. With several sources, or a destination that is
    a directory (or ends in '/'), each source goes into it under its own name."""
    if (files := _files()) is not None:
        return files.copy(check_name(name), src_paths, dst_path)
    base = root(name)
    sources = [resolve(base, p) for p in src_paths]
    for given, src in zip(src_paths, sources):
        if not src.exists():
            raise FileNotFoundError(f"No file or directory {given!r} in volume {name!r}.")
    dst = resolve(base, dst_path)
    into = len(sources) > 1 or dst.is_dir() or dst_path.endswith("/")
    if into:
        dst.mkdir(parents=True, exist_ok=True)
    for src in sources:
        target = dst / src.name if into else dst
        if src.is_dir():
            shutil.copytree(src, target, dirs_exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_for(target)
            try:
                shutil.copy2(src, tmp)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)


def list_volumes() -> list[dict[str, Any]]:
    d = driver()
    if d.list is None:
        raise InvalidError(f"Volume driver {d.name!r} cannot list volumes; use its own tools.")
    out = []
    for name in d.list():
        try:
            created = Path(d.mount(name, False)).stat().st_mtime
        except (OSError, NotFoundError):
            continue
        out.append({"name": name, "created": created})
    return out


def create(name: str, exist_ok: bool) -> bool:
    """Make the volume; False when it existed (an error unless `exist_ok`)."""
    from mctl.exception import AlreadyExistsError

    check_name(name)
    try:
        root(name)
    except NotFoundError:
        root(name, create=True)
        return True
    if not exist_ok:
        raise AlreadyExistsError(f"Volume {name!r} exists; use it, or delete it first with "
                                 f"`mctl volume delete {name}`.")
    return False


def delete(name: str) -> bool:
    d = driver()
    if d.delete is None:
        raise InvalidError(f"Volume driver {d.name!r} cannot delete volumes; use its own tools.")
    return d.delete(check_name(name))
