import os

import mctl

app = mctl.App("talker")


@app.function(scaledown_window=60)
def talk(x):
    print(f"talking about {x}", flush=True)
    return os.getpid()
