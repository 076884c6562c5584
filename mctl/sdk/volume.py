"""`Volume`: a named, persistent directory mounted into a function's containers.

From the client, a volume's files are read and written through the control plane (which holds
them): `listdir`, `iterdir`, `read_file`, `remove_file`, `copy_files` and `batch_upload()`.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
from dataclasses import dataclass
from typing import IO, Any, Iterator

from mctl.exception import InvalidError

_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$")


class Volume:
    def __init__(self, name: str, create_if_missing: bool = False,
                 environment_name: str | None = None) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidError(f"Invalid volume name {name!r}: use letters, digits, '.', '_' "
                               "and '-', up to 64 characters.")
        self.name = name
        self.create_if_missing = create_if_missing
        self.environment_name = environment_name
        self._ensured = False  # created on the control plane by this object already
        self._read_only = False

    def read_only(self) -> Volume:
        """This volume, mounted read-only: `volumes={"/models": vol.read_only()}`. A write
        there fails with `OSError` (read-only file system); the volume's files stay as they are."""
        ro = Volume(self.name, self.create_if_missing, self.environment_name)
        ro._read_only = True
        return ro

    @staticmethod
    def from_name(name: str, *, create_if_missing: bool = False,
                  environment_name: str | None = None) -> Volume:
        return Volume(name, create_if_missing, environment_name)

    @staticmethod
    @contextlib.contextmanager
    def ephemeral(*, environment_name: str | None = None, **_: Any) -> Iterator[Volume]:
        """A volume that lives as long as the `with` block, as Modal's: `with
        mctl.Volume.ephemeral() as vol: ...` (mount it in functions of `app.run()`); it is
        deleted, with its files, when the block ends."""
        import secrets

        name = f"ephemeral-{secrets.token_hex(8)}"
        create_volume(name)
        try:
            yield Volume(name, environment_name=environment_name)
        finally:
            delete_volume(name)

    # --- from the client, through the control plane ---------------------------------------------
    def listdir(self, path: str = "/", *, recursive: bool = False) -> list[FileEntry]:
        """The entries at `path`: a directory's children (all descendants with `recursive`),
        or the file itself. FileNotFoundError when nothing is there."""
        rows = _call(self, "GET", "entries", {"path": path, "recursive": _bool(recursive)})
        return [FileEntry(r["path"], FileEntryType[r["type"].upper()], r["mtime"], r["size"])
                for r in rows]

    def iterdir(self, path: str = "/", *, recursive: bool = True) -> Iterator[FileEntry]:
        """Like `listdir`, but recursive by default (as Modal's)."""
        yield from self.listdir(path, recursive=recursive)

    def read_file(self, path: str) -> Iterator[bytes]:
        """The file's bytes, in chunks: `b"".join(vol.read_file("a.txt"))`."""
        resp = _open(_volume_path(self, "files"), "GET", {"path": path})
        with resp:
            while chunk := resp.read(1 << 20):
                yield chunk

    def read_file_into_fileobj(self, path: str, fileobj: IO[bytes]) -> int:
        """Write the file's bytes to `fileobj`; returns how many."""
        size = 0
        for chunk in self.read_file(path):
            fileobj.write(chunk)
            size += len(chunk)
        return size

    def remove_file(self, path: str, recursive: bool = False) -> None:
        """Remove a file, or a directory and its contents with `recursive=True`."""
        _call(self, "DELETE", "files", {"path": path, "recursive": _bool(recursive)})

    def copy_files(self, src_paths: list[str], dst_path: str) -> None:
        """Copy files or directories within the volume; with several sources, or a destination
        that is a directory, each goes into it under its own name."""
        if isinstance(src_paths, str):
            raise InvalidError("copy_files takes a list of source paths, e.g. ['a.txt'].")
        _call(self, "POST", "copy", body={"src_paths": list(src_paths), "dst_path": dst_path})

    def batch_upload(self, force: bool = False) -> VolumeUpload:
        """`with vol.batch_upload() as batch: batch.put_file(...); batch.put_directory(...)`:
        the files are uploaded when the block ends without an error. An existing file raises
        FileExistsError unless `force=True`."""
        return VolumeUpload(self, force)

    def commit(self) -> None:
        """Publish this container's writes to the volume, as Modal's: other containers see them
        after their next `reload()`. A function commits automatically when it returns (and its
        container when it stops).

        With the default `store` driver each container works on its own copy: only the files
        changed since its last commit or reload travel, and each file is committed whole (the
        last commit of a file wins). The `local` and `shared-path` drivers bind one directory
        into every worker, so a closed file is visible everywhere already and this has nothing
        to move. Outside a container it does nothing. A full volume store raises OSError
        (ENOSPC) and leaves the last commit as it was."""
        from mctl.core import volume_sync

        for copy in volume_sync.copies_of(self.name):
            copy.commit()

    def reload(self) -> None:
        """See the commits other containers made since this one started or last reloaded:
        changed files are replaced whole (open files keep what they had), and only the contents
        this container lacks are fetched. Uncommitted changes made here are kept. A no-op on
        the shared-directory drivers, where others' writes are visible as soon as they close
        their files."""
        from mctl.core import volume_sync

        for copy in volume_sync.copies_of(self.name):
            copy.reload()

    def __repr__(self) -> str:
        return f"Volume.from_name({self.name!r})"


