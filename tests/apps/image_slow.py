"""An image whose build takes a few seconds: room to abandon a deploy while it builds."""

import os

import mctl

app = mctl.App("image-slow")
image = mctl.Image.debian_slim().run_commands(
    f"sleep 5 && echo {os.environ.get('IMAGE_SLOW_NONCE', 'x')} > /etc/nonce")


@app.function(image=image)
def nonce() -> str:
    return open("/etc/nonce").read().strip()
