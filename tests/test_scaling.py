"""The local scheduler: min_containers, max_containers, scaledown_window, @exit on scale-down."""

import re

import pytest

from conftest import load_app, wait_until
from mctl.core.transport import urlopen

pytestmark = pytest.mark.integration


def containers(url, function):
    body = urlopen(f"{url}/metrics").read().decode()
    match = re.search(r'mctl_containers\{[^}]*function="%s"[^}]*\} (\S+)' % function, body)
    return int(float(match.group(1))) if match else 0


def test_pools_scale_between_bounds_and_down_when_idle(tmp_path, monkeypatch):
    monkeypatch.setenv("EXIT_MARK", str(tmp_path / "exit-mark"))
    module, app = load_app("scaling")
    with app.run():
        url = app._server_url
        # min_containers start without any call
        assert wait_until(lambda: containers(url, "warm") == 2)
        # ten 0.3 s inputs at once: the pool grows, but never past max_containers=3
        tasks = set(module.warm.map(range(10)))
        assert 2 <= len(tasks) <= 3
        # scale from zero, then back to zero after scaledown_window=1 idle
        assert module.quick.remote(1).startswith("ta-")
        assert containers(url, "quick") == 1
        assert wait_until(lambda: containers(url, "quick") == 0)
        assert containers(url, "warm") >= 2  # min_containers stay
        # a class container scaled down runs its @exit hooks
        assert module.WithExit().ping.remote() == "pong"
    assert wait_until(lambda: (tmp_path / "exit-mark").exists())
    assert (tmp_path / "exit-mark").read_text() == "exited"


def test_cron_next_fire_respects_time_zone():
    from datetime import datetime, timezone

    from mctl.core.server.schedules import next_fire
    from mctl.core.spec import ScheduleSpec

    # 09:00 in Berlin on 2026-01-05 (winter, UTC+1) is 08:00 UTC
    after = datetime(2026, 1, 5, 7, 0, tzinfo=timezone.utc).timestamp()
    spec = ScheduleSpec(kind="cron", cron="0 9 * * *", timezone="Europe/Berlin")
    assert datetime.fromtimestamp(next_fire(spec, after), timezone.utc).hour == 8
    period = ScheduleSpec(kind="period", seconds=90)
    assert next_fire(period, 1000.0) == 1090.0
