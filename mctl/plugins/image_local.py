"""The default image: the Python environment mctl runs in.

It builds the default image and recipes of `Image.env` steps only; every other recipe goes to the
`venv` or `oci` builder, so no step is ever silently ignored.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import mctl
from mctl.core.plugin_types import ImageBuilder

if TYPE_CHECKING:
    from mctl.core.images import BuildContext
    from mctl.core.spec import ImageSpec


def handles(image: ImageSpec) -> bool:
    return image.recipe.get("base") is None and image.recipe.get("python_version") is None and \
        all(step["kind"] == "env" for step in image.recipe.get("steps", []))


def build(image: ImageSpec, ctx: BuildContext) -> dict[str, Any]:
    env: dict[str, str] = {}
    for step in image.recipe.get("steps", []):
        env.update(step["vars"])
    return {"python": sys.executable, "env": env, "runtime": "process"}


@mctl.hookimpl
def mctl_register_image_builders():
    yield ImageBuilder(name="local", build=build, handles=handles)
