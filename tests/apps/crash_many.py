"""Many lines printed fast, then the end chosen by `kind` (raise, exit, segv, kill): every line
must reach `mctl run`, in order, once (a new-user trial lost thousands from the middle)."""

import mctl

app = mctl.App()
LINES = 20000


@app.function(retries=0)
def noisy(kind: str):
    import ctypes
    import os
    import sys

    for i in range(LINES):
        print(f"line {i} " + "x" * 50)
    sys.stdout.write("unterminated")
    if kind == "exit":
        os._exit(3)
    if kind == "segv":
        ctypes.string_at(0)
    if kind == "kill":
        os.kill(os.getpid(), 9)
    raise RuntimeError("boom after printing")


@app.local_entrypoint()
def main(kind: str = "raise"):
    noisy.remote(kind)
