"""Running a worker in an OCI image with podman (or docker): the argv a backend starts.

The worker needs mctl inside the container. Rather than installing mctl into every image, the
Python environment mctl runs in on this host is bound read-only at its own paths and appended to
the container's `sys.path` after the image's own site-packages, so the image's packages win. This
needs the image's Python to have the host's minor version; for an image of another declared
version (`debian_slim(python_version=...)`, `add_python=`) the `oci` builder installs mctl's
dependencies in the image and only mctl's own pure-Python package is lent.
Network: `--network host`, so a worker reaches the control plane at the address it was given.
"""

from __future__ import annotations

import json
import os
import site
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mctl.core.launch import LaunchSpec

# Where mctl's package is lent to an image of another Python version (which has mctl's
# dependencies installed by the oci builder).
LENT_MCTL_PARENT = "/opt/mctl/lent"

# Runs in the container: add the host's site dirs (processing their .pth files, e.g. an editable
# install's finder), then start the worker runtime.
BOOT = ("import json, os, site, sys, runpy; "
        "[site.addsitedir(d) for d in json.loads(os.environ.pop('MCTL_HOST_SITE'))]; "
        "runpy.run_module('mctl.core.runtime', run_name='__main__', alter_sys=True)")


def host_python_dirs() -> list[str]:
    """Where mctl and its dependencies are on this host: its site dirs and mctl's parent dir."""
    import mctl

    dirs = [d for d in [*site.getsitepackages(), site.getusersitepackages()] if os.path.isdir(d)]
    parent = str(Path(mctl.__file__).resolve().parent.parent)
    if parent not in dirs:
        dirs.append(parent)
    return dirs


def mctl_package() -> str:
    import mctl

    return str(Path(mctl.__file__).resolve().parent)


def container_name(task_id: str) -> str:
    return "mctl-" + task_id.lower().replace("_", "-")


def run_argv(launch: LaunchSpec, task_id: str, tool: str = "podman") -> tuple[list[str], dict[str, str]]:
    """The command starting one worker of `launch` in its image, and the environment to give that
    command (values travel in the environment, not in the argv, where `ps` would show them)."""
    from mctl.plugins.registry_v2 import insecure

    env = launch.worker_env(task_id)
    if launch.python_deps == "image":  # another Python: lend mctl's own package only
        binds = [(mctl_package(), f"{LENT_MCTL_PARENT}/mctl")]
        dirs = [LENT_MCTL_PARENT]
    else:
        dirs = host_python_dirs()
        binds = [(d, d) for d in dirs]
    env["MCTL_HOST_SITE"] = json.dumps(dirs)
    argv = [tool, "run", "--rm", "--name", container_name(task_id), "--network", "host",
            "--label", f"mctl.pool={launch.pool_id}", "--label", f"mctl.task={task_id}"]
    if tool == "podman":
        argv += ["--pull", "missing"]
        registry = launch.image.split("/", 1)[0]
        if insecure(registry):
            argv.append("--tls-verify=false")
    for host, inside in binds:
        argv += ["-v", f"{host}:{inside}:ro"]
    for host, inside in launch.files:
        argv += ["-v", f"{host}:{inside}:ro"]
    volumes = {}
    for mount in launch.mounts:
        if mount.host_path:
            argv += ["-v", f"{mount.host_path}:{mount.path}" + (":ro" if mount.read_only else "")]
            volumes[mount.path] = mount.path
    if volumes:
        env["MCTL_VOLUMES"] = json.dumps(volumes)
    ca = env.get("MCTL_CA_FILE")
    if ca and os.path.isfile(ca):
        argv += ["-v", f"{ca}:{ca}:ro"]
    if launch.gpu is not None and tool == "podman":
        argv += ["--device", "nvidia.com/gpu=all"]  # CDI, when the node has it configured
    for key in sorted(env):
        argv += ["-e", key]  # the value comes from the environment of podman itself
    argv += [launch.image, launch.command[0] if launch.command else "python3", "-c", BOOT]
    return argv, env
