"""A function that fails in a helper: what the caller's traceback shows."""

import mctl

app = mctl.App("errors")


def check_positive(x):
    if x <= 0:
        raise ValueError(f"expected a positive number, got {x}")
    return x


@app.function()
def reciprocal(x):
    return 1 / check_positive(x)


@app.local_entrypoint()
def main(x: int = -3):
    print(reciprocal.remote(x))
