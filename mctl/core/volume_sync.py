"""Working copies of volumes whose driver keeps the files itself (`store`): a worker's private
directory, bound at the mount path, filled from the control plane at start and by
`Volume.reload()`, published by `Volume.commit()` and when an input returns (Modal's semantics).

Where: `<MCTL_VOLUME_SCRATCH>/<task id>/<index>` on the worker's node (default
`/var/tmp/mctl-volumes`), made by the backend before the bind and removed by the worker at exit.
The worker reads and writes that directory itself (so a read-only mount can still be filled).

What travels: a commit compares each file's size, mtime and inode with what it last synced, hashes
the changed ones, asks the control plane which contents it lacks and sends only those (many small
files in one request, as records of an 8-byte length and the bytes), then commits the changed
paths (added, changed, removed) in one request, applied whole onto the newest version. A reload
fetches the manifest and downloads only the contents that differ from what this copy has.
Uncommitted local changes survive a reload (commit them to publish them).
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import shutil
import stat
import threading
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence
from urllib.parse import quote, urlsplit

if TYPE_CHECKING:
    from mctl.core.launch import Mount

ENV = "MCTL_VOLUME_SYNC"
CHUNK = 1 << 20
PACK_BYTES = 64 << 20    # one upload request carries at most this much (unless one file is more)
PACK_FILES = 4096
SMALL = 4 << 20          # files up to this size are read once, hashed and sent from memory

_copies: list[WorkingCopy] = []


# --- where copies live (shared by the backends that bind them and the worker) --------------------
def scratch_root() -> str:
    return os.environ.get("MCTL_VOLUME_SCRATCH") or "/var/tmp/mctl-volumes"


def scratch_dir(root: str, task_id: str, index: int) -> str:
    return f"{root.rstrip('/')}/{task_id}/{index}"


def synced(mounts: Sequence[Mount]) -> list[Mount]:
    return [m for m in mounts if m.synced]


def launch_env(mounts: Sequence[Mount]) -> dict[str, str]:
    """The worker's description of its working copies (no paths that depend on the task)."""
    copies = synced(mounts)
    if not copies:
        return {}
    return {ENV: json.dumps({"root": scratch_root(),
                             "mounts": [[m.path, m.volume, m.read_only] for m in copies]})}


def sources(mounts: Sequence[Mount], task_id: str) -> dict[str, str]:
    """{mount path: the directory bound there} for this task's working copies."""
    root = scratch_root()
    return {m.path: scratch_dir(root, task_id, i) for i, m in enumerate(synced(mounts))}


# --- manifests --------------------------------------------------------------------------------
def apply(entries: dict[str, Any], changes: dict[str, Any]) -> None:
    """Apply changes ({path: entry, or None to remove}) to a tree of entries, whole entries: a
    removal takes the path's descendants too; a new entry makes its parent directories and
    replaces whatever was at its path (and below it, when that was a directory)."""
    for path in sorted(p for p, e in changes.items() if e is None):
        _remove(entries, path)
    for path, entry in sorted((p, e) for p, e in changes.items() if e is not None):
        old = entries.get(path)
        if old is not None and old["type"] == "dir" and entry["type"] != "dir":
            _remove(entries, path)
        parts = path.split("/")
        for parent in ("/".join(parts[:i]) for i in range(1, len(parts))):
            if entries.get(parent, {}).get("type") != "dir":
                _remove(entries, parent)
                entries[parent] = {"type": "dir", "mode": 0o755, "mtime": entry.get("mtime", 0)}
        entries[path] = entry


def _remove(entries: dict[str, Any], path: str) -> None:
    entries.pop(path, None)
    prefix = path + "/"
    for key in [k for k in entries if k.startswith(prefix)]:
        del entries[key]


