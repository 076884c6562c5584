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
    if launch.cpu_limit:  # `cpu=(request, limit)`: the cgroup's CPU quota
        argv += ["--cpus", f"{launch.cpu_limit:g}"]
    if launch.memory_limit_mb:  # `memory=(request, limit)`: killed past it, as on Modal
        argv += ["--memory", f"{launch.memory_limit_mb}m"]
    for host, inside in binds:
        argv += ["-v", f"{host}:{inside}:ro"]
    for host, inside in launch.files:
        argv += ["-v", f"{host}:{inside}:ro"]
    volumes = {}
    from mctl.core.volume_sync import sources

    copies = sources(launch.mounts, task_id)
    for mount in launch.mounts:
        if mount.host_path:
            argv += ["-v", f"{mount.host_path}:{mount.path}" + (":ro" if mount.read_only else "")]
            volumes[mount.path] = mount.path
        elif mount.path in copies:  # a working copy: at the mount path, and at its own path
            src = copies[mount.path]  # for the worker to fill (even under a read-only mount)
            argv += ["-v", f"{src}:{mount.path}" + (":ro" if mount.read_only else ""),
                     "-v", f"{src}:{src}"]
    if volumes:
        env["MCTL_VOLUMES"] = json.dumps(volumes)
    ca = env.get("MCTL_CA_FILE")
    if ca and os.path.isfile(ca):
        argv += ["-v", f"{ca}:{ca}:ro"]
    for key in sorted(env):
        argv += ["-e", key]  # the value comes from the environment of podman itself
    argv += [launch.image, launch.command[0] if launch.command else "python3", "-c", BOOT]
    if launch.gpu is not None:
        argv = gpu_argv(argv, launch.gpu.count)
    return argv, env


# The variables GPU_SCRIPT picks devices (and finds CDI specs) by: a sandbox's own env= must not
# set them (core/server/sandboxes._podman, plugins/sandbox_slurm.job_script).
GPU_CHOICE_ENV = ("MCTL_GPU_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS",
                  "CUDA_VISIBLE_DEVICES", "MCTL_CDI_SPEC_DIRS")


def gpu_argv(argv: list[str], count: int, what: str = "function") -> list[str]:
    """`argv` (`podman run ...`, `podman create ...` or `docker run ...`) run through
    GPU_SCRIPT, which adds the GPU devices where it runs. Function containers and GPU sandboxes
    (locally, and in their Slurm job script) both start this way. `what` names the asker in the
    script's errors ("function" or "sandbox")."""
    if what not in ("function", "sandbox"):
        raise ValueError(f"gpu_argv: what={what!r}")
    return ["sh", "-c", GPU_SCRIPT, f"mctl-gpu-{what}" if what != "function" else "mctl-gpu",
            str(count), *argv]


# A function (or sandbox) with `gpu=` runs its container through this script (`gpu_argv`), on the host that runs it (the
# local machine, or the Slurm node inside the job, where the GPUs are assigned). It picks the
# devices: MCTL_GPU_DEVICES if set, else Slurm's assignment (SLURM_STEP_GPUS, SLURM_JOB_GPUS:
# physical indexes, what CDI names), else CUDA_VISIBLE_DEVICES, else all GPUs; and checks that a
# CDI spec for nvidia.com/gpu exists (podman's own error names no fix). Indexes, GPU-... UUIDs
# and MIG-... names all work: `nvidia-ctk cdi generate` names a device each way.
# $1 is the GPU count asked for; $2 $3 are `podman run` (or `docker run`); then the rest.
GPU_SCRIPT = r"""
want=$1; shift
case "$0" in *sandbox) what=sandbox;; *) what=function;; esac
sel=${MCTL_GPU_DEVICES:-${SLURM_STEP_GPUS:-${SLURM_JOB_GPUS:-${CUDA_VISIBLE_DEVICES:-all}}}}
case "$sel" in NoDevFiles|none|-1)
    echo "mctl: this $what asks for $want GPU(s), but none was assigned to it here" \
         "(devices: $sel)." >&2; exit 125;;
esac
tool=$1; sub=$2; shift 2
if [ "$(basename "$tool")" = docker ]; then
    if [ "$sel" = all ]; then devices="--gpus all"; else devices="--gpus device=$sel"; fi
else
    dirs=${MCTL_CDI_SPEC_DIRS:-/etc/cdi /var/run/cdi}
    found=
    for d in $dirs; do
        if grep -qs "nvidia.com/gpu" "$d"/*.yaml "$d"/*.yml "$d"/*.json; then found=$d; fi
    done
    if [ -z "$found" ]; then
        echo "mctl: this $what asks for $want GPU(s), but $(hostname) has no CDI spec for" \
             "nvidia.com/gpu in $dirs, so podman cannot pass GPUs to its container. Generate" \
             "one with the NVIDIA Container Toolkit: nvidia-ctk cdi generate" \
             "--output=/etc/cdi/nvidia.yaml" >&2
        exit 125
    fi
    devices=
    if [ "$sel" = all ]; then devices="--device nvidia.com/gpu=all"
    else
        for d in $(echo "$sel" | tr ',' ' '); do devices="$devices --device nvidia.com/gpu=$d"; done
    fi
fi
exec "$tool" "$sub" $devices "$@"
"""
