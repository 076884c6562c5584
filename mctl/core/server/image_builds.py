"""Building an app's images in the control plane, before its version is stored.

Build output goes to the app's log (function "image", task "build"): `mctl app logs` shows it,
and `mctl run` prints it as it comes. A failed build refuses the deploy with the log's tail.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mctl.core.server.control import ControlPlane
    from mctl.core.spec import AppSpec, ImageSpec


def context_for(control: ControlPlane, app_id: str) -> Any:
    from mctl.core import secret_store
    from mctl.core.images import BuildContext

    loop = asyncio.get_running_loop()

    def log(line: str) -> None:  # builders run in a thread; the log lives on the loop
        loop.call_soon_threadsafe(control.append_log, app_id, "build", "image", line)

    return BuildContext(log=log, blob_path=control.store.blob_path,
                        resolve_secret=lambda name: secret_store.backend().resolve(name))


async def build_app_images(control: ControlPlane, spec: AppSpec, app_id: str
                           ) -> list[dict[str, Any]]:
    """Build every image `spec` uses (one at a time, each cached by id); returns a summary line
    per image for the deployer: its id, builder, and whether anything was built."""
    from mctl.core.images import build_image

    used = {f.image_id for f in spec.functions.values()}
    summary = []
    for image_id in sorted(used):
        image = spec.images.get(image_id)
        if image is None:
            continue
        ctx = context_for(control, app_id)
        started = time.monotonic()
        built = await asyncio.to_thread(build_image, image, ctx)
        summary.append({"image_id": image_id, "builder": built.get("builder"),
                        "seconds": round(time.monotonic() - started, 3),
                        "log": ctx.lines[-200:]})
    return summary


async def built_image(control: ControlPlane, app_id: str, image: ImageSpec) -> dict[str, Any]:
    """How to run `image` for a pool: the result of its deploy-time build (built again, from the
    builder's cache, after a control-plane restart)."""
    from mctl.core.images import build_image, built

    done = built(image.image_id)
    if done is not None:
        return done
    return await asyncio.to_thread(build_image, image, context_for(control, app_id))
