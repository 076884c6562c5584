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
_BIND = ('set -e; while [ "$1" != -- ]; do mkdir -p "$3"; mount --bind "$2" "$3"; '
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


def wrap(argv: Sequence[str], mounts: Sequence[Mount]) -> list[str]:
    """`argv`, run with each mount's host directory bound at its path."""
    binds = [("ro" if m.read_only else "rw", m.host_path, m.path) for m in mounts if m.host_path]
    if not binds:
        return list(argv)
    how = method()
    if how == "unshare":
        flat = [part for triple in binds for part in triple]
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _BIND,
                "mctl-volumes", *flat, "--", *argv]
    if how == "bwrap":
        flat = [part for mode, src, dest in binds
                for part in ("--ro-bind" if mode == "ro" else "--bind", src, dest)]
        return ["bwrap", "--dev-bind", "/", "/", *flat, "--die-with-parent", "--", *argv]
    raise NoMountNamespace(problem())