def validate_mounts(volumes: dict[str, Volume]) -> dict[str, str]:
    """Check a `volumes=` mapping; return {mount path: volume name}."""
    if not isinstance(volumes, dict):
        raise InvalidError("volumes must be a dict of absolute mount path to mctl.Volume.")
    out: dict[str, str] = {}
    for path, vol in volumes.items():
        if not isinstance(path, str) or not path.startswith("/") or path.rstrip("/") == "":
            raise InvalidError(f"Volume mount path {path!r} must be an absolute path other than '/'.")
        if not isinstance(vol, Volume):
            raise InvalidError(f"volumes[{path!r}] must be a mctl.Volume, got {type(vol).__name__}.")
        out[path.rstrip("/")] = vol.name
    return out


def read_only_paths(volumes: dict[str, Volume]) -> list[str]:
    """The mount paths of a (checked) `volumes=` mapping that are read-only."""
    return sorted(path.rstrip("/") for path, vol in volumes.items() if vol._read_only)


class FileEntryType(enum.IntEnum):
    UNSPECIFIED = 0
    FILE = 1
    DIRECTORY = 2
    SYMLINK = 3


@dataclass(frozen=True)
class FileEntry:
    """One entry of `Volume.listdir`: `path` relative to the volume's root."""

    path: str
    type: FileEntryType
    mtime: int
    size: int


class VolumeUpload:
    """Files gathered by `put_file` / `put_directory`, uploaded when the `with` block ends."""

    def __init__(self, volume: Volume, force: bool) -> None:
        self.volume, self.force = volume, force
        self._files: list[tuple[Any, str, int | None]] = []

    def put_file(self, local_file: str | os.PathLike[str] | IO[bytes], remote_path: str,
                 mode: int | None = None) -> None:
        """Upload a local file (a path or a binary file object) to `remote_path`."""
        if remote_path.endswith("/"):
            raise InvalidError(f"put_file needs a file path, not the directory {remote_path!r}; "
                               "add the file's name.")
        self._files.append((local_file, remote_path, mode))

    def put_directory(self, local_path: str | os.PathLike[str], remote_path: str,
                      recursive: bool = True) -> None:
        """Upload every file under `local_path` to the same relative paths under `remote_path`."""
        local = os.fspath(local_path)
        if not os.path.isdir(local):
            raise FileNotFoundError(f"No local directory {local!r} to upload.")
        for dirpath, dirnames, filenames in os.walk(local):
            if not recursive:
                dirnames[:] = []
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, local).replace(os.sep, "/")
                self._files.append((full, f"{remote_path.rstrip('/')}/{rel}",
                                    os.stat(full).st_mode & 0o777))

    def __enter__(self) -> VolumeUpload:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            return
        for local, remote, mode in self._files:
            params = {"path": remote, "force": _bool(self.force)}
            if mode is not None:
                params["mode"] = format(mode, "o")
            if isinstance(local, (str, os.PathLike)):
                with open(local, "rb") as fh:
                    _call(self.volume, "PUT", "files", params, data=fh,
                          size=os.fstat(fh.fileno()).st_size)
            else:
                _call(self.volume, "PUT", "files", params, data=local)


