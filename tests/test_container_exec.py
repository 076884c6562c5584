"""`mctl container exec`: a command run in a running worker, its output streamed, its exit
status returned; against a real control plane with process workers and podman workers."""

import json
import os
import subprocess
import sys

import pytest

import mctl
from conftest import ServerProcess, free_port, load_app
from test_auth import http
from test_images_build import images_dev  # noqa: F401 - a fixture: podman and its base image
from test_slurm import slurm_server  # noqa: F401 - a fixture: a control plane placing on Slurm

pytestmark = pytest.mark.integration


def mctl_exec(*args, stdin=None, env=None):
    return subprocess.run([sys.executable, "-m", "mctl", "container", "exec", *args],
                          input=stdin, capture_output=True, text=True, timeout=120,
                          env=env or os.environ)


def container_of(app, function):
    out = subprocess.run([sys.executable, "-m", "mctl", "container", "list", "--json", "--app",
                          app], capture_output=True, text=True, timeout=60, check=True)
    rows = [r for r in json.loads(out.stdout) if r["function"] == function]
    assert len(rows) == 1, rows
    return rows[0]["container_id"]


@pytest.fixture
def server(tmp_path, isolated_home, monkeypatch):
    srv = ServerProcess(tmp_path / "state", free_port(), dict(os.environ)).start()
    monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
    try:
        yield srv
    finally:
        srv.stop()


def test_exec_in_a_process_worker(server):
    from mctl.core.runner import deploy_app

    _, app = load_app("execs")
    deploy_app(app)
    worker_pid = mctl.Function.from_name("execs", "here").remote()
    cid = container_of("execs", "here")

    out = mctl_exec(cid, "--", "sh", "-c", 'echo "out $COLOUR $EXEC_SECRET $PPID"; '
                                           'echo err >&2; exit 3')
    assert out.returncode == 3, out.stderr
    assert out.stdout == f"out green s3 {worker_pid}\n"  # beside the function, in its env
    assert out.stderr == "err\n"

    assert mctl_exec(cid, "--", "cat", stdin="piped in\n").stdout == "piped in\n"
    assert mctl_exec(cid, "--", "sh", "-c", 'echo "${MCTL_TASK_TOKEN:-none}"').stdout == "none\n"

    out = mctl_exec("--pty", cid, "--", "sh", "-c", "tty; stty size")
    assert out.returncode == 0 and out.stdout.startswith("/dev/pts/"), out

    out = mctl_exec(cid, "--", "no-such-command-here")
    assert out.returncode == 127 and "cannot run 'no-such-command-here'" in out.stderr
    out = mctl_exec("ta-nope", "--", "true")
    assert out.returncode == 1 and "No container 'ta-nope'" in out.stderr
    out = mctl_exec(cid)
    assert out.returncode == 2  # click: COMMAND is required

    # the deploy scope is needed, as for `mctl container stop`
    status, tok = http(f"{server.url}/api/tokens", "POST", server.token,
                       {"scope": "invoke", "name": "caller"})
    assert status == 200
    out = mctl_exec(cid, "--", "true", env=dict(os.environ, MCTL_TOKEN=tok["token"]))
    assert out.returncode == 1 and "deploy scope" in out.stderr

    # the worker still serves its function afterwards
    assert mctl.Function.from_name("execs", "here").remote() == worker_pid

    # a venv worker: the command's parent is the worker, run by the venv's python
    venv_pid = mctl.Function.from_name("execs", "in_a_venv").remote()
    out = mctl_exec(container_of("execs", "in_a_venv"), "--", "sh", "-c",
                    'echo $PPID; tr "\\0" " " < /proc/$PPID/cmdline')
    ppid, cmdline = out.stdout.splitlines()
    assert int(ppid) == venv_pid and "/images/venv/" in cmdline, out


@pytest.mark.slow  # builds an image the first time (about two minutes)
def test_exec_in_a_podman_worker(images_dev, tmp_path, isolated_home, monkeypatch):
    from mctl.core.runner import deploy_app

    for key, value in images_dev.items():
        monkeypatch.setenv(key, value)
    srv = ServerProcess(tmp_path / "state", free_port(), dict(os.environ)).start()
    monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
    try:
        _, app = load_app("execs_oci")
        deploy_app(app)
        mctl.Function.from_name("execs-oci", "boxed").remote()
        cid = container_of("execs-oci", "boxed")
        out = mctl_exec(cid, "--", "sh", "-c", "cat /etc/mctl-exec; cat /etc/debian_version")
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("inside\n")  # in the image's file system, not the host's
        assert not os.path.exists("/etc/mctl-exec")
    finally:
        srv.stop()



@pytest.mark.slurm
def test_exec_and_a_class_variant_on_slurm_workers(slurm_server, slurm_cluster):
    """On a cluster too: the command runs in the worker's Slurm job, on its node; a class
    variant gets Slurm jobs of its own."""
    from mctl.core.runner import deploy_app

    _, app = load_app("execs")
    deploy_app(app)
    mctl.Function.from_name("execs", "here").remote()
    out = mctl_exec(container_of("execs", "here"), "--", "sh", "-c",
                    'hostname; echo "$EXEC_SECRET $SLURM_JOB_ID"')
    host, line = out.stdout.splitlines()
    assert host in slurm_cluster.nodes and line.startswith("s3 ") and line != "s3 ", out

    _, vapp = load_app("variants")
    deploy_app(vapp)
    base = mctl.Cls.from_name("variants", "Model")
    variant = base.with_options(env={"COLOUR": "slurm"})().info.remote()
    assert variant["colour"] == "slurm" and base().info.remote()["colour"] == "base"
    jobs = subprocess.run(["squeue", "-h", "-o", "%j %k"], capture_output=True, text=True,
                          env=slurm_cluster.client_env(), timeout=20).stdout
    assert "app=variants" in jobs and "Model~" in jobs, jobs
    for name in ("execs", "variants"):
        subprocess.run([sys.executable, "-m", "mctl", "app", "stop", name], check=True,
                       env=os.environ, timeout=60)
