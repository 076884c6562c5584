"""GPU pass-through to containers: the exact podman arguments a worker with `gpu=` starts with,
chosen where it runs (Slurm's assignment, CUDA_VISIBLE_DEVICES, or all), and the clear failure on
a host without a CDI spec. No GPU here: the argv is run with a stand-in `podman` that prints its
arguments (see docs/guide.md, "GPUs in containers", for the check on a GPU host)."""

import subprocess

import pytest

from mctl.core.launch import LaunchSpec
from mctl.core.spec import GpuRequest
from mctl.plugins.containers import GPU_SCRIPT, run_argv

CDI_SPEC = """cdiVersion: 0.5.0
kind: nvidia.com/gpu
devices:
- name: "0"
- name: "1"
- name: all
"""


def launch(gpu):
    return LaunchSpec(pool_id="fu-x-v1", app_id="ap-x", app_name="gpu", version=1,
                      function_id="fu-x", function="f", command=("python3", "-m", "mctl.core.runtime"),
                      env={"MCTL_SERVER_URL": "http://127.0.0.1:1"}, image="localhost/mctl/im-x:latest",
                      image_id="im-x", runtime="oci", gpu=gpu)


def _printing_podman_and_cdi_dir(tmp_path):
    """A `podman` that prints its arguments, one per line, and an empty CDI spec directory."""
    fake = tmp_path / "bin" / "podman"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    fake.chmod(0o755)
    cdi = tmp_path / "cdi"
    cdi.mkdir()
    return fake, cdi


@pytest.fixture
def started(tmp_path):
    """Run a worker's argv with a `podman` that prints its arguments; returns (code, args, err)."""
    fake, cdi = _printing_podman_and_cdi_dir(tmp_path)

    def start(gpu, with_spec=True, **env):
        if with_spec:
            (cdi / "nvidia.yaml").write_text(CDI_SPEC)
        argv, _ = run_argv(launch(gpu), "ta-abc")
        assert argv[:2] == ["sh", "-c"] and argv[5:7] == ["podman", "run"]
        argv[5] = str(fake)
        out = subprocess.run(argv, capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "MCTL_CDI_SPEC_DIRS": str(cdi), **env})
        return out.returncode, out.stdout.splitlines(), out.stderr

    return start


def devices(args):
    return [args[i + 1] for i, a in enumerate(args) if a in ("--device", "--gpus")]


def test_a_function_without_gpu_starts_podman_directly():
    argv, _ = run_argv(launch(None), "ta-abc")
    assert argv[0] == "podman" and "--device" not in argv


def test_all_gpus_when_nothing_assigns_them(started):
    code, args, _ = started(GpuRequest(count=1))
    assert code == 0 and args[0] == "run" and devices(args) == ["nvidia.com/gpu=all"]
    assert args[-3:-1] == ["python3", "-c"]  # the rest of the command is intact


def test_slurm_gres_assignment_picks_those_devices(started):
    code, args, _ = started(GpuRequest(type="A100", count=2), SLURM_JOB_GPUS="1,3",
                            CUDA_VISIBLE_DEVICES="0,1")  # Slurm renumbers CUDA_VISIBLE_DEVICES
    assert code == 0 and devices(args) == ["nvidia.com/gpu=1", "nvidia.com/gpu=3"]
    code, args, _ = started(GpuRequest(count=1), SLURM_STEP_GPUS="2", SLURM_JOB_GPUS="2,3")
    assert devices(args) == ["nvidia.com/gpu=2"]


def test_cuda_visible_devices_and_an_explicit_choice(started):
    _, args, _ = started(GpuRequest(count=1), CUDA_VISIBLE_DEVICES="GPU-8a1b2c3d")
    assert devices(args) == ["nvidia.com/gpu=GPU-8a1b2c3d"]
    _, args, _ = started(GpuRequest(count=1), CUDA_VISIBLE_DEVICES="0", MCTL_GPU_DEVICES="1")
    assert devices(args) == ["nvidia.com/gpu=1"]


def test_no_cdi_spec_fails_naming_the_fix(started):
    code, args, err = started(GpuRequest(count=1), with_spec=False)
    assert code == 125 and args == []
    assert "asks for 1 GPU(s)" in err and "no CDI spec for nvidia.com/gpu" in err
    assert "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml" in err


def test_slurm_assigning_no_gpu_says_so(started):
    code, _, err = started(GpuRequest(count=1), SLURM_JOB_GPUS="NoDevFiles")
    assert code == 125 and "none was assigned" in err


# --- sandboxes: the same wrapper (containers.gpu_argv), and the runtime a GPU sandbox gets --------
def test_a_local_gpu_sandbox_starts_through_the_same_wrapper(tmp_path):
    """The local backend's GPU sandbox: `podman run` of the sandbox, through gpu_argv, gets this
    host's GPUs (all, or MCTL_GPU_DEVICES / CUDA_VISIBLE_DEVICES) by CDI; no spec → the fix."""
    from mctl.core import sandbox_runtime
    from mctl.plugins.containers import gpu_argv

    fake = tmp_path / "podman"
    fake.write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    fake.chmod(0o755)
    cdi = tmp_path / "cdi"
    cdi.mkdir()
    cfg = sandbox_runtime.SandboxConfig(sandbox_id="sb-gpu", image="img", gpu="A100:1")
    argv = gpu_argv(sandbox_runtime.run_argv(cfg, "runc"), 1, "sandbox")
    assert argv[:5] == ["sh", "-c", GPU_SCRIPT, "mctl-gpu-sandbox", "1"]
    argv[5] = str(fake)

    def run(**env):
        return subprocess.run(argv, capture_output=True, text=True, env={
            "PATH": "/usr/bin:/bin", "MCTL_CDI_SPEC_DIRS": str(cdi), **env})

    out = run()
    assert out.returncode == 125 and "this sandbox asks for 1 GPU(s)" in out.stderr
    assert "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml" in out.stderr
    (cdi / "nvidia.yaml").write_text(CDI_SPEC)
    args = run().stdout.splitlines()
    assert args[:4] == ["run", "--device", "nvidia.com/gpu=all", "-d"]
    assert "--uidmap" in args and args[args.index("--user") + 1] == "65534:65534"
    assert devices(run(CUDA_VISIBLE_DEVICES="1").stdout.splitlines()) == ["nvidia.com/gpu=1"]


