"""The sandbox relay (core/server/sandbox_relay) against a real control plane and a real sandbox on
this host, and the Slurm job script a sandbox becomes (plugins/sandbox_slurm), no cluster needed.
The relay on a real Slurm node: tests/test_sandbox_slurm.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import mctl
from mctl.core import sandbox_runtime
from mctl.core.sandbox_runtime import SandboxConfig
from mctl.plugins import sandbox_slurm


# --- the job script -------------------------------------------------------------------------------
def _script(**kw):
    cfg = SandboxConfig(sandbox_id="sb-ABC", image="localhost/img:1",
                        command=["python", "-c", "print(1)"], env={"API_KEY": "s3cret-value"},
                        cpu=kw.pop("cpu", 2.5), memory_mb=kw.pop("memory_mb", 2048))
    return sandbox_slurm.job_script(cfg, kw.pop("isolation", "gvisor"), name="mctl-sb-abc",
                                    comment="mctl sandbox=sb-ABC app=ap-1 cp=x",
                                    output="/out/sandbox-sb-abc.out", **kw)


def test_the_job_script_has_the_resources_and_the_local_isolation_argv():
    text = _script(timeout_s=90, gres="gpu:a100:2", isolation="runc", cpu=2.5, memory_mb=2048,
                   options={"partition": "gpu", "account": "lab"})
    assert "#SBATCH --cpus-per-task=3" in text
    assert "#SBATCH --mem=2304M" in text  # the container's 2048 MiB plus podman's room
    assert "#SBATCH --time=3" in text  # 90 s -> 2 minutes, plus one
    assert "#SBATCH --gres=gpu:a100:2" in text
    assert "#SBATCH --partition=gpu" in text and "#SBATCH --account=lab" in text
    assert '#SBATCH --comment="mctl sandbox=sb-ABC app=ap-1 cp=x"' in text
    # the GPUs: Slurm's devices by CDI, through the wrapper function containers start with
    # (containers.gpu_argv); the container sees exactly those, so no CUDA_VISIBLE_DEVICES
    run = [line for line in text.splitlines() if "podman run" in line]
    assert len(run) == 1 and "CUDA_VISIBLE_DEVICES" not in run[0]
    assert run[0].startswith("' mctl-gpu-sandbox 2 podman run -i --name mctl-sb-abc")
    assert "\nsh -c '\nwant=$1; shift\n" in text  # containers.GPU_SCRIPT
    assert "nvidia-ctk cdi generate" in text and "nvproxy" not in text
    text = _script(timeout_s=90)
    assert "--gres" not in text and "nvidia" not in text
    run = [line for line in text.splitlines() if line.startswith("podman run")]
    # the main command's stdin: a FIFO on the node, kept open by a holder (sb.stdin)
    assert len(run) == 1 and run[0].endswith(' <"$stdin" &') and " -i " in run[0]
    assert f"f={sandbox_runtime.runtime_dir()}/stdin-mctl-sb-abc" in text
    assert 'sleep infinity 3<>"$fifo" & echo $! > "$fifo.pid"' in text
    # gVisor through the wrapper that lets `podman exec -t` work, written on the node
    assert f"runsc={sandbox_runtime.runtime_dir()}/runsc-tty-" in text
    assert "exec /usr/bin/runsc" in text
    for flag in ('--runtime "$runsc"', "--runtime-flag network=none", "--network none",
                 "--cap-drop ALL", "--security-opt no-new-privileges", "--user 65534:65534",
                 "--memory 2048m", "--env API_KEY", "--init"):
        assert flag in run[0], flag
    assert " -d " not in run[0]  # in the foreground: the job lasts as long as the container
    assert "s3cret-value" not in text  # values reach podman through the job's environment
    assert "trap 'cleanup; exit 143' TERM INT" in text and "trap cleanup EXIT" in text
    assert "/usr/bin/runsc (gVisor) is not installed on" in text


def test_a_runc_job_keeps_the_user_namespace_and_may_have_network():
    cfg = SandboxConfig(sandbox_id="sb-N", image="img", block_network=False)
    text = sandbox_slurm.job_script(cfg, "runc", name="mctl-sb-n", comment="c", output="/o",
                                    timeout_s=3600)
    assert "--uidmap 0:200000:65536" in text and "--network bridge" in text
    assert "#SBATCH --time=61" in text and "--gres" not in text and "runsc" not in text


def test_the_job_script_runs_and_cleans_up_with_plain_sh(tmp_path):
    """The script is valid sh: run it with a `podman` stand-in that records its argv."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "podman").write_text("#!/bin/sh\necho \"$@\" >> \"$LOG\"\n"
                                   "case \"$1\" in run) exit 7;; esac\n")
    (bindir / "podman").chmod(0o755)
    script = tmp_path / "job.sh"
    script.write_text(_script(timeout_s=60, isolation="runc"))
    done = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}",
                               "LOG": str(tmp_path / "log")})
    assert done.returncode == 7, done.stderr  # the container's exit code is the job's
    calls = (tmp_path / "log").read_text().splitlines()
    assert calls[0].startswith("run -i --name mctl-sb-abc")
    assert calls[-1] == "rm --force --time 0 --ignore mctl-sb-abc"
    # the stdin holder went with it
    assert not os.path.exists(sandbox_runtime.stdin_fifo("mctl-sb-abc"))


