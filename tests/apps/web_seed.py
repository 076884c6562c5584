"""The web endpoint example of the seed's Modal reference, with `import mctl as modal`."""

import mctl as modal

app = modal.App("seed-web")


@app.function()
@modal.web_endpoint(method="GET")
def hello_web(name: str = "World"):
    return f"Hello, {name}!"
