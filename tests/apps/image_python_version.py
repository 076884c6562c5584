"""debian_slim of a Python version other than the host's: a Debian release's python3, with mctl's
dependencies installed in the image (tests/test_images_build.py)."""

import os

import mctl

app = mctl.App("image-python-version")
VERSION = os.environ.get("IMAGE_PYTHON_VERSION", "3.13")
image = mctl.Image.debian_slim(python_version=VERSION).pip_install("tomli-w")


@app.function(image=image)
def version(data: dict) -> tuple[str, str, str]:
    import sys

    import tomli_w

    return f"{sys.version_info.major}.{sys.version_info.minor}", tomli_w.dumps(data), sys.executable
