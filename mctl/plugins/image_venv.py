"""The `venv` image builder: the fast path on the local backend.

A recipe that is only Python packages, environment variables and Python source (on the default
image or `debian_slim` of the host's Python version) becomes a virtual environment per image id
under `$MCTL_HOME/images/venv/`, built once. Any other step (apt_install, run_commands, a registry
or Dockerfile base, files at absolute paths) is left to the `oci` builder.

The environment is layered on the host's: a `.pth` file appends the site directories of the Python
mctl runs in (where mctl and its dependencies live) after the venv's own, so the worker runtime
imports without reinstalling mctl in every image, and the image's packages win over the host's.
(`--system-site-packages` would not do: when the host Python is itself a virtualenv it exposes the
base interpreter's site-packages, not the environment mctl is installed in.) pip runs with the
host's configuration (index, find-links, CA bundle), as the user's own `pip install` would.
"""

from __future__ import annotations

import os
import shutil
import site
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mctl
from mctl.core.plugin_types import ImageBuilder

if TYPE_CHECKING:
    from mctl.core.images import BuildContext
    from mctl.core.spec import ImageSpec

VENV_STEPS = {"pip_install", "env", "add_local_python_source", "run_function"}
MARKER = ".mctl-built"


def handles(image: ImageSpec) -> bool:
    recipe = image.recipe
    base = recipe.get("base")
    if base is not None and base.get("kind") != "debian_slim":
        return False
    version = recipe.get("python_version")
    if version and version != f"{sys.version_info.major}.{sys.version_info.minor}":
        return False
    if base is None and all(s["kind"] == "env" for s in recipe.get("steps", [])):
        return False  # the host environment itself (image_local) is enough
    if os.environ.get("MCTL_IMAGE_BUILDER") == "oci":  # a backend whose nodes need images
        return False
    return all(s["kind"] in VENV_STEPS for s in recipe.get("steps", []))


def build(image: ImageSpec, ctx: BuildContext) -> dict[str, Any]:
    from mctl.core.images import cache_dir

    steps = image.recipe.get("steps", [])
    env: dict[str, str] = {}
    for step in steps:
        if step["kind"] == "env":
            env.update(step["vars"])
    root = cache_dir() / "venv" / image.image_id
    python = root / "bin" / "python"
    forced = any(s.get("force_build") for s in steps) or bool(
        (image.recipe.get("base") or {}).get("force_build"))
    if (root / MARKER).exists() and not forced:
        ctx.say(f"image {image.image_id}: cached virtualenv {root}, nothing to build")
        return {"python": str(python), "env": env, "runtime": "venv"}
    shutil.rmtree(root, ignore_errors=True)
    try:
        _create(image, ctx, root, steps)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)  # never leave a half-built environment cached
        raise
    (root / MARKER).write_text(image.image_id + "\n")
    ctx.say(f"image {image.image_id}: built virtualenv {root}")
    return {"python": str(python), "env": env, "runtime": "venv"}


def _create(image: ImageSpec, ctx: BuildContext, root: Path, steps: list[dict[str, Any]]) -> None:
    from mctl.core.images import extract_blob, host_pip_settings, pip_args

    root.parent.mkdir(parents=True, exist_ok=True)
    ctx.run([sys.executable, "-m", "venv", "--without-pip", str(root)], what="creating the venv")
    site_dir = Path(next(root.glob("lib/python*/site-packages")))
    host_dirs = [p for p in [*site.getsitepackages(), site.getusersitepackages()] if os.path.isdir(p)]
    # Host site dirs after the venv's own: mctl and its dependencies import, the image's win.
    (site_dir / "_mctl_host.pth").write_text(
        "".join(f"import site; site.addsitedir({d!r})\n" for d in host_dirs))
    env = {**os.environ, **host_pip_settings(), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PIP_REQUIRE_VIRTUALENV", None)
    env.pop("PYTHONPATH", None)
    for n, step in enumerate(steps, 1):
        what = f"step {n} ({step['kind']})"
        step_env = dict(env, **_secret_values(step, n, ctx))  # this step's only
        if step["kind"] == "pip_install":
            # The host's pip, installing into the venv: no pip bootstrap per image.
            ctx.run([sys.executable, "-m", "pip", "--python", str(root / "bin" / "python"),
                     "install", "--no-input", *pip_args(step)], what=f"{what}: pip install "
                    f"{' '.join(step['packages'])}", env=step_env)
        elif step["kind"] == "add_local_python_source":
            extract_blob(ctx, step["blob"], site_dir)
            ctx.say(f"{what}: added {', '.join(step['modules'])}")
        elif step["kind"] == "run_function":
            tmp = root / ".mctl-run-function"
            extract_blob(ctx, step["blob"], tmp)
            code = ("import cloudpickle, sys; f, a, k = cloudpickle.loads(open(sys.argv[1], 'rb')"
                    ".read()); f(*a, **k)")
            ctx.run([str(root / "bin" / "python"), "-c", code, str(tmp / "function.pkl")],
                    what=f"{what}: {step['name']}()", env=step_env, cwd=str(root))
            shutil.rmtree(tmp, ignore_errors=True)


def _secret_values(step: dict[str, Any], n: int, ctx: BuildContext) -> dict[str, str]:
    from mctl.exception import InvalidError

    values: dict[str, str] = {}
    for name in step.get("secrets") or []:
        got = ctx.resolve_secret(name)
        if got is None:
            raise InvalidError(f"Secret {name!r} (step {n}, {step['kind']}) does not exist; "
                               f"create it with `mctl secret create {name} KEY=VALUE`.")
        values.update(got)
    return values


@mctl.hookimpl
def mctl_register_image_builders():
    yield ImageBuilder(name="venv", build=build, handles=handles)
