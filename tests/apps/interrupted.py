"""A script whose remote call runs long: the test presses Ctrl-C while it runs."""

import time

import mctl

app = mctl.App("interrupted")


@app.function()
def slow():
    print("working", flush=True)
    time.sleep(60)


if __name__ == "__main__":
    with app.run():
        slow.remote()
