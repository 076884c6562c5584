"""Fire `Period` and `Cron` schedules of deployed apps (when the scheduler does not do it itself).

A `Period` counts from when the schedule was first seen; a `Cron` follows croniter in its time
zone. Each firing is an ordinary call with no arguments.

Next fire times are stored (table `schedule_fires`), and a firing's new time is committed in the
same transaction as the input it enqueues, so a control-plane restart never fires one time twice.
A time that passed while the server was down fires once on start, however many were missed.
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
        # (function_id, schedule as JSON) -> next fire time; loaded from the store on start.
        self.next: dict[tuple[str, str], float] = control.store.fire_times()

    def _due(self) -> list[str]:
        """Functions to fire now. Their new fire times join the store's pending commit, which
        also holds the inputs the caller enqueues for them."""
        control = self.control
        if control.scheduler is not None and control.scheduler.handles_schedules:
            return []
        store = control.store
        now = time.time()
        deployed = {a["app_id"] for a in store.apps()
                    if a["mode"] == "deployed" and a["state"] == "running"}
        fired = []
        seen = set()
        for fid, fs in control.functions.items():
            sched = fs.spec.schedule
            if sched is None or fs.app_id not in deployed or fs.stopped:
                continue
            key = (fid, sched.model_dump_json())
            seen.add(key)
            when = self.next.get(key)
            if when is None:
                self.next[key] = next_fire(sched, now)
                store.set_fire_time(*key, self.next[key])
            elif now >= when:
                self.next[key] = next_fire(sched, now)  # missed times collapse into this one
                store.new_fire_times.append((*key, self.next[key]))
                fired.append(fid)
        for key in list(self.next):
            if key not in seen:  # app stopped or schedule changed: start afresh if it returns
                del self.next[key]
                store.forget_fire_time(*key)
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