def _gpu_job(tmp_path, isolation, cdi=True, runsc_flags="", allowlist=None, **env):
    """Run a GPU sandbox's job script with stand-ins for podman and runsc that record their
    argv; (exit code, podman's calls, stderr)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "podman").write_text("#!/bin/sh\necho \"$@\" >> \"$LOG\"\n"
                                   "case \"$1\" in run|start) exit 7;; esac\n")
    (bindir / "podman").chmod(0o755)
    runsc = bindir / "runsc"
    runsc.write_text(f"#!/bin/sh\necho '{runsc_flags}'\n")
    runsc.chmod(0o755)
    specs = tmp_path / "cdi"
    specs.mkdir(exist_ok=True)
    if cdi:
        (specs / "nvidia.yaml").write_text("kind: nvidia.com/gpu\ndevices:\n- name: '0'\n")
    cfg = SandboxConfig(sandbox_id="sb-G", image="img", gpu="A100:2",
                        block_network=allowlist is None, cidr_allowlist=allowlist)
    old = sandbox_runtime.RUNSC
    sandbox_runtime.RUNSC = str(runsc)
    try:
        text = sandbox_slurm.job_script(cfg, isolation, name="mctl-sb-g", comment="c",
                                        output="/o", timeout_s=60, gres="gpu:a100:2")
    finally:
        sandbox_runtime.RUNSC = old
    script = tmp_path / "job.sh"
    script.write_text(text)
    log = tmp_path / "log"
    log.write_text("")
    done = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}",
                               "LOG": str(log), "MCTL_CDI_SPEC_DIRS": str(specs), **env})
    return done.returncode, log.read_text().splitlines(), done.stderr


def _devices(call):
    parts = call.split()
    return [parts[i + 1] for i, p in enumerate(parts) if p == "--device"]


def test_a_gpu_job_passes_slurms_devices_by_cdi(tmp_path):
    code, calls, _ = _gpu_job(tmp_path, "runc", SLURM_JOB_GPUS="1,3",
                              CUDA_VISIBLE_DEVICES="0,1",  # Slurm renumbers it
                              # the sandbox's env= (or the control plane's) cannot choose
                              MCTL_GPU_DEVICES="all", SLURM_STEP_GPUS="0,1,2,3")
    assert code == 7 and calls[0].startswith("run --device nvidia.com/gpu=1 --device "
                                             "nvidia.com/gpu=3 --name mctl-sb-g")
    assert _devices(calls[0]) == ["nvidia.com/gpu=1", "nvidia.com/gpu=3"]
    assert "--uidmap 0:200000:65536" in calls[0] and "nvproxy" not in calls[0]
    # with a cidr_allowlist: `podman create` gets them, before the firewall and the start
    code, calls, _ = _gpu_job(tmp_path, "runc", allowlist=["10.0.0.0/8"], SLURM_JOB_GPUS="2")
    assert calls[0].startswith("create --device nvidia.com/gpu=2 --name mctl-sb-g"), calls


def test_a_gpu_job_on_a_node_without_a_cdi_spec_fails_naming_the_fix(tmp_path):
    code, calls, err = _gpu_job(tmp_path, "runc", cdi=False, SLURM_JOB_GPUS="0")
    assert code == 125 and not [c for c in calls if c.startswith("run")]
    assert "this sandbox asks for 2 GPU(s)" in err and "no CDI spec for nvidia.com/gpu" in err
    assert "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml" in err


def test_a_gvisor_gpu_job_needs_nvproxy_on_the_node(tmp_path):
    code, calls, err = _gpu_job(tmp_path, "gvisor", runsc_flags="  -network string",
                                SLURM_JOB_GPUS="0,1")
    assert code == 125 and not [c for c in calls if c.startswith("run")]
    assert "has no nvproxy flag" in err and "isolation='runc'" in err
    code, calls, err = _gpu_job(tmp_path, "gvisor", runsc_flags="  -nvproxy\n  -network",
                                SLURM_JOB_GPUS="0,1")
    assert code == 7, err
    assert "--runtime-flag network=none --runtime-flag nvproxy=true" in calls[0]
    assert _devices(calls[0]) == ["nvidia.com/gpu=0", "nvidia.com/gpu=1"]


def test_a_job_without_a_command_has_no_stdin():
    cfg = SandboxConfig(sandbox_id="sb-N", image="img")
    text = sandbox_slurm.job_script(cfg, "gvisor", name="mctl-sb-n", comment="c", output="/o",
                                    timeout_s=60)
    run = [line for line in text.splitlines() if line.startswith("podman run")]
    assert run[0].endswith(" </dev/null &") and " -i " not in run[0] and "mkfifo" not in text


# --- the relay on this host -----------------------------------------------------------------------
def _problem():
    from test_sandbox import _problem as problem

    return problem()


@pytest.fixture(params=[None, "bwrap"])
def sandbox(server_process, request):
    """A sandbox of the default isolation, and a bwrap one (its agent behind the relay)."""
    problem = _problem()
    if request.param == "bwrap":
        from mctl.core import sandbox_bwrap

        problem = problem or sandbox_bwrap.problem()
    if problem:
        if os.environ.get("MCTL_REQUIRE_SERVERS") == "1":
            pytest.fail(problem)
        pytest.skip(problem)
    app = mctl.App.lookup("sandbox-relay", create_if_missing=True)
    sb = mctl.Sandbox.create(app=app, isolation=request.param)
    yield sb
    sb.terminate()


def test_the_relay_runs_commands_with_stdin_exit_codes_and_timeouts(sandbox, server_process):
    from mctl.sdk.sandbox_relay import RelayProcess

    url = server_process.url
    p = RelayProcess(url, sandbox.object_id, {
        "exec": ["python3", "-c", "import os, sys; d = sys.stdin.read(); print(d.upper(), "
                 "os.environ['GREETING']); print('e', file=sys.stderr); sys.exit(4)"],
        "env": {"GREETING": "hi"}})
    p.stdin.write(b"abc")
    p.stdin.drain()
    p.stdin.write_eof()
    assert p.wait() == 4
    assert p.stdout.read() == "ABC hi\n" and p.stderr.read() == "e\n"
    p = RelayProcess(url, sandbox.object_id, {"exec": ["sleep", "30"], "timeout": 1})
    assert p.wait() == -1
    # 10 MB of output through the WebSocket, none of it lost
    p = RelayProcess(url, sandbox.object_id, {
        "exec": ["python3", "-c", "import sys; sys.stdout.write('x' * 10_000_000)"]}, text=False)
    assert p.wait() == 0 and len(p.stdout.read()) == 10_000_000


def test_the_relay_checks_the_callers_token(sandbox, server_process):
    import aiohttp

    from mctl.core.client import run_sync

    def create_token(scope, name):
        return subprocess.run([sys.executable, "-m", "mctl", "token", "create", "--scope", scope,
                               "--name", name], capture_output=True, text=True, timeout=60,
                              env=os.environ).stdout.strip()

    async def status(token, body=None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        ws_url = server_process.url.replace("http", "ws", 1) + \
            f"/api/sandboxes/{sandbox.object_id}/relay"
        async with aiohttp.ClientSession(headers=headers) as session:
            try:
                async with session.ws_connect(ws_url) as ws:
                    await ws.send_json(body or {"exec": ["echo", "in"]})
                    got = [m async for m in ws]
                    return 101, got
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status, None

    assert run_sync(status(None))[0] == 401
    assert run_sync(status(create_token("proxy", "web")))[0] == 403
    invoke = create_token("invoke", "caller")
    code, messages = run_sync(status(invoke))
    assert code == 101 and messages[0].json() == {"accepted": True}
    assert messages[1].data == b"\x01in\n" and messages[-1].json() == {"exit": 0}
    # named secrets need a deploy token here too, as for exec on the control plane's host
    code, messages = run_sync(status(invoke, {"exec": ["env"], "secret_names": ["any"]}))
    assert "need a deploy token" in messages[-1].json()["error"]


def test_a_local_gpu_sandbox_without_a_cdi_spec_says_how_to_make_one(server_process):
    """This host has no GPU and no CDI spec: the podman sandbox (runc: this runsc has no
    nvproxy) fails naming `nvidia-ctk cdi generate` (the argv with the devices:
    tests/test_gpu_containers.py); gVisor is refused saying why; bwrap has no GPUs."""
    problem = _problem()
    if problem:
        pytest.skip(problem)
    if os.path.exists("/etc/cdi") or os.path.exists("/var/run/cdi"):
        pytest.skip("this host has a CDI spec directory")
    if sandbox_runtime.runsc_nvproxy():
        pytest.skip("this host's runsc has nvproxy")
    app = mctl.App.lookup("sandbox-relay", create_if_missing=True)
    with pytest.raises(mctl.exception.InvalidError, match=r"(?s)could not start \(runc\).*"
                       r"this sandbox asks for 1 GPU\(s\).*nvidia-ctk cdi generate"):
        mctl.Sandbox.create(app=app, gpu="A100")
    with pytest.raises(mctl.exception.InvalidError, match="has no nvproxy flag.*isolation='runc'"):
        mctl.Sandbox.create(app=app, gpu="any", isolation="gvisor")
    with pytest.raises(mctl.exception.InvalidError, match="bwrap sandboxes have no GPUs"):
        mctl.Sandbox.create(app=app, gpu="any", isolation="bwrap")


def test_a_client_on_another_host_uses_the_relay(sandbox, monkeypatch):
    """A sandbox on the control plane's host, used from a process that is elsewhere (here: one
    that believes it is): exec, files and the main output go through the relay, not podman."""
    import socket

    from mctl.sdk.sandbox_relay import RelayProcess

    monkeypatch.setattr(socket, "gethostname", lambda: "somewhere-else")
    monkeypatch.setenv("PATH", "/nonexistent")  # no podman here: the relay must carry it all
    sb = mctl.Sandbox.from_id(sandbox.object_id)
    p = sb.exec("python3", "-c", "print(input()[::-1])")
    assert isinstance(p, RelayProcess)
    p.stdin.write("olleh\n")
    p.stdin.write_eof()
    assert p.wait() == 0 and p.stdout.read() == "hello\n"
    with sb.open("/tmp/x.txt", "w") as f:
        f.write("relayed")
    assert sb.open("/tmp/x.txt").read() == "relayed"


def test_a_refused_exec_raises_at_exec_not_later(sandbox):
    """The relay says "accepted" before the command starts: a refusal (here: the sandbox ended)
    raises in exec() itself, as on the control plane's host."""
    from mctl.sdk.sandbox_relay import RelayProcess

    sandbox.terminate()
    with pytest.raises(mctl.exception.InvalidError, match="terminated; exec and open need a"):
        RelayProcess(sandbox._url, sandbox.object_id, {"exec": ["true"]})


