"""`Period` and `Cron` schedules, validated when the app is declared."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mctl.exception import InvalidError


class Schedule:
    """Base of schedules accepted by `@app.function(schedule=...)`."""

    def spec_fields(self) -> dict[str, Any]:
        """The fields of core's `ScheduleSpec` for this schedule."""
        raise NotImplementedError


@dataclass(frozen=True, init=False)
class Period(Schedule):
    """Run every fixed interval, counted from deployment: `Period(hours=1, minutes=30)`."""

    seconds: float

    def __init__(self, *, years: int = 0, months: int = 0, weeks: float = 0, days: float = 0,
                 hours: float = 0, minutes: float = 0, seconds: float = 0) -> None:
        total = ((((years * 365 + months * 30 + weeks * 7 + days) * 24 + hours) * 60 + minutes) * 60
                 + seconds)
        if total <= 0:
            raise InvalidError(f"Period must be positive, got {total} seconds; "
                               "pass e.g. Period(minutes=5).")
        object.__setattr__(self, "seconds", float(total))
        object.__setattr__(self, "_parts", dict(years=years, months=months, weeks=weeks,
                                                  days=days, hours=hours, minutes=minutes,
                                                  seconds=seconds))

    def spec_fields(self) -> dict[str, Any]:
        return {"kind": "period", "seconds": self.seconds}

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={v}" for k, v in self._parts.items() if v)  # type: ignore[attr-defined]
        return f"Period({parts})"


@dataclass(frozen=True)
class Cron(Schedule):
    """Run on a cron expression, in UTC unless `timezone` names an IANA zone.

    `Cron("0 9 * * 1-5", timezone="Europe/Berlin")`.
    """

    cron_string: str
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        from mctl.core.cron import cron_problem  # imports croniter: only when a Cron is declared

        problem = cron_problem(self.cron_string, check_fires=False)
        if problem:
            raise InvalidError(problem)
        try:
            import zoneinfo

            zoneinfo.ZoneInfo(self.timezone)
        except Exception:
            raise InvalidError(
                f"Unknown time zone {self.timezone!r} in Cron; use an IANA name such as "
                "'UTC' or 'America/New_York'.") from None

    def never_fires(self) -> bool:
        """True for a valid expression that no date matches, such as '0 0 31 2 *'."""
        from mctl.core.cron import never_fires

        return never_fires(self.cron_string)

    def spec_fields(self) -> dict[str, Any]:
        return {"kind": "cron", "cron": self.cron_string, "timezone": self.timezone}
