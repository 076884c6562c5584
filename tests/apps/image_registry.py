"""A function on an image from a registry (IMAGE_REGISTRY_TAG), with credentials from the secret
named in IMAGE_REGISTRY_SECRET when set, and `add_python=IMAGE_ADD_PYTHON` when set."""

import os

import mctl

app = mctl.App("image-registry")
secret = os.environ.get("IMAGE_REGISTRY_SECRET")
# (inside a worker the variables are unset; the image is already built)
image = mctl.Image.from_registry(os.environ.get("IMAGE_REGISTRY_TAG", "localhost/unset:0"),
                                 secret=mctl.Secret.from_name(secret) if secret else None,
                                 add_python=os.environ.get("IMAGE_ADD_PYTHON") or None)


@app.function(image=image.env({"IMAGE_FLAVOUR": "registry"}))
def where() -> str:
    return open("/etc/mctl-registry-marker").read().strip() + " " + os.environ["IMAGE_FLAVOUR"]


@app.function(image=image)
def python() -> str:
    import sys

    return f"{sys.version_info.major}.{sys.version_info.minor} {sys.executable}"
