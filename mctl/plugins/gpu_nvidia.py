"""NVIDIA GPUs found with `nvidia-smi`, probed in a subprocess with a timeout and cached."""

from __future__ import annotations

import functools
import shutil
import subprocess

import mctl
from mctl.core.plugin_types import GpuDevice, GpuInfo


@functools.lru_cache(maxsize=1)
def detect() -> list[GpuInfo]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        try:
            index, name, memory = (part.strip() for part in line.split(","))
            gpus.append(GpuInfo("nvidia", name, int(float(memory)), int(index)))
        except ValueError:
            continue
    return gpus


@mctl.hookimpl
def mctl_register_gpu_devices():
    yield GpuDevice(name="nvidia", detect=detect)
