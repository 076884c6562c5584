"""A scheduled function whose schedule never fires during a test: the Nomad periodic job's
command is run by hand against a real control plane (tests/test_scheduler_nomad.py)."""

import os
from pathlib import Path

import mctl

app = mctl.App("nomad-trigger")
ENV = {"TICK_FILE": os.environ.get("TICK_FILE", "/dev/null")}


@app.function(schedule=mctl.Cron("0 0 1 1 *"), env=ENV)
def nightly():
    with Path(os.environ["TICK_FILE"]).open("a") as fh:
        fh.write("fired\n")
