"""Fire `Period` and `Cron` schedules of deployed apps (when the scheduler does not do it itself).

A `Period` counts from when the app version was activated; a `Cron` follows croniter in its time
zone. Each firing is an ordinary call with no arguments.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from typing import TYPE_CHECKING

from mctl.core.spec import ScheduleSpec

if TYPE_CHECKING:
    from mctl.core.server.control import ControlPlane

log = logging.getLogger("mctl.schedules")


def next_fire(schedule: ScheduleSpec, after: float) -> float:
    """The first firing time strictly after `after` (epoch seconds)."""
    if schedule.kind == "period":
        assert schedule.seconds is not None
        return after + schedule.seconds
    import zoneinfo

    from croniter import croniter

    start = datetime.fromtimestamp(after, zoneinfo.ZoneInfo(schedule.timezone))
    return croniter(schedule.cron, start).get_next(float)


class ScheduleRunner:
    def __init__(self, control: ControlPlane) -> None:
        self.control = control
        self.next: dict[tuple[str, ScheduleSpec], float] = {}

    def _due(self) -> list[str]:
        control = self.control
        if control.scheduler is not None and control.scheduler.handles_schedules:
            return []
        now = time.time()
        deployed = {a["app_id"] for a in control.store.apps()
                    if a["mode"] == "deployed" and a["state"] == "running"}
        fired = []
        seen = set()
        for fid, fs in control.functions.items():
            sched = fs.spec.schedule
            if sched is None or fs.app_id not in deployed or fs.stopped:
                continue
            key = (fid, sched)
            seen.add(key)
            when = self.next.get(key)
            if when is None:
                self.next[key] = next_fire(sched, now)
            elif now >= when:
                self.next[key] = next_fire(sched, now)
                fired.append(fid)
        for key in list(self.next):
            if key not in seen:
                del self.next[key]
        return fired

    async def run(self) -> None:
        from mctl.core.serialization import dumps

        empty_call = dumps(((), {}))
        while True:
            await asyncio.sleep(0.5)
            try:
                for fid in self._due():
                    fs = self.control.functions.get(fid)
                    if fs is not None:
                        call_id = self.control.enqueue_internal(fs, empty_call)
                        log.info("schedule fired %s (%s)", fs.spec.tag, call_id)
                        self.control.append_log(fs.app_id, "schedule", fs.spec.tag,
                                                f"mctl: schedule fired {fs.spec.tag} ({call_id})")
            except Exception:
                log.exception("schedule runner failed")
