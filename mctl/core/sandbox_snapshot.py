"""snapshot_filesystem(): a running sandbox's file system as a new image, by one shell script
that runs where the sandbox runs (this host, or its Slurm node inside the job; podman only, the
node needs no buildah).

Not `podman commit` of the sandbox: gVisor keeps its writes inside the sandbox (the host's layer
never sees them), and a runc container's layer holds the host's shifted owners (its user
namespace: 200000+), so the next sandbox's user could not write its own files. Instead:

1. in the sandbox, as its user: one walk lists every path it sees, marking those changed since
   it started (`_walk`); then a tar of the changed ones (`_TAR`);
2. on the host, a fresh container of the sandbox's image, mounted: the image's paths the sandbox
   user could see, less the sandbox's list, are what it deleted; they are removed from the fresh
   container (so the commit records them as deletions);
3. the changed files are copied in with the owners they had in the sandbox, and the container
   is committed.

What the sandbox says is only ever subtracted from the image's own listing (made by the host's
find on the host's mount), so a sandbox that lies can at most keep or drop files of its own
image in its own snapshot. The removals happen before the sandbox's tar is copied in: each
path's parents are then the image's real directories, never a symlink the sandbox made. A
listing that did not finish (no end marker) carries no deletion rather than too many.

The sandbox's mounts (its volumes) are left out of both: their files are the volume's.
"""

from __future__ import annotations

import os
import shlex

# The kernel's file systems and podman's per-container files: never part of a snapshot.
SKIP = ("/proc", "/sys", "/dev", "/run", "/etc/hostname", "/etc/hosts", "/etc/resolv.conf")
LIST_END = "//mctl-list-end"  # a name find never prints: the listing reached its end
USER_ID = 65534  # sandbox_runtime.SANDBOX_USER's uid and gid


def tag(sandbox_id: str) -> str:
    """The local image a snapshot of `sandbox_id` is committed as."""
    return f"localhost/mctl/snapshot:{sandbox_id.lower()}"


def _skipped(mounts: list[str]) -> list[str]:
    paths = list(SKIP)
    for mount in mounts:
        path = "/" + os.path.normpath(mount).strip("/")
        if path != "/" and path not in paths:
            paths.append(path)
    return paths


def _prune(paths: list[str], root: str = "") -> str:
    """find's `\\( -path A -o -path B \\) -prune` for `paths` under `root` ("" or ".")."""
    return ("\\( " + " -o ".join(f"-path {shlex.quote(root + p)}" for p in paths)
            + " \\) -prune")


def _walk(mounts: list[str]) -> str:
    """In the sandbox, one walk of its file system (a walk under gVisor takes a second or more):
    every path it sees as `d/path` (a directory) or `f/path` (anything else), upper case `D`
    and `F` for those changed since it started (/etc/hostname is written at its start),
    NUL-separated, then LIST_END (find exits 1 when it met a directory it may not read; more
    means it could not run)."""
    new = "-newer /etc/hostname"
    kinds = [(f"{new} -type d", "D"), (new, "F"), ("-type d", "d"), ("", "f")]
    tests = " -o ".join(f"{test + ' ' if test else ''}-exec printf '{kind}%s\\0' {{}} +"
                        for test, kind in kinds)
    return (f"find / {_prune(_skipped(mounts))} -o {tests} 2>/dev/null; "
            f"[ $? -le 1 ] && printf '%s\\0' {shlex.quote(LIST_END)}")


# In the sandbox: the changed paths (NUL-separated on stdin) as a tar on stdout; a directory
# without its contents (those that changed are listed themselves), so the directories it made
# come back with its owner and mode.
_TAR = "tar --null --no-recursion -T - -cf - 2>/dev/null"


def _image_list(mounts: list[str]) -> str:
    """On the host, in the mounted fresh container: the image's paths the sandbox user could
    see (no descent into a directory it could not enter), as `_walk` writes them."""
    hidden = (f"\\( -type d ! -perm -005 ! -user {USER_ID} "
              f"! \\( -group {USER_ID} -perm -050 \\) \\)")
    return (f"find . {_prune(_skipped(mounts), '.')} -o {hidden} -printf 'd/%P\\0' -prune "
            "-o -type d -printf 'd/%P\\0' -o -printf 'f/%P\\0'")


# On the host (as root, or in `podman unshare`): $1 the fresh container, $2 the work directory
# with the sandbox's list in "now". Removes from the container what the sandbox deleted, and
# what it replaced by another kind (a directory by a link, a file by a directory: podman cp
# does not overwrite one kind with another).
_REMOVE = """set -e
m=$(podman mount "$1")
trap 'podman umount "$1" >/dev/null 2>&1' EXIT
(cd "$m" && {image_list}) | LC_ALL=C sort -z > "$2/before"
sed -z 's/^D/d/; s/^F/f/' "$2/now" | LC_ALL=C sort -z > "$2/now.sorted"
LC_ALL=C comm -z -23 "$2/before" "$2/now.sorted" > "$2/gone"
if [ -s "$2/gone" ]; then
    xargs -0 sh -c 'for p; do rm -rf --one-file-system -- "$0${{p#?}}"; done' "$m" < "$2/gone"
fi
"""


def script(container: str, image: str, tag: str, mounts: list[str], user: str) -> str:
    """The shell script that snapshots `container` (a sandbox of `image`, whose commands run as
    `user`) as the local image `tag`. It needs podman, GNU find, grep, sed, sort, cut and comm
    (coreutils 8.25 or later) where it runs."""
    q = shlex.quote
    remove = q(_REMOVE.format(image_list=_image_list(mounts)))
    return f"""set -e
t=$(mktemp -d /tmp/mctl-snapshot.XXXXXX); c=
trap 'rm -rf "$t"; [ -z "$c" ] || podman rm -f "$c" >/dev/null 2>&1' EXIT
podman exec --user {q(user)} {q(container)} /bin/sh -c {q(_walk(mounts))} > "$t/now" || true
grep -za '^[DF]/.' "$t/now" | cut -z -c2- > "$t/changed" || true
podman exec -i --user {q(user)} {q(container)} /bin/sh -c {q(_TAR)} < "$t/changed" \\
    > "$t/changed.tar" || true
c=$(podman create --pull never {q(image)})
if [ "$(tr '\\0' '\\n' < "$t/now" | tail -n 1)" = {q(LIST_END)} ]; then
    if [ "$(id -u)" = 0 ]; then sh -c {remove} sh "$c" "$t"
    else podman unshare sh -c {remove} sh "$c" "$t"; fi
fi
podman cp --archive=false - "$c":/ < "$t/changed.tar"
podman commit -q "$c" {q(tag)} >/dev/null
"""
