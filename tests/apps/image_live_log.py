"""An image whose build waits for a go-ahead file after printing a line: a deployer that shows
the build only when the deploy returns never sees the line in time (tests/test_images_build.py).
"""

import os

import mctl

app = mctl.App("image-live-log")


def wait_for_go(go_file: str, token: str) -> None:
    import os
    import time

    print(f"live-log: waiting for {go_file} ({token})", flush=True)
    deadline = time.monotonic() + (60 if os.path.isdir(os.path.dirname(go_file)) else 0)
    while not os.path.exists(go_file):
        if time.monotonic() > deadline:
            raise SystemExit("live-log: nobody saw the build output in time")
        time.sleep(0.05)
    print("live-log: got the go-ahead", flush=True)


image = mctl.Image.debian_slim().run_function(
    wait_for_go, args=(os.environ.get("IMAGE_LIVE_GO", "/nonexistent"),
                       os.environ.get("IMAGE_LIVE_TOKEN", "")))


@app.function(image=image)
def ping() -> str:
    return "pong"
