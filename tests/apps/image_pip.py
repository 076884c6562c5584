"""A function whose image pip-installs a package the test environment lacks (the venv fast path)."""

import os

import mctl

app = mctl.App("image-pip")
PACKAGE = os.environ.get("IMAGE_PIP_PACKAGE", "tomli-w")
image = mctl.Image.debian_slim().pip_install(PACKAGE).env({"IMAGE_FLAVOUR": "venv"})


@app.function(image=image)
def dump(data: dict) -> tuple[str, str]:
    import tomli_w

    return tomli_w.dumps(data), os.environ["IMAGE_FLAVOUR"]


@app.function()
def plain() -> str:
    return "default image"
