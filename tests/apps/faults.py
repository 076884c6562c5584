import os
import time
from pathlib import Path

import mctl

app = mctl.App("faults")
SCRATCH = Path(os.environ.get("FAULTS_DIR", "/tmp"))


def _attempt(key):
    """Count attempts of `key` across worker processes."""
    path = SCRATCH / f"{key}.attempts"
    n = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(n))
    return n


@app.function(retries=mctl.Retries(max_retries=2, initial_delay=0.1, backoff_coefficient=1.0))
def killed_once(key):
    if _attempt(key) == 1:
        (SCRATCH / f"{key}.pid").write_text(str(os.getpid()))
        time.sleep(60)
    return "survived"


@app.function()
def killed_no_retry(key):
    _attempt(key)
    (SCRATCH / f"{key}.pid").write_text(str(os.getpid()))
    time.sleep(60)


@app.function(retries=mctl.Retries(max_retries=3, initial_delay=0.1, backoff_coefficient=1.0))
def flaky(key):
    n = _attempt(key)
    if n < 3:
        raise RuntimeError(f"attempt {n} fails")
    return n


@app.function(timeout=1)
def too_slow():
    time.sleep(30)


@app.function(max_containers=2)
def inc(x):
    return x + 1
