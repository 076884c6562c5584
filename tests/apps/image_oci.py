"""Functions whose images need a container build: apt, commands, files, a Dockerfile."""

import os
import sys
import warnings
from pathlib import Path

import mctl

FILES = Path(__file__).resolve().parent / "image_files"
app = mctl.App("image-oci")

system = (mctl.Image.debian_slim().apt_install("jq").run_commands("echo built > /etc/mctl-built")
          .env({"IMAGE_FLAVOUR": "oci"}).workdir("/srv"))
if os.environ.get("IMAGE_BUILD_SECRET"):  # a build step that needs a secret (not kept in the image)
    system = system.run_commands(
        'test -n "$BUILD_TOKEN" && echo yes > /etc/mctl-secret-seen',
        secrets=[mctl.Secret.from_name(os.environ["IMAGE_BUILD_SECRET"])])


@app.function(image=system)
def tools() -> dict:
    import subprocess

    return {"jq": subprocess.run(["jq", "--version"], capture_output=True, text=True).stdout.strip(),
            "built": Path("/etc/mctl-built").read_text().strip(), "cwd": os.getcwd(),
            "flavour": os.environ["IMAGE_FLAVOUR"], "python": sys.executable,
            "secret_seen": (Path("/etc/mctl-secret-seen").read_text().strip()
                            if Path("/etc/mctl-secret-seen").exists() else "no"),
            "token_at_run_time": os.environ.get("BUILD_TOKEN")}


with warnings.catch_warnings():  # the old spelling still works (the test checks the warning)
    warnings.simplefilter("ignore", DeprecationWarning)
    data_mount = mctl.Mount.from_local_dir(FILES / "data", remote_path="/root/data")


@app.function(image=mctl.Image.debian_slim().apt_install("jq"), mounts=[data_mount])
def read_data() -> str:
    return Path("/root/data/table.txt").read_text()


dockerfile = mctl.Image.from_dockerfile(
    FILES / os.environ.get("IMAGE_DOCKERFILE", "docker") / "Dockerfile",
    build_args={"WHO": "mctl"})


@app.function(image=dockerfile)
def from_dockerfile() -> list:
    return [Path("/opt/greeting.txt").read_text().strip(), Path("/opt/who.txt").read_text().strip(),
            os.environ["FROM_DOCKERFILE"]]
