"""A function whose workers scale down after one idle second: bursts of small maps keep
starting, draining and stopping workers while outputs are on their way."""

import mctl

app = mctl.App("churn")


@app.function(scaledown_window=1)
def square(x):
    return x * x
