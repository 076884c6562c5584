"""The default image: the Python environment mctl runs in.

Recipes with build steps are recorded in the app spec for container builders; run locally they use
this environment too, with the recipe's `env` steps applied, and the worker logs a notice.
"""

from __future__ import annotations

import sys
from typing import Any

import mctl
from mctl.core.plugin_types import ImageBuilder


def build(image: Any) -> dict[str, Any]:
    env: dict[str, str] = {}
    ignored = []
    for step in image.recipe.get("steps", []):
        if step["kind"] == "env":
            env.update(step["vars"])
        else:
            ignored.append(step["kind"])
    notice = None
    if ignored or image.recipe.get("base"):
        notice = (f"image {image.image_id} ({image.recipe.get('base') or 'default'}: "
                  f"{', '.join(ignored) or 'no steps'}) runs in the local Python environment; "
                  "its build steps apply on container backends.")
    return {"python": sys.executable, "env": env, "notice": notice}


@mctl.hookimpl
def mctl_register_image_builders():
    yield ImageBuilder(name="local", build=build, handles=lambda image: True)
