"""The `store` volume driver: committed volume contents kept by the control plane,
content-addressed, so volumes work on nodes that share no file system with it (or each other).

Layout under `$MCTL_VOLUME_STORE` (default `$MCTL_HOME/volume-store`, on the control plane's host):

    objects/ab/ab12...      one file per distinct content, named by its sha256; never changed
    volumes/NAME/manifest.json   the committed tree: {"version": n, "entries": {path: entry}}
    volumes/NAME/.lock      serialises commits to one volume

An entry is {"type": "file", "sha", "size", "mode", "mtime"}, {"type": "dir", "mode", "mtime"} or
{"type": "symlink", "target"}. A commit uploads the objects it lacks first, then replaces the
manifest in one `rename`: a commit that fails (a full disk) leaves the last one whole. Each worker
works on its own copy (`mctl.core.volume_sync`); a commit applies that worker's changes (files
added, changed, removed since its last commit or reload) onto the newest manifest, whole files,
so the last commit of a file wins and no file is ever a mix of two.

The client API (`Volume.listdir`, `read_file`, `batch_upload`, `mctl volume ...`) works on the
manifest through `Files` below.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable, Iterator

import mctl
from mctl.core.config import home
from mctl.core.plugin_types import VolumeDriver
from mctl.core.volume_sync import apply
from mctl.exception import InvalidError, NotFoundError

CHUNK = 1 << 20
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


class StoreFull(OSError):
    """The volume store's file system is full (or read-only): nothing was changed."""


def root() -> Path:
    return Path(os.environ.get("MCTL_VOLUME_STORE") or home() / "volume-store")


def _volume_dir(name: str) -> Path:
    return root() / "volumes" / name


def object_path(sha: str) -> Path:
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise InvalidError(f"{sha!r} is not a sha256 object name.")
    return root() / "objects" / sha[:2] / sha


def _store_error(exc: OSError, doing: str) -> OSError:
    """A clear error for a full or read-only store; other errors as they are."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        why = "is full" if exc.errno != errno.EROFS else "is read-only"
        return StoreFull(exc.errno, f"The control plane's volume store ({root()}) {why} "
                         f"({os.strerror(exc.errno)}) while {doing}: nothing was changed and "
                         "the last commit is intact. Free space there (or move "
                         "MCTL_VOLUME_STORE to a larger disk) and commit again.")
    return exc


# --- manifests ------------------------------------------------------------------------------------
def load(name: str) -> dict[str, Any]:
    path = _volume_dir(name) / "manifest.json"
    try:
        with open(path, "rb") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise NotFoundError(f"Volume {name!r} does not exist; pass create_if_missing=True or run "
                            f"`mctl volume create {name}`.") from None


def _write_manifest(name: str, manifest: dict[str, Any]) -> None:
    directory = _volume_dir(name)
    tmp = directory / f".manifest.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(tmp, "w") as fh:
            json.dump(manifest, fh, separators=(",", ":"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, directory / "manifest.json")
        _fsync_dir(directory)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _store_error(exc, f"committing to volume {name!r}") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _syncfs(path: Path) -> None:
    """Flush the objects written since the last commit (one call, not one fsync per object)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs")
    except AttributeError:
        os.sync()
    finally:
        os.close(fd)