def test_a_gpu_sandbox_gets_runc_unless_runsc_has_nvproxy(monkeypatch):
    from mctl.core import sandbox_runtime
    from mctl.core.sandbox_runtime import SandboxConfig, SandboxIsolationError, choose

    monkeypatch.setattr(sandbox_runtime, "available", lambda: ["gvisor", "runc"])
    monkeypatch.setattr(sandbox_runtime, "runsc_nvproxy", lambda: False)
    gpu = SandboxConfig(sandbox_id="sb-g", image="img", gpu="any")
    assert choose(SandboxConfig(sandbox_id="sb-n", image="img")) == "gvisor"
    assert choose(gpu) == "runc"
    gpu.isolation = "gvisor"
    with pytest.raises(SandboxIsolationError, match=r"only through runsc's nvproxy.*no "
                       r"nvproxy flag.*isolation='runc'.*newer runsc"):
        choose(gpu)
    monkeypatch.setattr(sandbox_runtime, "runsc_nvproxy", lambda: True)
    assert choose(gpu) == "gvisor"
    gpu.isolation = None
    assert choose(gpu) == "gvisor"
    argv = sandbox_runtime.run_argv(gpu, "gvisor", runsc="/r")
    at = argv.index("--runtime")
    assert argv[at:at + 6] == ["--runtime", "/r", "--runtime-flag", "network=none",
                               "--runtime-flag", "nvproxy=true"]
    assert "nvproxy=true" not in sandbox_runtime.run_argv(gpu, "runc")
    assert not sandbox_runtime.poolable(SandboxConfig(sandbox_id="sb-p", image="i", gpu="any"))


def test_this_hosts_runsc_is_probed_for_nvproxy():
    """Debian bookworm's runsc (20221219) has no nvproxy; a newer one lists `-nvproxy`."""
    import os
    import re

    from mctl.core import sandbox_runtime

    if not os.access(sandbox_runtime.RUNSC, os.X_OK):
        pytest.skip("no runsc here")
    done = subprocess.run([sandbox_runtime.RUNSC, "flags"], capture_output=True, text=True)
    flags = done.stdout + done.stderr  # runsc writes them to stderr
    assert "-network" in flags  # `runsc flags` lists the flags this probe reads
    assert sandbox_runtime.runsc_nvproxy() == bool(re.search(r"-nvproxy\b", flags))


def test_a_local_gpu_sandboxs_env_cannot_choose_its_gpus(tmp_path, monkeypatch):
    """The local backend runs the wrapper with the sandbox's env= (podman reads the values
    from it): the variables that pick devices come from the control plane's environment."""
    import asyncio
    import os

    from mctl.core.server.sandboxes import _podman

    fake, cdi = _printing_podman_and_cdi_dir(tmp_path)
    (cdi / "nvidia.yaml").write_text(CDI_SPEC)
    monkeypatch.setenv("MCTL_CDI_SPEC_DIRS", str(cdi))
    monkeypatch.setenv("MCTL_GPU_DEVICES", "1")
    env = {**os.environ, "PATH": f"{fake.parent}:/usr/bin:/bin", "MCTL_GPU_DEVICES": "all",
           "SLURM_JOB_GPUS": "0,1"}
    rc, out, err = asyncio.run(_podman("run", "img", env=env, gpus=1))
    assert rc == 0, err
    assert out.splitlines() == ["run", "--device", "nvidia.com/gpu=1", "img"]
    monkeypatch.delenv("MCTL_GPU_DEVICES")
    rc, out, _ = asyncio.run(_podman("run", "img", env=env, gpus=1))
    assert devices(out.splitlines()) == ["nvidia.com/gpu=all"]


def test_a_gpu_function_on_slurm_gets_its_jobs_gpus_not_the_control_planes(tmp_path):
    """sbatch --export=ALL brings the control plane's environment into the job, its
    MCTL_GPU_DEVICES (this host's GPUs for the local backend) too: the job's GRES decides."""
    import os

    from mctl.plugins.scheduler_slurm import SlurmScheduler

    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "podman").write_text("#!/bin/sh\necho \"$@\" >> \"$LOG\"\n")
    (bindir / "podman").chmod(0o755)
    cdi = tmp_path / "cdi"
    cdi.mkdir()
    (cdi / "nvidia.yaml").write_text(CDI_SPEC)
    sched = SlurmScheduler({"output_dir": str(tmp_path / "jobs")})
    script = tmp_path / "job.sh"
    script.write_text(sched.job_script(launch(GpuRequest(count=2)), "ta-abc"))
    log = tmp_path / "log"
    log.write_text("")
    done = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}",
                               "LOG": str(log), "MCTL_CDI_SPEC_DIRS": str(cdi),
                               "MCTL_GPU_DEVICES": "all", "SLURM_STEP_GPUS": "0,1,2,3",
                               "SLURM_JOB_GPUS": "1,3"})
    assert done.returncode == 0, done.stderr
    [run] = [c.split() for c in log.read_text().splitlines() if c.startswith("run ")]
    assert devices(run) == ["nvidia.com/gpu=1", "nvidia.com/gpu=3"]
