"""Functions that fail in each way an input can: their failures must reach the app's logs."""

import os

import mctl

app = mctl.App("failing-logs")
FAST = mctl.Retries(max_retries=2, initial_delay=0.0, max_delay=1.0)


def helper(x):
    raise KeyError(f"missing {x}")


@app.function()
def fails(x, token=None):
    print("about to fail", x, flush=True)
    return helper(x)


@app.function(retries=FAST)
def crashes():
    print("attempt in pid", os.getpid(), flush=True)
    os._exit(3)


@app.function(retries=mctl.Retries(max_retries=1, initial_delay=0.0, max_delay=1.0), timeout=1)
def hangs():
    import time

    time.sleep(30)


@app.function(schedule=mctl.Period(seconds=1))
def scheduled():
    raise ValueError("scheduled failure")
