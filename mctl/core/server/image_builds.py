"""Building an app's images in the control plane, before its version is stored.

Build output goes to the app's log (function "image", task "build"): `mctl app logs` shows it.
When the deployer names a build id, the same lines go to that build's live log
(`build_logs.py`), which `mctl deploy` and `mctl run` follow while the deploy runs. A failed build
refuses the deploy with the log's tail.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mctl.core.server.build_logs import BuildLog
    from mctl.core.server.control import ControlPlane
    from mctl.core.spec import AppSpec, ImageSpec


def context_for(control: ControlPlane, app_id: str, live: BuildLog | None = None,
                mode: str = "deployed") -> Any:
    from mctl.core import secret_store
    from mctl.core.images import BuildContext

    loop = asyncio.get_running_loop()

    def append(line: str) -> None:
        control.append_log(app_id, "build", "image", line)
        if live is not None:
            live.append(line)

    def log(line: str) -> None:  # builders run in a thread; the log lives on the loop
        loop.call_soon_threadsafe(append, line)

    return BuildContext(log=log, blob_path=control.store.blob_path,
                        resolve_secret=lambda name: secret_store.backend().resolve(name),
                        again={"deployed": "deploy again", "sandbox": "call Sandbox.create again"
                               }.get(mode, "run again"))


async def build_app_images(control: ControlPlane, spec: AppSpec, app_id: str,
                           build_id: str | None = None, mode: str = "deployed"
                           ) -> list[dict[str, Any]]:
    """Build every image `spec` uses (one at a time, each cached by id); returns a summary line
    per image for the deployer: its id, builder, and whether anything was built. `build_id`:
    also stream the output to that build's live log (see `build_logs`)."""
    from mctl.core.images import build_image
    from mctl.core.server.build_logs import open_log

    live = open_log(build_id)
    used = sorted(i for i in {f.image_id for f in spec.functions.values()} if i in spec.images)
    summary = []
    try:
        for n, image_id in enumerate(used, 1):
            image = spec.images[image_id]
            if live is not None:
                live.set_image(image_id=image_id, index=n, count=len(used))
            ctx = context_for(control, app_id, live, mode)
            started = time.monotonic()
            built = await asyncio.to_thread(build_image, image, ctx)
            summary.append({"image_id": image_id, "builder": built.get("builder"),
                            "seconds": round(time.monotonic() - started, 3),
                            "log": ctx.lines[-200:]})
    finally:
        if live is not None:
            # The builders' last lines were handed to the loop with call_soon_threadsafe: let
            # them land before the log says it is complete.
            await asyncio.sleep(0)
            live.finish()
    return summary


async def built_image(control: ControlPlane, app_id: str, image: ImageSpec) -> dict[str, Any]:
    """How to run `image` for a pool: the result of its deploy-time build (built again, from the
    builder's cache, after a control-plane restart)."""
    from mctl.core.images import build_image, built

    done = built(image.image_id)
    if done is not None:
        return done
    return await asyncio.to_thread(build_image, image, context_for(control, app_id))
