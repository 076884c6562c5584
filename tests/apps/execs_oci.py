"""A podman worker to run a command in (`mctl container exec`, tests/test_container_exec.py)."""

import os

import mctl

app = mctl.App("execs-oci")

in_container = mctl.Image.debian_slim().run_commands("echo inside > /etc/mctl-exec")


@app.function(scaledown_window=120, image=in_container)
def boxed():
    return os.getpid()
