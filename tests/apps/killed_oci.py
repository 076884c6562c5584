"""killed.py's functions in a container (an image with a build step runs under podman), and one
that runs out of its memory limit there."""

import mctl

from killed import _print_and_die  # noqa: E402 - beside this file

app = mctl.App()
image = mctl.Image.debian_slim().run_commands("echo for-podman > /etc/mctl-killed")


@app.function(image=image, retries=1)
def twice():
    _print_and_die()


@app.function(image=image, memory=(64, 200), retries=0)
def hog():
    print("allocating", flush=True)
    blocks = []
    while True:
        blocks.append(bytearray(16 << 20))
