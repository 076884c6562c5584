"""Older Modal spellings in an app that `mctl run` runs: each warns once, from the client only,
at this file's line."""

import os

import mctl

app = mctl.App("old-spellings-run")
here = os.path.dirname(os.path.abspath(__file__))


@app.function(mounts=[mctl.Mount.from_local_dir(os.path.join(here, "image_files"),
                                                remote_path="/root/files")])
def listed():
    return sorted(os.listdir("/root/files"))


@app.function()
@mctl.web_endpoint(method="GET")
def hello(name: str = "World"):
    return f"Hello, {name}!"


@app.function()
def plain(x):
    return x + 1


@app.local_entrypoint()
def main():
    print("listed:", listed.remote())
    print("plain:", list(plain.map(range(4))))
