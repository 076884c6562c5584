import os
from pathlib import Path

import mctl

app = mctl.App("scheduled")
VERSION = os.environ.get("APP_VERSION", "v1")
# Deploy-time values travel to the workers through the function's env.
ENV = {"APP_VERSION": VERSION, "TICK_FILE": os.environ.get("TICK_FILE", "/dev/null")}


@app.function(schedule=mctl.Period(seconds=1), env=ENV)
def tick():
    out = Path(os.environ["TICK_FILE"])
    with out.open("a") as fh:
        fh.write("tick\n")
    print("ticked")


@app.function(env=ENV)
def version():
    return VERSION


@app.cls(env=ENV)
class Greeter:
    name: str = mctl.parameter(default="world")

    @mctl.method()
    def greet(self):
        return f"hello {self.name} from {VERSION}"