def _same(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    if a is None or b is None or a["type"] != b["type"]:
        return a is b
    if a["type"] == "file":
        return a["sha"] == b["sha"] and a.get("mode") == b.get("mode")
    if a["type"] == "symlink":
        return a.get("target") == b.get("target")
    return True


# --- the control plane's sync routes ---------------------------------------------------------
class _Http:
    def __init__(self, url: str) -> None:
        from mctl.core import transport

        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        self.host, self.port, self.https = parts.hostname, parts.port, parts.scheme == "https"
        self.headers = transport.auth_headers(self.url)
        self.context = transport.ssl_context(self.url) if self.https else None
        self.conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            if self.https:
                self.conn = http.client.HTTPSConnection(self.host, self.port, timeout=600,
                                                        context=self.context)
            else:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        return self.conn

    def request(self, method: str, path: str, body: Any = None, json_body: Any = None,
                ) -> http.client.HTTPResponse:
        headers = dict(self.headers)
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        chunked = body is not None and not isinstance(body, (bytes, bytearray))
        if chunked:
            headers["Content-Type"] = "application/octet-stream"
        conn = self._connection()
        try:
            conn.request(method, path, body=body, headers=headers, encode_chunked=chunked)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            from mctl.exception import ConnectionError

            raise ConnectionError(f"Could not reach the mctl control plane at {self.url} to "
                                  f"sync a volume ({exc}).") from None
        if resp.status >= 400:
            data = resp.read()
            try:
                answer = json.loads(data)
            except ValueError:
                answer = {"error": data.decode(errors="replace")[:300]}
            message = answer.get("error") or f"HTTP {resp.status}"
            if resp.status == 507:
                raise OSError(errno.ENOSPC, message)
            if resp.status == 403:
                raise PermissionError(message)
            if resp.status == 404:
                from mctl.exception import NotFoundError

                raise NotFoundError(message)
            from mctl.exception import InvalidError

            raise InvalidError(message)
        return resp

    def json(self, method: str, path: str, body: Any = None) -> Any:
        resp = self.request(method, path, json_body=body)
        return json.loads(resp.read())

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _read_exact(resp: Any, n: int) -> bytes:
    data = resp.read(n)
    if len(data) != n:
        raise OSError(errno.EIO, "The control plane's answer ended early; reload again.")
    return data


# --- one working copy ---------------------------------------------------------------------------
class WorkingCopy:
    def __init__(self, url: str, volume: str, mount_path: str, directory: str,
                 read_only: bool) -> None:
        self.volume, self.mount_path, self.dir, self.read_only = (
            volume, mount_path, directory, read_only)
        self.http = _Http(url)
        self.prefix = f"/api/volumes/{quote(volume)}/sync"
        self.base: dict[str, Any] = {}           # the committed tree this copy was last synced to
        self.stats: dict[str, tuple[int, int, int]] = {}  # file -> (size, mtime_ns, ino) then
        self.version = -1
        self.lock = threading.Lock()
        self.moved = {"up": 0, "down": 0, "files_up": 0, "files_down": 0}

    # --- scanning ---
    def _scan(self) -> dict[str, tuple[str, Any]]:
        """{path: ("file", stat) | ("dir", stat) | ("symlink", target)} of the copy."""
        out: dict[str, tuple[str, Any]] = {}
        top = len(self.dir) + 1
        for dirpath, dirnames, filenames in os.walk(self.dir):
            rel = dirpath[top:]
            for name in (*dirnames, *filenames):
                full = os.path.join(dirpath, name)
                path = f"{rel}/{name}" if rel else name
                if name.startswith(".mctl-sync-"):
                    continue
                st = os.lstat(full)
                if stat.S_ISLNK(st.st_mode):
                    out[path] = ("symlink", os.readlink(full))
                elif stat.S_ISDIR(st.st_mode):
                    out[path] = ("dir", st)
                elif stat.S_ISREG(st.st_mode):
                    out[path] = ("file", st)
        return out

    def _clean(self, path: str, local: tuple[str, Any] | None) -> bool:
        """True when the local path is as this copy last synced it."""
        entry = self.base.get(path)
        if local is None:
            return entry is None
        kind, info = local
        if entry is None or entry["type"] != kind:
            return False
        if kind == "file":
            return self.stats.get(path) == (info.st_size, info.st_mtime_ns, info.st_ino)
        if kind == "symlink":
            return entry.get("target") == info
        return True

    # --- commit ---
    def commit(self) -> int:
        """Publish this copy's changes; returns how many paths changed (0: nothing to do)."""
        if self.read_only:
            return 0
        with self.lock:
            return self._commit()

    def _commit(self) -> int:
        scan = self._scan()
        changes: dict[str, Any] = {}
        content: dict[str, tuple[str, bytes | None, int]] = {}  # path -> (sha, data, size)
        for path, local in scan.items():
            if self._clean(path, local):
                continue
            kind, info = local
            if kind == "dir":
                if self.base.get(path, {}).get("type") != "dir":
                    changes[path] = {"type": "dir", "mode": stat.S_IMODE(info.st_mode),
                                     "mtime": info.st_mtime}
                continue
            if kind == "symlink":
                changes[path] = {"type": "symlink", "target": info}
                continue
            sha, data, size = self._hash(path, info)
            entry = {"type": "file", "sha": sha, "size": size,
                     "mode": stat.S_IMODE(info.st_mode), "mtime": info.st_mtime}
            if _same(self.base.get(path), entry):  # touched, not changed
                self.stats[path] = (info.st_size, info.st_mtime_ns, info.st_ino)
                continue
            changes[path] = entry
            content[path] = (sha, data, size)
        for path in self.base:
            if path not in scan:
                changes[path] = None
        if not changes:
            return 0
        self._upload(content, changes)
        self.http.json("POST", f"{self.prefix}/commit", {"changes": changes})
        apply(self.base, changes)
        for path, entry in changes.items():
            if entry is None:
                self.stats.pop(path, None)
            elif entry["type"] == "file":
                info = scan[path][1]
                self.stats[path] = (info.st_size, info.st_mtime_ns, info.st_ino)
        return len(changes)

    def _hash(self, path: str, info: os.stat_result) -> tuple[str, bytes | None, int]:
        full = os.path.join(self.dir, path)
        with open(full, "rb") as fh:
            if info.st_size <= SMALL:
                data = fh.read()
                return hashlib.sha256(data).hexdigest(), data, len(data)
            digest = hashlib.sha256()
            size = 0
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
        return digest.hexdigest(), None, size

    def _upload(self, content: dict[str, tuple[str, bytes | None, int]],
                changes: dict[str, Any]) -> None:
        shas = sorted({sha for sha, _, _ in content.values()})
        lacking = set(self.http.json("POST", f"{self.prefix}/missing", shas)) if shas else set()
        todo: dict[str, tuple[str, bytes | None, int]] = {}
        for path, (sha, data, size) in content.items():
            if sha in lacking:
                lacking.discard(sha)  # one upload per content, however many paths have it
                todo[path] = (sha, data, size)
        pack: list[tuple[str, bytes | None, int]] = []
        pack_paths: list[str] = []
        pack_bytes = 0
        for path, item in sorted(todo.items()):
            if pack and (pack_bytes + item[2] > PACK_BYTES or len(pack) >= PACK_FILES):
                self._send(pack_paths, pack, changes)
                pack, pack_paths, pack_bytes = [], [], 0
            pack.append(item)
            pack_paths.append(path)
            pack_bytes += item[2]
        if pack:
            self._send(pack_paths, pack, changes)

    def _send(self, paths: list[str], pack: list[tuple[str, bytes | None, int]],
              changes: dict[str, Any]) -> None:
        def records() -> Iterator[bytes]:
            """The pack, in pieces of about 1 MiB (small files coalesced: one send each)."""
            buf = bytearray()
            for piece in pieces():
                buf += piece
                if len(buf) >= CHUNK:
                    yield bytes(buf)
                    buf.clear()
            if buf:
                yield bytes(buf)

        def pieces() -> Iterator[bytes]:
            for path, (_, data, size) in zip(paths, pack):
                yield size.to_bytes(8, "big")
                if data is not None:
                    yield data
                    continue
                left = size
                with open(os.path.join(self.dir, path), "rb") as fh:
                    while left:
                        chunk = fh.read(min(CHUNK, left))
                        if not chunk:
                            raise OSError(errno.EIO, f"{path} shrank while it was committed; "
                                          "commit again once it is written.")
                        left -= len(chunk)
                        yield chunk

        stored = json.loads(self.http.request("POST", f"{self.prefix}/objects",
                                              body=records()).read())
        for path, (sha, _, size), got in zip(paths, pack, stored):
            self.moved["up"] += size
            self.moved["files_up"] += 1
            if got != sha:  # written to while it was sent: what arrived is what is committed
                changes[path]["sha"] = got

    # --- reload ---
    def reload(self) -> int:
        """Take in the commits others made; returns how many paths changed here."""
        with self.lock:
            try:
                return self._reload()
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                import socket

                raise OSError(exc.errno, f"No space for the working copy of volume "
                              f"{self.volume!r} at {self.dir} on {socket.gethostname()}: a "
                              "worker needs room for the whole volume there. Set "
                              "MCTL_VOLUME_SCRATCH on the control plane to a larger disk.") \
                    from None

    def _reload(self) -> int:
        manifest = self.http.json("GET", f"{self.prefix}/manifest")
        head: dict[str, Any] = manifest["entries"]
        scan = self._scan()
        dirty = {p for p in set(scan) | set(self.base) if not self._clean(p, scan.get(p))}
        changed = 0
        # removed by others (and untouched here): files and links first, then directories
        for path in sorted((p for p in self.base if p not in head and p not in dirty),
                           key=lambda p: -p.count("/")):
            full = os.path.join(self.dir, path)
            try:
                if self.base[path]["type"] == "dir":
                    os.rmdir(full)
                else:
                    os.unlink(full)
                changed += 1
            except FileNotFoundError:
                pass
            except OSError:  # a directory that still holds uncommitted files here
                continue
            self.stats.pop(path, None)
        fetch: dict[str, list[str]] = {}
        for path in sorted(head):
            entry = head[path]
            if path in dirty or (_same(self.base.get(path), entry) and path in scan):
                continue
            full = os.path.join(self.dir, path)
            if entry["type"] == "dir":
                if scan.get(path, ("",))[0] != "dir":
                    self._clear(full)
                    os.makedirs(full, exist_ok=True)
                    changed += 1
            elif entry["type"] == "symlink":
                self._clear(full)
                os.makedirs(os.path.dirname(full), exist_ok=True)
                os.symlink(entry["target"], full)
                changed += 1
            else:
                fetch.setdefault(entry["sha"], []).append(path)
        if fetch:
            changed += self._download(fetch, head)
        self.base = head
        self.version = manifest["version"]
        return changed

    def _clear(self, full: str) -> None:
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        elif os.path.lexists(full):
            os.unlink(full)

    def _download(self, fetch: dict[str, list[str]], head: dict[str, Any]) -> int:
        shas = list(fetch)
        written = 0
        for start in range(0, len(shas), PACK_FILES):
            batch = shas[start:start + PACK_FILES]
            resp = self.http.request("POST", f"{self.prefix}/fetch", json_body=batch)
            for sha in batch:
                size = int.from_bytes(_read_exact(resp, 8), "big")
                paths = fetch[sha]
                first = os.path.join(self.dir, paths[0])
                self._write(first, resp, size, head[paths[0]])
                for other in paths[1:]:
                    target = os.path.join(self.dir, other)
                    tmp = self._temp(target)
                    shutil.copyfile(first, tmp)
                    self._place(tmp, target, head[other])
                written += len(paths)
                self.moved["down"] += size
                self.moved["files_down"] += 1
            resp.read()
        return written

    def _temp(self, target: str) -> str:
        parent, name = os.path.split(target)
        os.makedirs(parent, exist_ok=True)
        return os.path.join(parent, f".mctl-sync-{name}.{os.urandom(4).hex()}")

    def _write(self, target: str, resp: Any, size: int, entry: dict[str, Any]) -> None:
        tmp = self._temp(target)
        try:
            with open(tmp, "wb") as fh:
                left = size
                while left:
                    chunk = _read_exact(resp, min(CHUNK, left))
                    fh.write(chunk)
                    left -= len(chunk)
            self._place(tmp, target, entry)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _place(self, tmp: str, target: str, entry: dict[str, Any]) -> None:
        os.chmod(tmp, entry.get("mode", 0o644) & 0o7777)
        mtime = entry.get("mtime")
        if mtime:
            os.utime(tmp, (mtime, mtime))
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
        st = os.lstat(target)
        rel = os.path.relpath(target, self.dir).replace(os.sep, "/")
        self.stats[rel] = (st.st_size, st.st_mtime_ns, st.st_ino)


# --- the worker's copies -------------------------------------------------------------------------
def setup(url: str, task_id: str, env: dict[str, str] | None = None) -> list[WorkingCopy]:
    """Fill this worker's working copies (from `MCTL_VOLUME_SYNC`); called before user code."""
    raw = (env if env is not None else os.environ).get(ENV)
    if not raw:
        return []
    spec = json.loads(raw)
    for index, (path, volume, read_only) in enumerate(spec["mounts"]):
        directory = scratch_dir(spec["root"], task_id, index)
        os.makedirs(directory, exist_ok=True)
        copy = WorkingCopy(url, volume, path, directory, bool(read_only))
        copy.reload()
        _copies.append(copy)
    return list(_copies)


def copies_of(volume: str) -> list[WorkingCopy]:
    return [c for c in _copies if c.volume == volume]


def active() -> bool:
    return bool(_copies)


def commit_all() -> int:
    """Commit every writable copy (when an input returns, and at exit)."""
    return sum(copy.commit() for copy in _copies)


def remove_all() -> None:
    """Delete this worker's copies (after the last commit)."""
    for copy in _copies:
        shutil.rmtree(copy.dir, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(copy.dir))
        except OSError:
            pass
        copy.http.close()
    _copies.clear()


def describe(copies: Iterable[WorkingCopy]) -> str:
    return ", ".join(f"{c.volume} at {c.mount_path}" for c in copies)
