"""Errors as a user meets them: an unpicklable result, an exception the caller cannot rebuild,
a plain exception's traceback, a web endpoint that raises."""

import threading
import urllib.error
import urllib.request

import mctl

app = mctl.App("error-messages")


class NeedsTwo(Exception):
    def __init__(self, a, b):
        super().__init__(a)
        self.b = b


def helper(d):
    return d["missing"]


@app.function()
def returns_lock():
    return threading.Lock()


@app.function()
def raises_needs_two():
    raise NeedsTwo("weird failure", 2)


@app.function()
def raises_key_error(x):
    return helper({"x": x})


@app.function()
@mctl.fastapi_endpoint()
def divide(x: int):
    return 1 / x


@app.local_entrypoint()
def main(what: str):
    if what == "lock":
        returns_lock.remote()
    elif what == "needs_two":
        try:
            raises_needs_two.remote()
        except Exception as exc:  # noqa: BLE001
            print(f"caught {type(exc).__name__}: {exc}")
    elif what == "key":
        raises_key_error.remote(1)
    elif what == "web":
        try:
            urllib.request.urlopen(divide.get_web_url() + "?x=0", timeout=60)
        except urllib.error.HTTPError as exc:
            print("status", exc.code)
