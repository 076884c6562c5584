"""Sandboxes as Slurm jobs on the development cluster (scripts/slurm-dev up): the container runs on
a node under gVisor, and every command reaches it through the control plane's relay
(`srun --jobid --overlap podman exec`), never from this process directly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

import mctl
from mctl.core import sandbox_runtime
from conftest import wait_until
from test_sandbox import _needs_podman  # noqa: F401 - autouse: podman, runsc, the base
from test_slurm import slurm_server  # noqa: F401 - a fixture: a control plane on Slurm

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.slow]


def _jobs(cluster, sandbox_id):
    out = subprocess.run(["squeue", "-h", "-o", "%i %T %N %k"], capture_output=True, text=True,
                         env=cluster.client_env(), timeout=20).stdout
    return [line for line in out.splitlines() if f"sandbox={sandbox_id}" in line]


def _containers(sandbox_id):
    # the nodes share this machine's podman storage: a container left on a node shows here
    out = subprocess.run(["podman", "ps", "-a", "--filter", f"label=mctl.sandbox={sandbox_id}",
                          "--format", "{{.ID}}"], capture_output=True, text=True, timeout=60)
    return out.stdout.split()


def test_a_sandbox_runs_on_a_node_and_exec_goes_through_the_control_plane(
        slurm_server, slurm_cluster):  # noqa: F811
    app = mctl.App.lookup("sandbox-slurm", create_if_missing=True)
    sb = mctl.Sandbox.create(app=app, timeout=300)
    assert sb._record["backend"] == "slurm" and sb.isolation == "gvisor"
    node = sb._record["host"]
    assert node in slurm_cluster.nodes
    [job] = _jobs(slurm_cluster, sb.object_id)
    assert " RUNNING " in job and node in job

    p = sb.exec("python", "-c", "import os, socket; print(socket.gethostname(), os.getuid(), "
                "6 * 7)")
    assert p.wait() == 0, p.stderr.read()
    assert p.stdout.read() == "sandbox 65534 42\n"  # in the container, not on the node

    p = sb.exec("python", "-c", "import sys; data = sys.stdin.read(); "
                "print(data.upper(), end=''); print('err', file=sys.stderr); sys.exit(3)")
    p.stdin.write(b"hello\n")
    p.stdin.write("world\n")
    p.stdin.drain()
    p.stdin.write_eof()
    assert p.wait() == 3
    assert p.stdout.read() == "HELLO\nWORLD\n" and p.stderr.read() == "err\n"

    # block_network (the default): not even the control plane, which the node itself reaches
    host, port = slurm_server.url.rsplit("/", 1)[-1].rsplit(":", 1)
    p = sb.exec("python", "-c", "import socket; socket.create_connection("
                f"({host!r}, {port}), timeout=3)")
    assert p.wait() == 1
    err = p.stderr.read()
    assert "No route to host" in err or "Network is unreachable" in err, err

    with sb.open("/tmp/notes.txt", "w") as f:
        f.write("on the node\n")
    assert sb.open("/tmp/notes.txt").read() == "on the node\n"
    # snapshot_filesystem() and tunnels on a node: tests/test_sandbox_slurm_escapes.py

    p = sb.exec("sleep", "30", timeout=2)
    assert p.wait() == -1

    # the CLI goes the same way: this terminal's stdin in, the command's exit code out
    done = subprocess.run([sys.executable, "-m", "mctl", "sandbox", "exec", sb.object_id, "--",
                           "python3", "-c", "import sys; print(sys.stdin.read()[::-1]); "
                           "sys.exit(6)"], input="olleh", capture_output=True, text=True,
                          timeout=60, env=os.environ)
    assert (done.returncode, done.stdout) == (6, "hello\n"), done.stderr

    sb.terminate()
    assert sb.returncode == 137
    assert wait_until(lambda: not _jobs(slurm_cluster, sb.object_id), 30), \
        _jobs(slurm_cluster, sb.object_id)
    assert wait_until(lambda: not _containers(sb.object_id), 30), _containers(sb.object_id)
    with pytest.raises(mctl.exception.InvalidError, match="terminated; exec and open need a"):
        sb.exec("true").wait()


def test_the_main_command_its_output_and_the_timeout_on_a_node(slurm_server,  # noqa: F811
                                                               slurm_cluster):
    app = mctl.App.lookup("sandbox-slurm", create_if_missing=True)
    sb = mctl.Sandbox.create("python", "-c", "import sys, time; print('out'); "
                             "print('err', file=sys.stderr); time.sleep(2); sys.exit(5)",
                             app=app, timeout=60)
    assert sb.stdout.read() == "out\n" and sb.stderr.read() == "err\n"
    assert sb.wait() == 5 and sb.returncode == 5
    assert wait_until(lambda: not _jobs(slurm_cluster, sb.object_id), 30)
    assert not _containers(sb.object_id)
    # after the job: the logs are its output file (stdout and stderr in one)
    logs = subprocess.run([sys.executable, "-m", "mctl", "sandbox", "logs", sb.object_id],
                          capture_output=True, text=True, timeout=60, env=os.environ)
    assert logs.returncode == 0 and sorted(logs.stdout.split()) == ["err", "out"], logs

    sb = mctl.Sandbox.create("sleep", "infinity", app=app, timeout=3)
    with pytest.raises(mctl.exception.SandboxTimeoutError):
        sb.wait()
    assert sb.returncode == -1
    assert wait_until(lambda: not _jobs(slurm_cluster, sb.object_id), 30)
    assert wait_until(lambda: not _containers(sb.object_id), 30), _containers(sb.object_id)


def test_a_gpu_sandbox_asks_for_its_gres_and_needs_a_cdi_spec(slurm_server,  # noqa: F811
                                                              slurm_cluster):
    """The dev cluster's GPUs are GRES with stand-in device files and its nodes have no CDI
    spec: the job gets its GRES, and the container's start fails there naming the fix (the
    devices it would get with one: tests/test_sandbox_relay.py, the GPU job script tests)."""
    app = mctl.App.lookup("sandbox-slurm", create_if_missing=True)
    with pytest.raises(mctl.exception.InvalidError) as info:
        mctl.Sandbox.create(app=app, gpu="A100:2", cpu=2, memory=512, timeout=60)
    message = str(info.value)
    assert "ended FAILED (exit code 125)" in message, message
    assert "this sandbox asks for 2 GPU(s)" in message and "no CDI spec for nvidia.com/gpu" \
        in message
    assert "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml" in message
    job_id = re.search(r"Slurm job (\d+)", message).group(1)
    out = subprocess.run(["scontrol", "show", "job", job_id, "--oneliner"],
                         capture_output=True, text=True,
                         env=slurm_cluster.client_env(), timeout=20).stdout
    assert "gres/gpu:a100=2" in out or "gres:gpu:a100:2" in out, out
    # gVisor: this runsc has no nvproxy, so the control plane refuses before any job
    if not sandbox_runtime.runsc_nvproxy():
        with pytest.raises(mctl.exception.InvalidError, match="has no nvproxy flag"):
            mctl.Sandbox.create(app=app, gpu="A100:1", isolation="gvisor", timeout=60)


def test_a_restarted_control_plane_keeps_its_sandboxes_on_the_nodes(slurm_server,  # noqa: F811
                                                                    slurm_cluster, tmp_path):
    """SIGKILL the control plane: its sandbox's job runs on; the restarted control plane finds
    it by the job's comment, relays to it again and terminates it."""
    app = mctl.App.lookup("sandbox-slurm", create_if_missing=True)
    sb = mctl.Sandbox.create(app=app, timeout=300)
    with sb.open("/tmp/state.txt", "w") as f:
        f.write("kept")
    [before] = _jobs(slurm_cluster, sb.object_id)
    slurm_server.kill()
    slurm_server.start()
    again = mctl.Sandbox.from_id(sb.object_id)
    assert again.poll() is None
    assert _jobs(slurm_cluster, sb.object_id) == [before]
    assert again.open("/tmp/state.txt").read() == "kept"
    again.terminate()
    assert again.returncode == 137
    assert wait_until(lambda: not _jobs(slurm_cluster, sb.object_id), 30)
    assert wait_until(lambda: not _containers(sb.object_id), 30), _containers(sb.object_id)
    assert "adopted Slurm job" in (tmp_path / "server.log").read_text()