def test_a_job_with_ports_publishes_them_on_the_node_and_pulls_registry_images(monkeypatch):
    """Ports on the node's addresses (the control plane's tunnel relay connects from outside
    the node); an image in a registry (a snapshot pushed by another node) is pulled."""
    monkeypatch.setenv("MCTL_INSECURE_REGISTRIES", "10.0.0.5:5000")
    cfg = SandboxConfig(sandbox_id="sb-P", image="10.0.0.5:5000/mctl/snapshot:sb-x",
                        ports=[8080, 9000], block_network=False)
    text = sandbox_slurm.job_script(cfg, "runc", name="mctl-sb-p", comment="c", output="/o",
                                    timeout_s=60)
    run = next(line for line in text.splitlines() if line.startswith("podman run"))
    assert "-p 0.0.0.0::8080" in run and "-p 0.0.0.0::9000" in run and "127.0.0.1" not in run
    assert "--pull missing --tls-verify=false" in run
    cfg = SandboxConfig(sandbox_id="sb-L", image="localhost/mctl/snapshot:sb-x")
    text = sandbox_slurm.job_script(cfg, "gvisor", name="mctl-sb-l", comment="c", output="/o",
                                    timeout_s=60)
    assert "--pull never" in text and "tls-verify" not in text


def test_the_tunnel_relay_carries_both_directions_and_closes_with_the_sandbox():
    """core/server/tunnel_relay between a client and a real TCP server: bytes both ways, a
    half-close passed on (the server answers after the client's EOF), and close() cuts an open
    connection and stops listening."""
    import asyncio

    from mctl.core.server.tunnel_relay import TcpRelay

    async def main():
        async def upper(reader, writer):
            data = await reader.read()  # until the client's EOF
            writer.write(data.upper())
            await writer.drain()
            writer.close()

        target = await asyncio.start_server(upper, "127.0.0.1", 0)
        relay = TcpRelay("127.0.0.1", target.sockets[0].getsockname()[1])
        port = await relay.start("127.0.0.1")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x" * 300_000 + b"end")
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 10)
        assert got == b"X" * 300_000 + b"END"
        writer.close()
        held_reader, held = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.1)
        relay.close()
        assert await asyncio.wait_for(held_reader.read(), 10) == b""  # cut
        held.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        target.close()

    asyncio.run(main())
