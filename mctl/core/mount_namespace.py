"""Start a worker with each volume's directory bound at its mount path (`/data`), in a mount
namespace of its own: the binds are seen by that worker only, and vanish with it.

As root this is util-linux's `unshare --mount` (always installed) and `mount --bind`: `unshare`
and the shell `exec` the worker, so it keeps the pid the backend signals (SIGTERM drains it).
Without root, bubblewrap (`bwrap`) makes the namespace. With neither, a function with volumes
fails to start with what to install, never running against some other directory.
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from mctl.core.launch import Mount

# Binds each SRC at DEST (made if missing; read-only for "ro"), then becomes the worker:
# "$0 rw|ro SRC DEST ... -- ARGV".
_BIND = ('set -e; while [ "$1" != -- ]; do mkdir -p "$2" "$3"; mount --bind "$2" "$3"; '
         'if [ "$1" = ro ]; then mount -o remount,bind,ro "$3"; fi; shift 3; done; '
         'shift; exec "$@"')


class NoMountNamespace(RuntimeError):
    """Neither root with `unshare` nor bubblewrap is available on this machine."""


def method() -> str:
    """'unshare', 'bwrap', or '' when no way to make a mount namespace is available here."""
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("mount"):
        return "unshare"
    if shutil.which("bwrap"):
        return "bwrap"
    return ""


def problem() -> str:
    """Why volumes cannot be bound at their mount paths here ('' when they can)."""
    if method():
        return ""
    return ("cannot bind volumes at their mount paths: it needs root (for util-linux's "
            "`unshare --mount`) or bubblewrap. Install bubblewrap (Debian: `apt-get install "
            "bubblewrap`) or run the server as root.")


def binds(mounts: Sequence[Mount], task_id: str | None = None) -> list[tuple[str, str, str]]:
    """(rw|ro, host directory, mount path) of each mount: the driver's directory, or this
    task's working copy (`volume_sync.sources`) for a copying driver."""
    from mctl.core.volume_sync import sources

    copies = sources(mounts, task_id or "task") if task_id else {}
    out = []
    for m in mounts:
        src = m.host_path or copies.get(m.path)
        if src:
            out.append(("ro" if m.read_only else "rw", src, m.path))
    return out


def wrap(argv: Sequence[str], mounts: Sequence[Mount], task_id: str | None = None) -> list[str]:
    """`argv`, run with each mount's host directory (or this task's working copy) bound at its
    path. The bubblewrap form needs the sources to exist: make them first (`sources`)."""
    binds_ = binds(mounts, task_id)
    if not binds_:
        return list(argv)
    how = method()
    if how == "unshare":
        flat = [part for triple in binds_ for part in triple]
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _BIND,
                "mctl-volumes", *flat, "--", *argv]
    if how == "bwrap":
        flat = [part for mode, src, dest in binds_
                for part in ("--ro-bind" if mode == "ro" else "--bind", src, dest)]
        return ["bwrap", "--dev-bind", "/", "/", *flat, "--die-with-parent", "--", *argv]
    raise NoMountNamespace(problem())
