"""Live image build output for the deployer: `GET /api/image-builds/{build_id}/log`.

The deployer picks a random build id, sends it with `POST /api/apps` and long-polls this route
while the deploy runs, so `mctl deploy` shows the build as it happens (the same lines also go to
the app's log, for `mctl app logs`). A build log lives in memory only, from its first line until a
few minutes after its deploy returned: it is a view for the one client that asked for it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

KEEP_AFTER_DONE_S = 300.0
MAX_LINES = 20_000  # a runaway build keeps its last lines; the app's log has them all


@dataclass
class BuildLog:
    lines: list[str] = field(default_factory=list)
    first: int = 0  # index of lines[0] among all lines (older ones dropped past MAX_LINES)
    done_at: float | None = None
    # What is being built now, for the deployer's progress line.
    image: dict[str, Any] = field(default_factory=dict)
    event: asyncio.Event = field(default_factory=asyncio.Event)

    def append(self, line: str) -> None:
        self.lines.append(line)
        if len(self.lines) > MAX_LINES:
            drop = len(self.lines) - MAX_LINES
            del self.lines[:drop]
            self.first += drop
        self._wake()

    def set_image(self, **image: Any) -> None:
        self.image = image
        self._wake()

    def finish(self) -> None:
        self.done_at = time.monotonic()
        self._wake()

    def _wake(self) -> None:
        self.event.set()
        self.event = asyncio.Event()


_logs: dict[str, BuildLog] = {}


def open_log(build_id: str | None) -> BuildLog | None:
    """The log of `build_id`, made on first use (on the event loop); None without an id."""
    if not build_id:
        return None
    _expire()
    return _logs.setdefault(build_id, BuildLog())


def _expire() -> None:
    now = time.monotonic()
    for key in [k for k, v in _logs.items()
                if v.done_at is not None and now - v.done_at > KEEP_AFTER_DONE_S]:
        del _logs[key]


async def log_route(request: web.Request) -> web.Response:
    """`?after=N&wait=S`: lines from index N on, waiting up to S seconds (at most 30) for one.
    Answers `{"lines", "next", "done", "image"}`; an unknown id is a build not started yet."""
    build_id = request.match_info["build_id"]
    try:
        after = max(0, int(request.query.get("after", 0)))
        wait = min(max(0.0, float(request.query.get("wait", 0))), 30.0)
    except ValueError:
        return web.json_response({"error": "after and wait are numbers"}, status=400)
    log = open_log(build_id)
    assert log is not None
    if wait and after >= log.first + len(log.lines) and log.done_at is None:
        try:
            await asyncio.wait_for(log.event.wait(), wait)
        except asyncio.TimeoutError:
            pass
    start = max(after, log.first)
    lines = log.lines[start - log.first:]
    return web.json_response({"lines": lines, "next": start + len(lines),
                              "done": log.done_at is not None, "image": log.image})
