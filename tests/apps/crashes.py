"""A function that prints and then exits hard, and a class whose @exit prints."""

import os
import sys

import mctl

app = mctl.App("crashes")


@app.function()
def crash(code):
    print("about to crash", flush=True)
    print("on stderr too", file=sys.stderr, flush=True)
    os._exit(code)


@app.function()
def quits(code):
    print("quitting", flush=True)
    sys.exit(code)


@app.cls()
class Greeter:
    @mctl.exit()
    def bye(self):
        print("exit handler ran", flush=True)

    @mctl.method()
    def hello(self):
        return "hi"


@app.local_entrypoint()
def main(what: str = "crash"):
    if what == "crash":
        crash.remote(3)
    elif what == "quit":
        quits.remote(3)
    else:
        print(Greeter().hello.remote())
