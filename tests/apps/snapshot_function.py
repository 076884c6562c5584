"""A function on a sandbox's snapshot_filesystem() image (SNAPSHOT_IMAGE: its reference)."""

import os

import mctl

app = mctl.App("snapshot-function")
# (inside a worker the variable is unset; the image is already built)
image = mctl.Image.from_registry(os.environ.get("SNAPSHOT_IMAGE", "localhost/unset:0"))


@app.function(image=image)
def read(path: str) -> str:
    import socket

    return socket.gethostname() + " " + open(path).read()
