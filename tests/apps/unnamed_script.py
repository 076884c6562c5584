"""A script as Modal's docs write one: an unnamed App and `with app.run():` at module level, no
`if __name__ == "__main__":` guard, run with `python unnamed_script.py`. Code after the block uses
the block's results, and writes a file named for the process that runs it."""

import os

import mctl

app = mctl.App()


@app.function()
def square(x):
    return x * x


with app.run():
    print("app name:", app.name)
    results = [square.remote(i) for i in range(2, 4)]
    print("square:", square.remote(7))

print("after the block:", results[0] * 10)
open(os.path.join(os.environ["MARK_DIR"], "local" if mctl.is_local() else "remote"), "w").close()