def test_a_terminal_and_the_main_commands_stdin_on_a_node(slurm_server,  # noqa: F811
                                                         slurm_cluster):
    """exec(pty=True) on a node (`srun --pty ... podman exec -t` through the relay) and
    sb.stdin (a FIFO on the node, fed by `srun --overlap`), also across a control-plane
    restart."""
    from test_sandbox_pty import _until

    app = mctl.App.lookup("sandbox-slurm", create_if_missing=True)
    sb = mctl.Sandbox.create("python3", "-c", "import sys\nfor line in sys.stdin: "
                             "print('got', line.strip(), flush=True)\nprint('end')",
                             app=app, timeout=300)
    assert sb._record["backend"] == "slurm" and sb.isolation == "gvisor"
    p = sb.exec("python3", "-c", "import os, sys; print(os.isatty(0), os.isatty(1), "
                "os.get_terminal_size(0), os.environ['TERM']); print('e', file=sys.stderr); "
                "sys.exit(5)",
                pty_info={"winsz_rows": 33, "winsz_cols": 101, "env_term": "xterm-mctl"})
    assert p.wait() == 5
    out = p.stdout.read()
    assert "True True os.terminal_size(columns=101, lines=33) xterm-mctl" in out, out
    assert "e\r\n" in out and p.stderr.read() == ""  # a terminal: stderr on it too
    assert "mctl-relay-exit" not in out

    p = sb.exec("sh", "-i", pty_info={"winsz_rows": 20, "winsz_cols": 70})
    p.stdin.write(b"echo $((6 * 7)) marker\n")
    _until(p, "42 marker", timeout=60)
    p.resize(44, 132)
    time.sleep(1)
    p.stdin.write(b"stty size\n")
    _until(p, "44 132", timeout=60)
    p.stdin.write(b"exit 3\n")
    assert p.wait() == 3

    sb.stdin.write(b"one\n")
    sb.stdin.drain()
    lines = iter(sb.stdout)
    assert next(lines) == "got one\n"
    slurm_server.kill()
    slurm_server.start()
    again = mctl.Sandbox.from_id(sb.object_id)
    again.stdin.write(b"two\n")
    again.stdin.write_eof()
    assert again.wait() == 0
    assert again.stdout.read() == "got one\ngot two\nend\n"
    assert wait_until(lambda: not _jobs(slurm_cluster, sb.object_id), 30)


