"""Dicts and Queues shared by the caller and the workers (tests/test_dictqueue.py)."""

import os
import time

import mctl

app = mctl.App("dictqueue")

jobs = mctl.Queue.from_name("dq-jobs", create_if_missing=True)
seen = mctl.Dict.from_name("dq-seen", create_if_missing=True)


@app.function(timeout=60)
def take_one(wait):
    """Take a job (blocking), record which container took it, and return it."""
    seen[f"ready-{os.environ['MCTL_TASK_ID']}"] = True
    job = jobs.get(timeout=wait)
    seen[job] = os.environ["MCTL_TASK_ID"]
    return job


@app.function()
async def async_roundtrip(key):
    """The .aio twins from inside an async function."""
    d = mctl.Dict.from_name("dq-seen")
    await d.put.aio(key, "async")
    q = mctl.Queue.from_name("dq-async", create_if_missing=True)
    await q.put.aio(key, partition="p")
    return [await d.get.aio(key), await q.get.aio(partition="p", timeout=5),
            await d.contains.aio(key), [k async for k in d.keys.aio() if k == key]]


@app.function()
def use_handle(q, d):
    """Handles passed as arguments resolve in the worker."""
    q.put("from-worker")
    return d["given"]


@app.function()
def missing_dict():
    return mctl.Dict.from_name("dq-never-created").get("x")


@app.function()
def since(t0):
    return time.time() - t0
