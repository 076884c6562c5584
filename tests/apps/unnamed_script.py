"""A script as Modal's docs write one: an unnamed App and `with app.run():` at module level, no
`if __name__ == "__main__":` guard, run with `python unnamed_script.py`."""

import mctl

app = mctl.App()


@app.function()
def square(x):
    return x * x


with app.run():
    print("app name:", app.name)
    print("square:", square.remote(7))
