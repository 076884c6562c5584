"""The README's first example: `mctl run examples/hello.py`."""

import mctl

app = mctl.App("hello")


@app.function()
def square(x: int) -> int:
    return x * x


@app.function()
def greet(name: str) -> str:
    return f"hello, {name}"


@app.local_entrypoint()
def main(n: int = 10):
    print("remote:", square.remote(7))
    print("map:", list(square.map(range(n))))
    call = greet.spawn("mctl")
    print("spawn:", call.get())
