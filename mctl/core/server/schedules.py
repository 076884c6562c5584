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
        # Schedules whose next time cannot be computed: logged once, then left alone (they never
        # fire) so that one bad schedule cannot stop everyone else's.
        self.broken: set[tuple[str, str]] = set()

    def _next_fire(self, key: tuple[str, str], fs: object, sched: ScheduleSpec,
                   now: float) -> float | None:
        """The schedule's next time, or None (logged once, to the server and the app's log)
        when it has none, e.g. a Cron on February 31 stored before deploys refused them."""
        try:
            return next_fire(sched, now)
        except Exception as exc:
            if key not in self.broken:
                self.broken.add(key)
                tag = getattr(getattr(fs, "spec", None), "tag", key[0])
                what = sched.cron if sched.kind == "cron" else f"every {sched.seconds}s"
                message = (f"mctl: schedule of {tag} ({what}) can never fire and is skipped "
                           f"({type(exc).__name__}: {exc}); fix it and deploy again.")
                log.error("%s", message)
                self.control.append_log(getattr(fs, "app_id", ""), "schedule", tag, message)
                self.control._schedule_flush()
            return None

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
            if key in self.broken:
                continue
            when = self.next.get(key)
            if when is None:
                first = self._next_fire(key, fs, sched, now)
                if first is not None:
                    self.next[key] = first
                    store.set_fire_time(*key, first)
            elif now >= when:
                later = self._next_fire(key, fs, sched, now)  # missed times collapse into it
                if later is None:
                    del self.next[key]
                    store.forget_fire_time(*key)
                    continue
                self.next[key] = later
                store.new_fire_times.append((*key, later))
                fired.append(fid)
        for key in list(self.next):
            if key not in seen:  # app stopped or schedule changed: start afresh if it returns
                del self.next[key]
                store.forget_fire_time(*key)
        self.broken &= seen
        return fired

    async def run(self) -> None:
        from mctl.core.serialization import dumps

        empty_call = dumps(((), {}))
        while True:
            await asyncio.sleep(0.5)
            try:
                due = self._due()
            except Exception:
                log.exception("schedule runner failed")
                continue
            for fid in due:  # one function's failure to enqueue leaves the others firing
                fs = self.control.functions.get(fid)
                if fs is None:
                    continue
                try:
                    call_id = self.control.enqueue_internal(fs, empty_call)
                    log.info("schedule fired %s (%s)", fs.spec.tag, call_id)
                    self.control.append_log(fs.app_id, "schedule", fs.spec.tag,
                                            f"mctl: schedule fired {fs.spec.tag} ({call_id})")
                except Exception:
                    log.exception("schedule of %s failed to fire", fs.spec.tag)
