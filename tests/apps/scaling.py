import os
import time

import mctl

app = mctl.App("scaling")


@app.function(scaledown_window=1)
def quick(x):
    return os.environ["MCTL_TASK_ID"]


@app.function(min_containers=2, max_containers=3, scaledown_window=60)
def warm(x):
    time.sleep(0.3)
    return os.environ["MCTL_TASK_ID"]


@app.cls()
class WithExit:
    @mctl.enter()
    def start(self):
        self.path = os.environ["EXIT_MARK"]

    @mctl.method()
    def ping(self):
        return "pong"

    @mctl.exit()
    def stop(self):
        with open(self.path, "w") as fh:
            fh.write("exited")


@app.function(scaledown_window=2)
def steady(x):
    return os.environ["MCTL_TASK_ID"]