# --- the HTTP client ------------------------------------------------------------------------------
def _bool(flag: bool) -> str:
    return "1" if flag else "0"


def _server() -> str:
    from mctl.core.config import configured_server_url
    from mctl.core.runner import ensure_background_server

    return configured_server_url() or ensure_background_server()


def _open(path: str, method: str, params: dict[str, str] | None = None, body: Any = None,
          data: Any = None, size: int | None = None) -> Any:
    """One request to the control plane; its answer's error `kind` becomes the same exception
    here (FileNotFoundError, FileExistsError, ...)."""
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    from mctl.core import transport
    from mctl.exception import AlreadyExistsError, ConnectionError, NotFoundError

    url = _server()
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    headers = transport.auth_headers(url)
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    elif data is not None:
        headers["Content-Type"] = "application/octet-stream"
        if size is not None:
            headers["Content-Length"] = str(size)
    request = urllib.request.Request(url + path + query, data=data, method=method,
                                     headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=300, context=transport.ssl_context(url))
    except urllib.error.HTTPError as exc:
        with exc:
            try:
                answer = json.loads(exc.read())
            except ValueError:
                answer = {}
        if exc.code in (401, 403):
            raise transport.refused(exc.code, answer.get("error")) from None
        kinds = {"FileNotFoundError": FileNotFoundError, "FileExistsError": FileExistsError,
                 "IsADirectoryError": IsADirectoryError, "NotFoundError": NotFoundError,
                 "AlreadyExistsError": AlreadyExistsError}
        if answer.get("kind") == "StoreFull":  # the control plane's volume store is full
            import errno

            raise OSError(errno.ENOSPC, answer.get("error")) from None
        error = kinds.get(answer.get("kind", ""), NotFoundError if exc.code == 404
                          else InvalidError)
        raise error(answer.get("error") or f"HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        err = transport.tls_error(url, exc)
        raise err or ConnectionError(
            f"Could not reach the mctl control plane at {url} ({exc.reason}). Start one with "
            "`mctl server`, or set MCTL_SERVER_URL.") from None


def _json(path: str, method: str, params: dict[str, str] | None = None, body: Any = None,
          data: Any = None, size: int | None = None) -> Any:
    import json

    with _open(path, method, params, body, data, size) as resp:
        return json.loads(resp.read())


def _volume_path(volume: Volume, what: str) -> str:
    """/api/volumes/NAME/WHAT, creating the volume first when `create_if_missing`."""
    if volume.create_if_missing and not volume._ensured:
        create_volume(volume.name, exist_ok=True)
        volume._ensured = True
    return f"/api/volumes/{volume.name}/{what}"


def _call(volume: Volume, method: str, what: str, params: dict[str, str] | None = None,
          body: Any = None, data: Any = None, size: int | None = None) -> Any:
    return _json(_volume_path(volume, what), method, params, body, data, size)


# --- volumes themselves (for `mctl volume`) -----------------------------------------------------
def create_volume(name: str, exist_ok: bool = False) -> bool:
    """Create a volume on the control plane; False when it existed (AlreadyExistsError unless
    `exist_ok`)."""
    return _json("/api/volumes", "POST", body={"name": name, "exist_ok": exist_ok})["created"]


def list_volumes() -> list[dict[str, Any]]:
    return _json("/api/volumes", "GET")


def delete_volume(name: str) -> bool:
    return _json(f"/api/volumes/{name}", "DELETE")["deleted"]
