"""Targets for `mctl run`'s forms: an entrypoint, a bare function, a class method."""
import mctl

app = mctl.App()


@app.function()
def square(x: int, label: str = "sq"):
    return f"{label}={x * x}"


@app.cls()
class Greeter:
    greeting: str = mctl.parameter(default="hello")

    @mctl.method()
    def greet(self, name: str, shout: bool = False):
        text = f"{self.greeting} {name}"
        return text.upper() if shout else text

    @mctl.method(is_generator=True)
    def count(self, n: int):
        yield from range(n)


@app.local_entrypoint()
def main(n: int, verbose: bool = False):
    print("main got", n, verbose, square.remote(n))