def _flush_objects(changes: dict[str, Any]) -> None:
    """Make the commit's contents durable before the manifest names them: an fsync of each for a
    few, one syncfs of the store's file system for many (fewer calls, but it flushes whatever
    else is dirty there too)."""
    shas = {e["sha"] for e in changes.values() if e is not None and e["type"] == "file"}
    if len(shas) > 64:
        _syncfs(root() / "objects")
        return
    for sha in shas:
        fd = os.open(object_path(sha), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def _locked(name: str) -> Iterator[None]:
    with _locks_guard:
        lock = _locks.setdefault(name, threading.Lock())
    with lock, open(_volume_dir(name) / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _norm(path: str) -> str:
    """A volume path as the manifest keys it: relative, '/'-separated, no '..'."""
    parts = [p for p in PurePosixPath("/" + (path or "")).parts[1:] if p not in ("", ".")]
    if ".." in parts:
        raise InvalidError(f"Path {path!r} leaves the volume; use a path inside it, such as "
                           "'/data/file.txt'.")
    return "/".join(parts)


def commit(name: str, changes: dict[str, Any]) -> dict[str, Any]:
    """Apply `changes` ({path: entry or None}) as one new version; every file's object must be
    stored already. Returns {"version": n}."""
    changes = {_norm(p): e for p, e in changes.items()}
    if "" in changes:
        raise InvalidError("A commit cannot replace the volume's root.")
    for path, entry in changes.items():
        if entry is None:
            continue
        if entry.get("type") not in ("file", "dir", "symlink"):
            raise InvalidError(f"Entry for {path!r} has no valid type.")
        if entry["type"] == "file" and not object_path(entry["sha"]).exists():
            raise InvalidError(f"The content of {path!r} ({entry['sha'][:12]}) was not uploaded; "
                               "commit again.")
    with _locked(name):
        manifest = load(name)
        if changes:
            try:
                _flush_objects(changes)
            except OSError as exc:
                raise _store_error(exc, f"committing to volume {name!r}") from None
            apply(manifest["entries"], changes)
            manifest["version"] += 1
            manifest["committed"] = time.time()
            _write_manifest(name, manifest)
    return {"version": manifest["version"]}


# --- objects --------------------------------------------------------------------------------------
def missing(shas: list[str]) -> list[str]:
    """The objects of `shas` the store lacks. Those it has are touched: a commit is about to
    name them, and `gc` leaves objects younger than an hour alone."""
    lacking = []
    for sha in shas:
        try:
            os.utime(object_path(sha))
        except FileNotFoundError:
            lacking.append(sha)
    return lacking


def store_object(read: Callable[[int], bytes], size: int | None) -> str:
    """Store `size` bytes read from `read` (all of them when None) as an object; returns its
    sha256. A full disk is a StoreFull, and leaves nothing behind."""
    objects = root() / "objects"
    tmp = objects / f".upload.{os.getpid()}.{threading.get_ident()}.{os.urandom(4).hex()}"
    digest = hashlib.sha256()
    try:
        objects.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            left = size
            while left is None or left:
                chunk = read(CHUNK if left is None else min(CHUNK, left))
                if not chunk:
                    if left is None:
                        break
                    raise InvalidError("The upload ended before its last object was complete.")
                fh.write(chunk)
                digest.update(chunk)
                if left is not None:
                    left -= len(chunk)
        sha = digest.hexdigest()
        target = object_path(sha)
        if target.exists():
            return sha
        target.parent.mkdir(exist_ok=True)
        os.replace(tmp, target)
        return sha
    except OSError as exc:
        raise _store_error(exc, "storing a volume file") from None
    finally:
        tmp.unlink(missing_ok=True)


class _Buffered:
    """Small reads served from 1 MiB blocks of `stream` (each block read is a hop from the event
    loop's thread to this one: many small files would otherwise cost two hops each)."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.buf, self.pos = stream, b"", 0

    def read(self, n: int) -> bytes:
        if self.pos >= len(self.buf):
            if n >= CHUNK:
                return self.stream.read(n)
            self.buf, self.pos = self.stream.read(CHUNK), 0
        chunk = self.buf[self.pos:self.pos + n]
        self.pos += len(chunk)
        return chunk


def store_pack(stream: BinaryIO) -> list[str]:
    """Objects sent as records of an 8-byte big-endian length and that many bytes."""
    stream = _Buffered(stream)  # type: ignore[assignment]
    out = []
    while True:
        head = stream.read(8)
        if not head:
            return out
        while len(head) < 8 and (more := stream.read(8 - len(head))):
            head += more
        if len(head) != 8:
            raise InvalidError("A volume upload ended inside a record header.")
        out.append(store_object(stream.read, int.from_bytes(head, "big")))


# --- the driver -----------------------------------------------------------------------------------
def mount(name: str, create: bool) -> str:
    """The volume's directory in the store (for the control plane; workers get copies)."""
    directory = _volume_dir(name)
    if not (directory / "manifest.json").exists():
        if not create:
            load(name)  # raises NotFoundError
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with _locked(name):
                if not (directory / "manifest.json").exists():
                    _write_manifest(name, {"version": 0, "created": time.time(), "entries": {}})
        except OSError as exc:
            raise _store_error(exc, f"creating volume {name!r}") from None
    return str(directory)


def list_volumes() -> list[str]:
    try:
        return sorted(p.name for p in (root() / "volumes").iterdir()
                      if (p / "manifest.json").exists())
    except FileNotFoundError:
        return []


def delete(name: str) -> bool:
    directory = _volume_dir(name)
    if not (directory / "manifest.json").exists():
        return False
    doomed = directory.with_name(f".deleting-{name}-{os.getpid()}")
    os.rename(directory, doomed)
    shutil.rmtree(doomed)
    gc()
    return True


def gc(min_age_s: float = 3600.0) -> int:
    """Remove objects no manifest names (older than `min_age_s`: an upload may be on its way
    to a commit). Returns how many."""
    used: set[str] = set()
    for name in list_volumes():
        try:
            used.update(e["sha"] for e in load(name)["entries"].values() if e["type"] == "file")
        except NotFoundError:
            continue
    removed, cutoff = 0, time.time() - min_age_s
    for path in (root() / "objects").glob("*/*"):
        try:
            if path.name not in used and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


class Files:
    """The client API (`mctl.core.volume_files`) on a stored volume's manifest, and what the
    workers' sync routes call (`mctl.core.server.volumes`)."""

    manifest = staticmethod(load)
    missing = staticmethod(missing)
    store_pack = staticmethod(store_pack)
    object_path = staticmethod(object_path)
    commit = staticmethod(commit)

    @staticmethod
    def listdir(name: str, path: str, recursive: bool) -> list[dict[str, Any]]:
        entries = load(name)["entries"]
        target = _norm(path)
        if target and target not in entries:
            raise FileNotFoundError(f"No file or directory {path!r} in volume {name!r}.")
        if target and entries[target]["type"] != "dir":
            return [_row(target, entries[target])]
        prefix = target + "/" if target else ""
        rows = [_row(p, e) for p, e in entries.items() if p.startswith(prefix)
                and (recursive or "/" not in p[len(prefix):])]
        return sorted(rows, key=lambda r: r["path"])

    @staticmethod
    def open_file(name: str, path: str) -> Path:
        entry = load(name)["entries"].get(_norm(path))
        if entry is None or entry["type"] != "file":
            raise FileNotFoundError(f"No file {path!r} in volume {name!r}"
                                    + (" (it is a directory)." if entry else "."))
        return object_path(entry["sha"])

    @staticmethod
    def write(name: str, path: str, force: bool, create: bool, stream: BinaryIO,
              mode: int | None) -> int:
        if create:
            mount(name, True)
        key = _norm(path)
        entry = load(name)["entries"].get(key) if key else {"type": "dir"}
        if entry is not None and entry["type"] == "dir":
            raise IsADirectoryError(f"{path!r} is a directory in volume {name!r}; give a file "
                                    "path.")
        if entry is not None and not force:
            raise FileExistsError(f"{path!r} exists in volume {name!r}; pass force=True "
                                  "(--force) to replace it.")
        counted = _Counting(stream)
        sha = store_object(counted.read, None)
        commit(name, {key: {"type": "file", "sha": sha, "size": counted.size,
                            "mode": 0o644 if mode is None else mode & 0o7777,
                            "mtime": time.time()}})
        return counted.size

    @staticmethod
    def remove(name: str, path: str, recursive: bool) -> None:
        key = _norm(path)
        if not key:
            raise InvalidError("Removing a volume's root is `mctl volume delete NAME`; give a "
                               "path inside the volume.")
        entry = load(name)["entries"].get(key)
        if entry is None:
            raise FileNotFoundError(f"No file or directory {path!r} in volume {name!r}.")
        if entry["type"] == "dir" and not recursive:
            raise IsADirectoryError(f"{path!r} is a directory in volume {name!r}; pass "
                                    "recursive=True (-r) to remove it and its contents.")
        commit(name, {key: None})

    @staticmethod
    def copy(name: str, src_paths: list[str], dst_path: str) -> None:
        entries = load(name)["entries"]
        sources = [_norm(p) for p in src_paths]
        for given, src in zip(src_paths, sources):
            if src not in entries:
                raise FileNotFoundError(f"No file or directory {given!r} in volume {name!r}.")
        dst = _norm(dst_path)
        into = (len(sources) > 1 or entries.get(dst, {}).get("type") == "dir"
                or dst_path.endswith("/") or not dst)
        changes: dict[str, Any] = {}
        if into and dst:
            changes[dst] = entries.get(dst) if entries.get(dst, {}).get("type") == "dir" else \
                {"type": "dir", "mode": 0o755, "mtime": time.time()}
        for src in sources:
            target = "/".join(p for p in (dst, src.rsplit("/", 1)[-1]) if p) if into else dst
            changes[target] = entries[src]
            for path, entry in entries.items():
                if path.startswith(src + "/"):
                    changes[target + path[len(src):]] = entry
        commit(name, changes)


def _row(path: str, entry: dict[str, Any]) -> dict[str, Any]:
    kind = "directory" if entry["type"] == "dir" else entry["type"]
    return {"path": path, "type": kind, "mtime": int(entry.get("mtime", 0)),
            "size": entry.get("size", 0) if entry["type"] == "file" else 0}


class _Counting:
    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.size = stream, 0

    def read(self, n: int) -> bytes:
        chunk = self.stream.read(n)
        self.size += len(chunk)
        return chunk


@mctl.hookimpl
def mctl_register_volume_drivers():
    yield VolumeDriver(name="store", mount=mount, list=list_volumes, delete=delete, files=Files,
                       copies=True)
