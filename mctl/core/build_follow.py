"""Following an app's image builds while its deploy runs: the deployer's side of
`GET /api/image-builds/{build_id}/log`.

`mctl deploy` and `mctl run` send `POST /api/apps` with a fresh build id and, at the same time,
long-poll that build's log: each line prints as the control plane's builder writes it. On a
terminal a status line under the output shows which image is building, the build tool's step
(`STEP 3/9: RUN apt-get ...`) and the time so far; it is replaced by one summary line at the end.
Piped output gets the plain lines only. A control plane without the route (an older mctl) is not
followed: the deployer prints the log from the deploy's answer instead, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import sys
import time
from typing import Any, TextIO

# buildah and podman: "STEP 3/9: RUN ..."; docker's classic builder: "Step 3/9 : RUN ...".
_STEP = re.compile(r"^(?:STEP|Step) (\d+)/(\d+)\s?: (.*)$")
_BUILDER = re.compile(r"^image (im-\S+): (\S+) builder$")
_SPINNER = "|/-\\"


class BuildProgress:
    """Prints build lines to `out` and, when `status` is a terminal, keeps a progress line there."""

    def __init__(self, out: TextIO | None = None, status: TextIO | None = None,
                 live: bool | None = None) -> None:
        self.out = out or sys.stdout
        self.status = status or sys.stderr
        if live is None:
            live = _is_terminal(self.status) and os.environ.get("TERM") != "dumb"
        self.live = live
        self.next = 0          # the index of the next line to ask for
        self.followed = False  # the control plane answered the route at least once
        self.image: dict[str, Any] = {}
        self.builders: dict[str, str] = {}
        self.step = ""
        self.last = ""
        self.started = time.monotonic()
        self.printed = 0
        self._frame = 0
        self._shown = False

    # --- input -------------------------------------------------------------------------------
    def feed(self, reply: dict[str, Any]) -> None:
        self.followed = True
        if reply.get("image"):
            if reply["image"].get("image_id") != self.image.get("image_id"):
                self.step = ""
            self.image = reply["image"]
        for line in reply.get("lines") or []:
            self.line(line)
        self.next = max(self.next, int(reply.get("next", self.next)))
        self.draw()

    def line(self, text: str) -> None:
        self._clear()
        print(text, file=self.out, flush=True)
        self.printed += 1
        step = _STEP.match(text.strip())
        if step:
            self.step = f"step {step[1]}/{step[2]}: {step[3]}"
        builder = _BUILDER.match(text)
        if builder:
            self.builders[builder[1]] = builder[2]
        if text.strip():
            self.last = text.strip()

    # --- the status line ---------------------------------------------------------------------
    def text(self) -> str:
        image = self.image
        if not image:
            return ""
        image_id = image.get("image_id", "")
        what = f"Building image {image_id}"
        if image.get("count", 1) > 1:
            what = f"Building image {image.get('index')}/{image.get('count')} {image_id}"
        builder = self.builders.get(image_id)
        # The time before the last line: a narrow terminal cuts the end of the line.
        parts = [what + (f" ({builder})" if builder else ""),
                 f"{time.monotonic() - self.started:.0f}s", self.step or self.last]
        return f"{_SPINNER[self._frame % len(_SPINNER)]} " + " · ".join(p for p in parts if p)

    def draw(self) -> None:
        text = self.text()
        # Nothing shows for images that need no build (the host environment says nothing).
        if not self.live or not text or not self.printed:
            return
        width = shutil.get_terminal_size((100, 20)).columns
        self.status.write("\r\x1b[K" + text[:max(10, width - 1)])
        self.status.flush()
        self._shown = True

    def tick(self) -> None:
        self._frame += 1
        self.draw()

    def _clear(self) -> None:
        if self._shown:
            self.status.write("\r\x1b[K")
            self.status.flush()
            self._shown = False

    def close(self, ok: bool) -> None:
        self._clear()
        if self.live and self.image and self.printed:
            count = self.image.get("count", 1)
            seconds = time.monotonic() - self.started
            word = "image" if count == 1 else "images"
            if ok:
                self.status.write(f"Images ready: {count} {word} in {seconds:.1f}s\n")
            else:
                self.status.write(f"Image build failed after {seconds:.1f}s "
                                  f"(building {self.image.get('image_id')})\n")
            self.status.flush()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def new_build_id() -> str:
    return "bu-" + secrets.token_hex(12)


async def _follow(client: Any, build_id: str, progress: BuildProgress) -> None:
    while True:
        reply = await client.http("GET", f"/api/image-builds/{build_id}/log",
                                  params={"after": progress.next, "wait": 10}, timeout_s=60)
        progress.feed(reply)
        if reply.get("done"):
            return


async def _tick(progress: BuildProgress) -> None:
    while True:
        await asyncio.sleep(0.125)
        progress.tick()


async def post_following(client: Any, body: dict[str, Any], progress: BuildProgress) -> Any:
    """`POST /api/apps` with `body`, printing its image builds live through `progress`."""
    build_id = new_build_id()
    follower = asyncio.ensure_future(_follow(client, build_id, progress))
    ticker = asyncio.ensure_future(_tick(progress)) if progress.live else None
    ok = False
    try:
        result = await client.http("POST", "/api/apps", dict(body, build_id=build_id),
                                   timeout_s=None)
        ok = True
        return result
    finally:
        if ticker is not None:
            ticker.cancel()
        # The deploy has answered, so its builds are over: the follower's long-poll returns at
        # once (the log is marked done). A deploy refused before any build never marks its log:
        # stop waiting and read what there is.
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(follower), 2.0 if ok else 0.2)
        if not follower.done():
            follower.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await follower
        if progress.followed:
            with contextlib.suppress(Exception):
                progress.feed(await client.http("GET", f"/api/image-builds/{build_id}/log",
                                                params={"after": progress.next}, timeout_s=10))
        progress.close(ok)