def test_the_main_command_on_a_terminal_on_a_node(slurm_server, slurm_cluster):  # noqa: F811
    app = mctl.App.lookup("sandbox-slurm", create_if_missing=True)
    sb = mctl.Sandbox.create(
        "python3", "-c", "import os, sys\nprint(os.isatty(0), os.get_terminal_size(0), "
        "flush=True)\nfor line in sys.stdin: print('got', line.strip(), flush=True)\n"
        "print('end')", app=app, timeout=120,
        pty_info={"winsz_rows": 33, "winsz_cols": 101})
    assert sb._record["backend"] == "slurm"
    sb.stdin.write(b"one\n")
    sb.stdin.write_eof()
    assert sb.wait() == 0
    out = sb.stdout.read()
    assert "True os.terminal_size(columns=101, lines=33)\r\n" in out, out
    assert "got one\r\n" in out and "end\r\n" in out
    assert wait_until(lambda: not _jobs(slurm_cluster, sb.object_id), 30)


def test_a_cidr_allowlist_holds_on_a_node(slurm_server, slurm_cluster):  # noqa: F811
    """The job script loads the same firewall into the container's network namespace on the
    node before it starts: the host (the allowlist) answers, another node does not."""
    import socket
    import threading

    def node_addr(node):
        out = subprocess.run(["ip", "netns", "exec", f"mctl-{node}", "ip", "-4", "-o", "addr",
                              "show", "eth0"], capture_output=True, text=True, timeout=20).stdout
        return out.split()[3].split("/")[0]

    host = os.environ.get("MCTL_SLURM_HOST_ADDR", "10.77.0.1")
    listener = socket.socket()
    listener.bind((host, 0))
    listener.listen(8)

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.sendall(b"hi\n")
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
    other = slurm_cluster.nodes[-1]
    other_addr = node_addr(other)
    code = ("import socket; s = socket.socket(); s.bind(('0.0.0.0', 0)); s.listen(); "
            "print(s.getsockname()[1], flush=True); import time; time.sleep(600)")
    srv = subprocess.Popen(["nsenter", f"--net=/run/netns/mctl-{other}", sys.executable, "-c",
                            code], stdout=subprocess.PIPE, text=True)
    other_port = int(srv.stdout.readline())
    try:
        app = mctl.App.lookup("sandbox-slurm", create_if_missing=True)
        sb = mctl.Sandbox.create(app=app, timeout=300, cidr_allowlist=[f"{host}/32"])
        assert sb._record["backend"] == "slurm" and sb.isolation == "runc"
        probe = ("import socket\nfor a in {targets!r}:\n    try:\n"
                 "        socket.create_connection(a, timeout=4); print(a[0], 'OPEN')\n"
                 "    except OSError as e:\n        print(a[0], 'BLOCKED', e)\n")
        p = sb.exec("python3", "-c", probe.format(
            targets=[(host, listener.getsockname()[1]), (other_addr, other_port)]))
        assert p.wait() == 0, p.stderr.read()
        out = p.stdout.read()
        assert f"{host} OPEN" in out and f"{other_addr} BLOCKED" in out, out
        assert "No route to host" in out, out  # the allowlist's reject, not a missing route
        sb.terminate()
    finally:
        srv.kill()
        listener.close()


def test_a_main_command_that_ends_at_once_on_a_node_keeps_its_output(slurm_server,  # noqa: F811
                                                                     slurm_cluster):
    """The command ends (and its container goes) before the relay's `podman logs` on the node
    starts: what it printed comes from the job's output file, not nothing."""
    app = mctl.App.lookup("sandbox-slurm", create_if_missing=True)
    for _ in range(3):
        sb = mctl.Sandbox.create("python", "-c", "print('out')", app=app, timeout=60)
        assert sb.stdout.read() == "out\n"
