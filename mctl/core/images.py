"""Building an app's images at deploy time, through the image builder plugins.

The control plane builds every image of an app before it stores the app's version: a build that
fails refuses the deploy with the tail of its log, and no worker starts. Builders cache by image id
(a content hash of the recipe and its files), so an unchanged image builds nothing; the result of
each build is also kept in memory for the pools that start from it.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from mctl.exception import InvalidError

if TYPE_CHECKING:
    from mctl.core.spec import ImageSpec

log = logging.getLogger("mctl.images")

LOG_TAIL_LINES = 25

_built: dict[str, dict[str, Any]] = {}
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


class ImageBuildError(InvalidError):
    """A build failed: the message names the image and the step and ends with the log's tail."""


@dataclass
class BuildContext:
    """What a builder gets besides the recipe: where to log, the recipe's files, a cache dir."""

    log: Callable[[str], None]
    blob_path: Callable[[str], Path]
    resolve_secret: Callable[[str], dict[str, str] | None] = lambda name: None
    lines: list[str] = field(default_factory=list)
    # What a failure message asks for: "deploy again", or "run again" for `mctl run`'s apps.
    again: str = "deploy again"

    def say(self, line: str) -> None:
        self.lines.append(line)
        self.log(line)

    def run(self, argv: list[str], *, what: str | Callable[[], str],
            env: dict[str, str] | None = None, input_bytes: bytes | None = None,
            cwd: str | None = None) -> None:
        """Run a build command, streaming its output line by line to the log; a failure raises
        `ImageBuildError` naming `what` with the output's tail. `what` may be a function, asked
        only on failure (when the log says which step failed)."""
        import subprocess

        self.say(f"$ {' '.join(argv)}")
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.PIPE if input_bytes else subprocess.DEVNULL,
                                    env=env, cwd=cwd)
        except FileNotFoundError:
            where = what() if callable(what) else what
            raise ImageBuildError(f"Building the image failed at {where}: {argv[0]} is not "
                                  "installed. Install it, or change the image.") from None
        if input_bytes:
            assert proc.stdin is not None
            proc.stdin.write(input_bytes)
            proc.stdin.close()
        assert proc.stdout is not None
        tail: list[str] = []
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.say(line)
            tail = (tail + [line])[-LOG_TAIL_LINES:]
        if proc.wait() != 0:
            where = what() if callable(what) else what
            raise ImageBuildError(
                f"Building the image failed at {where} (exit {proc.returncode}); fix that step "
                f"and {self.again}. Last lines of the build log:\n" + "\n".join(tail))


def cache_dir() -> Path:
    """`$MCTL_IMAGE_CACHE`, default `$MCTL_HOME/images`: built virtualenvs and build contexts."""
    from mctl.core import config

    return Path(os.environ.get("MCTL_IMAGE_CACHE") or config.home() / "images")


def builder_for(image: ImageSpec) -> Any:
    from mctl.core import plugins

    builders = plugins.registrations("mctl_register_image_builders")
    # `oci` builds any recipe: it is the fallback, after builders that know a narrower one.
    for builder in sorted(builders, key=lambda b: b.name == "oci"):
        if builder.handles(image):
            return builder
    raise InvalidError(f"No image builder can build image {image.image_id}; install an image "
                       "builder plugin.")


def build_image(image: ImageSpec, ctx: BuildContext) -> dict[str, Any]:
    """Build (or find in the cache) one image; returns how to run it (see `ImageBuilder`)."""
    # A registry base is resolved again on each deploy (its tag may move): no memory of it here.
    force = _forced(image.recipe) or (image.recipe.get("base") or {}).get("kind") == "registry"
    with _lock(image.image_id):
        if image.image_id in _built and not force:
            done = _built[image.image_id]
            if done["builder"] != "local":  # the host environment itself: nothing to say
                ctx.say(f"image {image.image_id}: built earlier ({done['builder']} builder), "
                        "nothing to build")
            return done
        builder = builder_for(image)
        if builder.name != "local":
            ctx.say(f"image {image.image_id}: {builder.name} builder")
        built = builder.build(image, ctx)
        built.setdefault("builder", builder.name)
        _built[image.image_id] = built
        return built


def built(image_id: str) -> dict[str, Any] | None:
    return _built.get(image_id)


def _forced(recipe: dict[str, Any]) -> bool:
    return bool((recipe.get("base") or {}).get("force_build")) or any(
        s.get("force_build") for s in recipe.get("steps", []))


def _lock(image_id: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(image_id, threading.Lock())


# --- what builders share -------------------------------------------------------------------------
def host_pip_settings() -> dict[str, str]:
    """The machine's pip configuration (index, find-links, CA bundle, ...) as PIP_* variables, so
    builds reach the package index the way the host does (an intercepting CA, a private index)."""
    import subprocess
    import sys

    settings: dict[str, str] = {}
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                             text=True, timeout=30).stdout
    except Exception:
        out = ""
    for line in out.splitlines():
        key, _, value = line.partition("=")
        name = key.split(".", 1)[-1].strip()
        if name and value:
            settings["PIP_" + name.upper().replace("-", "_")] = value.strip().strip("'\"")
    for key, value in os.environ.items():
        if key.startswith("PIP_") and key != "PIP_REQUIRE_VIRTUALENV":
            settings[key] = value
    return settings


def host_ca_bundle() -> str | None:
    """The CA bundle the host trusts (`SSL_CERT_FILE`, pip's `cert`, or Debian's bundle)."""
    for candidate in (os.environ.get("SSL_CERT_FILE"), host_pip_settings().get("PIP_CERT"),
                      "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


def pip_args(step: dict[str, Any]) -> list[str]:
    """`pip install` arguments of one pip_install step."""
    import shlex

    opts = step.get("options") or {}
    args = []
    if opts.get("index_url"):
        args += ["--index-url", opts["index_url"]]
    if opts.get("extra_index_url"):
        args += ["--extra-index-url", opts["extra_index_url"]]
    if opts.get("find_links"):
        args += ["--find-links", opts["find_links"]]
    if opts.get("pre"):
        args.append("--pre")
    if opts.get("extra_options"):
        args += shlex.split(opts["extra_options"])
    return args + list(step["packages"])


def extract_blob(ctx: BuildContext, blob: str, dest: Path) -> None:
    import zipfile

    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(ctx.blob_path(blob)) as zf:
        for info in zf.infolist():
            target = dest / info.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(info))
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                target.chmod(mode)
