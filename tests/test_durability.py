"""What survives a control-plane restart: schedule fire times; and blobs re-used by a new upload."""

import json
import os
import sqlite3
import time

import pytest

from mctl.core import transport

from conftest import wait_until

pytestmark = pytest.mark.integration

PERIOD = 4

TICKER = f"""
import os, mctl
app = mctl.App("ticker")

@app.function(schedule=mctl.Period(seconds={PERIOD}),
              env={{"TICK_FILE": os.environ.get("TICK_FILE", "/dev/null")}})
def tick():
    with open(os.environ["TICK_FILE"], "a") as fh:
        fh.write("tick\\n")
"""


def fire_times_in(state_dir):
    """Timestamps of the server's 'schedule fired' log lines, read from its database."""
    db = sqlite3.connect(state_dir / "state.db")
    try:
        return [ts for (ts,) in db.execute(
            "SELECT ts FROM logs WHERE line LIKE 'mctl: schedule fired%' ORDER BY id")]
    finally:
        db.close()


def fire_times(url):
    with transport.urlopen(f"{url}/api/apps/ticker/logs") as resp:
        return [r["ts"] for r in json.load(resp) if r["line"].startswith("mctl: schedule fired")]


def ticks(path):
    return path.read_text().count("tick") if path.exists() else 0


def test_missed_fire_time_fires_once_after_restart(server_process, tmp_path):
    from test_deploy import mctl_cli

    tick_file = tmp_path / "ticks"
    app_file = tmp_path / "ticker.py"
    app_file.write_text(TICKER)
    mctl_cli("deploy", str(app_file), env=dict(os.environ, TICK_FILE=str(tick_file)))
    assert wait_until(lambda: len(fire_times(server_process.url)) >= 1, timeout=30)
    server_process.stop()
    before = fire_times_in(server_process.state_dir)

    # Stay down across two fire times: on start it fires once, not twice and not never.
    time.sleep(max(0.0, before[-1] + 2 * PERIOD + 1 - time.time()))
    restarted = time.time()
    server_process.start()
    assert wait_until(lambda: len(fire_times(server_process.url)) > len(before), timeout=20)
    catch_up = fire_times(server_process.url)[len(before)]
    assert catch_up - restarted < PERIOD - 0.5, "the missed firing waited for a new period"
    time.sleep(max(0.0, catch_up + PERIOD - 1 - time.time()))
    assert len(fire_times(server_process.url)) == len(before) + 1
    # every firing ran (one stored before the stop may run only after the restart)
    assert wait_until(lambda: ticks(tick_file) == len(before) + 1, timeout=20), ticks(tick_file)


def test_reupload_refreshes_a_blob_for_retention(server_process):
    from mctl.core.protocol import blob_id

    data = b"bundle bytes"
    bid = blob_id(data)

    def put():
        with transport.urlopen(f"{server_process.url}/blobs/{bid}", data=data,
                               method="PUT") as resp:
            assert json.load(resp) == {"blob_id": bid}

    put()
    path = server_process.state_dir / "blobs" / bid
    old = time.time() - 10 * 86400
    os.utime(path, (old, old))
    put()
    assert path.stat().st_mtime > time.time() - 60
