"""Checking cron expressions: the five fields Modal takes, each in range, and at least one date.

One function, `cron_problem`, used by `mctl.Cron(...)` when an app is declared and by the control
plane when an app is published, so that a schedule the runner could never fire is refused before
it is stored. croniter itself accepts a sixth field (seconds) and reads Feb 31 until it gives up;
neither is what a crontab line means.
"""

from __future__ import annotations

FIVE_FIELDS = "'minute hour day-of-month month day-of-week', e.g. '0 9 * * 1-5'"

# (name, smallest, largest) of each field, in order.
FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12),
          ("day of week", 0, 7))


def cron_problem(expr: object, check_fires: bool = True) -> str | None:
    """None if `expr` is a five-field cron expression that fires at some time; else what is wrong
    with it, as a sentence that ends with what to write instead. `check_fires=False` checks only
    the form (`mctl.Cron` itself; the function's declaration checks the rest, naming it)."""
    from croniter import croniter

    if not isinstance(expr, str):
        return f"The cron string must be a str, not {type(expr).__name__}; use {FIVE_FIELDS}."
    fields = expr.split()
    if len(fields) == 1 and fields[0].startswith("@"):  # @daily, @hourly, ...: crontab's aliases
        if croniter.is_valid(expr):
            return None
        return (f"Invalid cron string {expr!r}: unknown alias {fields[0]!r}; use @yearly, "
                "@monthly, @weekly, @daily or @hourly, or five fields.")
    if len(fields) == 6:
        return (f"Invalid cron string {expr!r}: it has six fields, and a cron string takes five "
                f"(no seconds field, as in Modal); use {FIVE_FIELDS}, or mctl.Period(seconds=...) "
                "for intervals under a minute.")
    if len(fields) != 5:
        return (f"Invalid cron string {expr!r}: it has {len(fields)} field"
                f"{'' if len(fields) == 1 else 's'}; use five, {FIVE_FIELDS}.")
    if not croniter.is_valid(expr):
        for i, (name, low, high) in enumerate(FIELDS):
            alone = " ".join(field if j == i else "*" for j, field in enumerate(fields))
            if not croniter.is_valid(alone):
                return (f"Invalid cron string {expr!r}: the {name} field {fields[i]!r} is not "
                        f"valid; {name} takes {low}-{high} (or *, lists a,b, ranges a-b and "
                        "steps */n).")
        return f"Invalid cron string {expr!r}; use {FIVE_FIELDS}."
    if check_fires and never_fires(expr):
        return (f"Cron string {expr!r} can never fire: no date matches it (such as February 31 "
                "or April 31); choose a day that the month has.")
    return None


def never_fires(expr: str) -> bool:
    """True if no time matches the (valid) expression, e.g. '0 0 31 2 *'."""
    from datetime import datetime, timezone

    from croniter import CroniterBadDateError, croniter

    try:
        croniter(expr, datetime(2000, 1, 1, tzinfo=timezone.utc)).get_next(float)
    except CroniterBadDateError:
        return True
    return False
