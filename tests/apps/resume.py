"""Slow inputs that record each run, to count re-runs after a dropped connection."""

import os
import time
import uuid

import mctl

app = mctl.App("resume")


@app.function(max_containers=2)
def slow(i):
    runs = os.environ["RESUME_DIR"]
    open(os.path.join(runs, f"run-{i}-{uuid.uuid4().hex}"), "w").close()
    time.sleep(2)
    return i * 10
