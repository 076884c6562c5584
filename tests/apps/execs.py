"""Functions to run commands beside (`mctl container exec`, tests/test_container_exec.py)."""

import os

import mctl

app = mctl.App("execs")

@app.function(scaledown_window=120, env={"COLOUR": "green"},
              secrets=[mctl.Secret.from_dict({"EXEC_SECRET": "s3"})])
def here():
    return os.getpid()


in_venv = mctl.Image.debian_slim().pip_install("tomli-w")


@app.function(scaledown_window=120, image=in_venv)
def in_a_venv():
    return os.getpid()
