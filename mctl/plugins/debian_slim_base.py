"""The `debian_slim` base images of the `oci` builder, one per Python version, made from Debian's
own packages.

No public container registry is assumed, and no prebuilt Python is downloaded: each Python
version is the `python3` of the Debian release that ships it, bootstrapped with `debootstrap
--variant=minbase` from the Debian mirror apt already uses, imported with `podman import` (or
`buildah`), and cached as a tarball keyed by its recipe. Debian ships one default Python per
release, so the versions are those releases' (checked against the mirror on 2026-12-06):

| python_version | Debian release | note |
| --- | --- | --- |
| 3.9 | bullseye (11) | |
| 3.11 | bookworm (12) | the default; `scripts/images-dev up` builds it ahead of time |
| 3.13 | trixie (13) | |
| 3.14 | forky (testing) | a rolling release: the base is a snapshot of the day it was built |

Python 3.10 and 3.12 are in no Debian release, PyPI and npm have no package that carries a
Linux CPython (their "portable Python" installers download from GitHub, which machines like
these cannot reach), and uv's Python downloads come from GitHub too. For those versions give an
image that has them (`Image.from_registry(..., add_python=...)`), or name a base per version:
`MCTL_IMAGE_BASE_DEBIAN_SLIM_3_12=registry:5000/python:3.12` on the control plane.

Making a base needs root and `debootstrap` on the build host (as `scripts/images-dev up` does for
3.11); it takes about a minute per release and is done once.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mctl.core.images import BuildContext

DEFAULT_PYTHON = "3.11"
# python_version -> (Debian suite, debootstrap script for it)
RELEASES = {"3.9": ("bullseye", "bullseye"), "3.11": ("bookworm", "bookworm"),
            "3.13": ("trixie", "trixie"), "3.14": ("forky", "sid")}
PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"


def available() -> str:
    return ", ".join(f"{v} ({suite})" for v, (suite, _) in RELEASES.items())


def base_for(version: str | None) -> tuple[str, str | None]:
    """The image `debian_slim(python_version=version)` starts from, and the Debian suite that
    makes it (None: an image the operator named, used as it is)."""
    version = version or DEFAULT_PYTHON
    override = os.environ.get("MCTL_IMAGE_BASE_DEBIAN_SLIM_" + version.replace(".", "_"))
    if version == DEFAULT_PYTHON and not override:
        override = os.environ.get("MCTL_IMAGE_BASE_DEBIAN_SLIM")
    if version in RELEASES:
        suite = RELEASES[version][0]
        tag = override or f"localhost/mctl/debian-slim:{suite}"
        return tag, (suite if tag.startswith("localhost/") else None)
    if override:
        return override, None
    from mctl.core.images import ImageBuildError

    raise ImageBuildError(
        f"Image.debian_slim(python_version={version!r}) cannot be built here: mctl makes "
        f"debian_slim from Debian's own packages, which have Python {available()}, and no other "
        f"Python {version} can be fetched on this machine. Use one of those versions, or an image "
        f"that has Python {version} (Image.from_registry(..., add_python={version!r})), or set "
        f"MCTL_IMAGE_BASE_DEBIAN_SLIM_{version.replace('.', '_')} on the control plane to such an "
        "image.")


def ensure(tag: str, suite: str | None, tool: str, ctx: BuildContext) -> None:
    """Make sure `tag` exists locally, bootstrapping it from Debian's packages when mctl owns it."""
    from mctl.core.images import ImageBuildError

    if _exists(tool, tag):
        return
    if suite is None:
        return  # an operator's image: the build pulls it
    if not shutil.which("debootstrap") or os.geteuid() != 0:
        raise ImageBuildError(
            f"The debian_slim base image {tag} is not on this machine, and making it needs root "
            "and debootstrap (apt-get install debootstrap). Run the control plane as root with "
            "debootstrap installed (it is made once), build it with `scripts/images-dev up` (3.11), "
            f"or set MCTL_IMAGE_BASE_DEBIAN_SLIM{_suffix(suite)} to an image you have.")
    mirror = debian_mirror()
    if not mirror:
        raise ImageBuildError("No Debian mirror found in /etc/apt/sources.list(.d) to make the "
                              f"debian_slim base {tag} from; set MCTL_DEBIAN_MIRROR to its URL.")
    script = dict(RELEASES.values()).get(suite, suite)
    key = hashlib.sha256(f"{suite} {PACKAGES} minbase".encode()).hexdigest()[:12]
    # Shared with `scripts/images-dev` when root: one bootstrap per machine, not per MCTL_HOME.
    cache = Path(os.environ.get("MCTL_BASE_CACHE") or "/var/cache/mctl/images")
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"debian-{suite}-{key}.tar"
    if not tarball.is_file():
        ctx.say(f"debian_slim base {tag}: bootstrapping Debian {suite} from {mirror} (once; "
                f"cached in {tarball})")
        root = tempfile.mkdtemp(prefix=f"mctl-debootstrap-{suite}-", dir="/var/tmp")
        try:
            ctx.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", suite, root,
                     mirror, f"/usr/share/debootstrap/scripts/{script}"],
                    what=f"bootstrapping the debian_slim base ({suite})")
            for junk in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*"):
                for path in glob.glob(os.path.join(root, junk)):
                    if os.path.isfile(path):
                        os.unlink(path)
            ctx.run(["tar", "-C", root, "-cf", f"{tarball}.tmp", "."],
                    what=f"packing the debian_slim base ({suite})")
            os.replace(f"{tarball}.tmp", tarball)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    importer = tool if tool in ("podman", "docker") else (shutil.which("podman") and "podman")
    if importer:
        ctx.run([importer, "import", "--change", f"LABEL mctl.base={key}", "--change",
                 'CMD ["/bin/bash"]', str(tarball), tag], what=f"importing {tag}")
    else:  # buildah alone: a container from scratch with the tree, committed
        ctx.run(["sh", "-c", f'c=$(buildah from scratch) && buildah add "$c" {tarball} / && '
                 f'buildah config --label mctl.base={key} --cmd /bin/bash "$c" && '
                 f'buildah commit "$c" {tag} && buildah rm "$c"'], what=f"importing {tag}")


def _suffix(suite: str) -> str:
    version = next((v for v, (s, _) in RELEASES.items() if s == suite), DEFAULT_PYTHON)
    return "" if version == DEFAULT_PYTHON else "_" + version.replace(".", "_")


def _exists(tool: str, tag: str) -> bool:
    argv = ([tool, "inspect", "--type", "image", tag] if tool == "buildah"
            else [tool, "image", "inspect", tag])
    return subprocess.run(argv, capture_output=True).returncode == 0


def debian_mirror() -> str | None:
    """The Debian mirror apt uses here (deb822 sources first, then sources.list), never a
    hard-coded host."""
    if os.environ.get("MCTL_DEBIAN_MIRROR"):
        return os.environ["MCTL_DEBIAN_MIRROR"]
    candidates: list[str] = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for line in Path(path).read_text(errors="replace").splitlines():
            if line.startswith("URIs:"):
                candidates += line.split()[1:]
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            parts = re.sub(r"\[[^\]]*\]", " ", line).split()  # drop [signed-by=... arch=...]
            if len(parts) > 1 and parts[0] == "deb":
                candidates.append(parts[1])
    for uri in candidates:
        if "security" not in uri and uri.rstrip("/").endswith("/debian"):
            return uri
    return None
