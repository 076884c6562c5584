"""Modal's lifecycle and access keywords: max_inputs, single_use_containers, restrict_modal_access."""

import os

import mctl

app = mctl.App("keywords")


@app.function(max_inputs=1)
def one_each(i):
    return os.getpid()


@app.function(single_use_containers=True)
def single(i):
    return os.getpid()


@app.function(max_inputs=2)
def two_each(i):
    return os.getpid()


@app.function()
def helper(x):
    return x + 1


@app.function(restrict_modal_access=True)
def restricted(what):
    try:
        if what == "call":
            return helper.remote(1)
        if what == "dict":
            mctl.Dict.from_name("kw-dict", create_if_missing=True)["k"] = 1
            return "dict written"
        return "plain"
    except Exception as exc:  # noqa: BLE001 - the test reads what was refused
        return f"refused: {type(exc).__name__}: {exc}"


@app.function()
def unrestricted(what):
    if what == "call":
        return helper.remote(1)
    mctl.Dict.from_name("kw-dict", create_if_missing=True)["k"] = 1
    return "dict written"


@app.function(block_network=True)
def offline(port):
    """Tries the network; reaches the control plane only (its own result, helper's)."""
    import socket

    print("offline worker ran", flush=True)
    out = {}
    for name, address in (("loopback", ("127.0.0.1", port)), ("internet", ("1.1.1.1", 53))):
        try:
            socket.create_connection(address, timeout=2).close()
            out[name] = "connected"
        except OSError as exc:
            out[name] = type(exc).__name__
    out["helper"] = helper.remote(1)
    return out
