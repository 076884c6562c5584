"""Functions that print and then die of SIGKILL, written as Modal's docs write apps (no name, no
__main__ guard): what they printed must reach `mctl run`, once per attempt, before the error."""

import os
import signal
import sys

import mctl

app = mctl.App()


def _print_and_die():
    for i in range(5):
        print(f"line {i}", flush=True)
    print("on stderr", file=sys.stderr, flush=True)
    print("last words", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


@app.function(retries=0)
def once():
    _print_and_die()


@app.function(retries=1)
def twice():
    _print_and_die()
