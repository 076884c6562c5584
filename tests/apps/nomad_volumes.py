"""Volumes in Nomad jobs: one mounted read-only, one writable (tests/test_nomad_render.py)."""

import mctl

app = mctl.App("nomad-volumes")
weights = mctl.Volume.from_name("weights")
scratch = mctl.Volume.from_name("scratch")


@app.function(volumes={"/models": weights.read_only(), "/work": scratch})
def infer(x: int) -> int:
    return x
