"""The sandbox escape suite (tests/test_sandbox.py) on the development cluster's nodes: the same
test bodies, with every sandbox a Slurm job on a node under gVisor and under runc, and every
command relayed through the control plane (`srun --jobid --overlap podman exec`).

The borrowed escape bodies run on nodes under gVisor (a node's default) only; both runtimes' own
escapes are tested locally (tests/test_sandbox.py), and what differs on a node for runc (its job
script, snapshots, tunnels) has runc tests here. MCTL_TEST_NODE_ISOLATIONS=gvisor,runc runs the
bodies under both (CI time: each runtime adds about 2.5 minutes).

The dev cluster's nodes are network (and UTS) namespaces on this machine: they share its file
systems, its process table and its podman storage (scripts/slurm-dev). So a canary under this
test's tmp_path, the host's /etc/shadow and home, `ps` and `podman ps` here all are the node's
own view too; `test_rm_rf_root_on_a_node_leaves_the_nodes_canary` checks that through Slurm."""

from __future__ import annotations

import functools
import os
import subprocess

import pytest

import mctl
from test_sandbox import (
    PODMAN_ISOLATIONS as ISOLATIONS,  # bwrap sandboxes never run on a node
    _needs_podman,  # noqa: F401 - an autouse fixture
    run,
)
import test_sandbox
from test_slurm import slurm_server  # noqa: F401 - a fixture: a control plane on Slurm

ESCAPE_ISOLATIONS = os.environ.get("MCTL_TEST_NODE_ISOLATIONS", "gvisor").split(",")


def _on_nodes(test):
    """test_sandbox's body, parametrized over ESCAPE_ISOLATIONS (bwrap runs only on the
    control plane's host), so no variant is collected only to be skipped."""
    @functools.wraps(test)
    def body(*args, **kwargs):
        return test(*args, **kwargs)

    marks = [m for m in getattr(test, "pytestmark", [])
             if not (m.name == "parametrize" and m.args[0] == "isolation")]
    body.pytestmark = marks + ([pytest.mark.parametrize("isolation", ESCAPE_ISOLATIONS)]
                               if len(marks) < len(getattr(test, "pytestmark", [])) else [])
    return body


for _name in (
        "test_a_chatty_process_does_not_block",
        "test_block_network_refuses_sockets",
        "test_fork_past_the_pid_limit_fails_inside",
        "test_memory_limit_stops_the_hog_not_the_host",
        "test_rm_rf_root_leaves_the_host_and_mounts_alone",
        "test_secrets_of_the_host_are_out_of_reach",
        "test_stdin_round_trips_bytes",
        "test_terminate_kills_the_process_tree",
        "test_timeout_ends_with_minus_one",
        "test_writes_outside_the_scratch_layer_fail",
):
    globals()[_name] = _on_nodes(getattr(test_sandbox, _name))

pytestmark = [pytest.mark.integration, pytest.mark.slurm]


@pytest.fixture(params=ISOLATIONS)
def isolation(request):
    """The runtime of the tests that do not name one themselves (the control plane's
    MCTL_SANDBOX_ISOLATION); the parametrized escape tests override it with their own."""
    return request.param


@pytest.fixture
def _isolation_env(isolation, monkeypatch):
    monkeypatch.setenv("MCTL_SANDBOX_ISOLATION", isolation)  # before the control plane starts


@pytest.fixture
def app(_isolation_env, slurm_server, slurm_cluster):  # noqa: F811
    """The test bodies' app, on a control plane whose sandboxes are Slurm jobs; every sandbox
    they create is checked to have run on a node."""
    a = mctl.App("sandbox-tests")
    with a.run():
        yield a
    from mctl.sdk.sandbox import _http

    records = _http(slurm_server.url, "GET", "/api/sandboxes",
                    params={"app_id": a.app_id, "all": "1"})
    assert records
    for rec in records:
        assert rec["backend"] == "slurm" and rec["host"] in slurm_cluster.nodes, rec


def _on_node(cluster, job_id, *argv):
    """`argv` on the node of a running job, inside it, as the control plane's relay runs things."""
    return subprocess.run(["srun", f"--jobid={job_id}", "--overlap", "--quiet", *argv],
                          capture_output=True, text=True, env=cluster.client_env(), timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_rm_rf_root_on_a_node_leaves_the_nodes_canary(app, isolation, slurm_cluster, tmp_path):
    """The canary as the node sees it (read by a step of the sandbox's own job, on its node)."""
    canary = tmp_path / "node-canary"
    canary.write_text("alive")
    sb = mctl.Sandbox.create(app=app, isolation=isolation, timeout=300)
    job = _job_of(slurm_cluster, sb.object_id)
    seen = _on_node(slurm_cluster, job, "sh", "-c", f"hostname; cat {canary}")
    assert seen.stdout.split() == [sb._record["host"], "alive"], seen
    rc, out, err = run(sb, "rm", "-rf", "/", "--no-preserve-root", timeout=120)
    assert rc != 0
    seen = _on_node(slurm_cluster, job, "sh", "-c", f"cat {canary}; echo; test -x /usr/bin/podman "
                    "&& test -s /etc/passwd && echo node-ok")
    assert seen.stdout.split() == ["alive", "node-ok"], seen
    # the sandbox itself lost what its user could delete, and only that
    assert run(sb, "python3", "-c", "import os; print(os.path.exists('/tmp'))")[1] == "True\n"
    sb.terminate()


def _job_of(cluster, sandbox_id):
    out = subprocess.run(["squeue", "-h", "-o", "%i %k"], capture_output=True, text=True,
                         env=cluster.client_env(), timeout=20).stdout
    return next(line.split()[0] for line in out.splitlines() if f"sandbox={sandbox_id}" in line)


# --- snapshot_filesystem() on a node ------------------------------------------------------------
@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_files_and_a_snapshot_on_a_node(app, isolation):
    """Without MCTL_IMAGE_REGISTRY the snapshot stays in the node's podman storage (which the
    development cluster's nodes share): `localhost/mctl/snapshot:<id>`."""
    sb = mctl.Sandbox.create(app=app, isolation=isolation)
    with sb.open("/tmp/notes.txt", "w") as f:
        f.write("hello\n")
    with pytest.raises(PermissionError):
        with sb.open("/etc/passwd", "w") as f:
            f.write("x")
    image = sb.snapshot_filesystem()
    assert image.base["tag"] == f"localhost/mctl/snapshot:{sb.object_id.lower()}"
    sb.terminate()
    again = mctl.Sandbox.create(app=app, image=image, isolation=isolation)
    assert again._record["backend"] == "slurm"
    assert run(again, "cat", "/tmp/notes.txt")[1] == "hello\n"
    # as the sandbox's user, which may change it again
    appended = run(again, "python3", "-c", "open('/tmp/notes.txt', 'a').write('more')")
    assert appended[0] == 0, appended
    # a file it deletes stays deleted in its snapshot
    assert run(again, "python3", "-c", "import os; os.remove('/tmp/notes.txt'); "
               "open('/tmp/kept.txt', 'w').write('kept')")[0] == 0
    second = again.snapshot_filesystem()
    again.terminate()
    third = mctl.Sandbox.create(app=app, image=second, isolation=isolation)
    assert run(third, "python3", "-c", "import os; print(sorted(os.listdir('/tmp')))")[1] == \
        "['kept.txt']\n"
    third.terminate()
    for made in (image, second):
        subprocess.run(["podman", "rmi", "-f", made.base["tag"]], capture_output=True,
                       timeout=60)


@pytest.fixture
def node_registry(slurm_cluster, tmp_path, monkeypatch):
    """A registry (distribution, as scripts/images-dev runs) on the bridge address the nodes
    reach, as the control plane's MCTL_IMAGE_REGISTRY (set before the control plane starts)."""
    import shutil
    import socket
    import time

    from conftest import free_port

    if not shutil.which("docker-registry"):
        pytest.fail("docker-registry is not installed: run scripts/images-dev up")
    address = f"{slurm_cluster.host_addr}:{free_port()}"
    config = tmp_path / "registry.yml"
    config.write_text(f"version: 0.1\nlog: {{level: warn}}\nstorage: {{filesystem: "
                      f"{{rootdirectory: {tmp_path / 'registry'}}}}}\nhttp: {{addr: {address}}}\n")
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "registry.log", "wb"))
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, (tmp_path / "registry.log").read_text()
            time.sleep(0.1)
    monkeypatch.setenv("MCTL_IMAGE_REGISTRY", address)
    monkeypatch.setenv("MCTL_INSECURE_REGISTRIES", address)
    try:
        yield address
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_a_snapshot_is_pushed_and_pulled_by_the_next_node(node_registry, app, isolation):
    """With MCTL_IMAGE_REGISTRY the node pushes its snapshot there; with the image gone from
    every node's storage, the next sandbox's node pulls it."""
    import json
    import urllib.request

    sb = mctl.Sandbox.create(app=app, isolation=isolation)
    p = sb.exec("sh", "-c", "mkdir -p /tmp/work && echo from-the-first-node > /tmp/work/f.txt")
    assert p.wait() == 0, p.stderr.read()
    image = sb.snapshot_filesystem()
    ref = image.base["tag"]
    assert ref == f"{node_registry}/mctl/snapshot:{sb.object_id.lower()}"
    sb.terminate()
    tags = json.loads(urllib.request.urlopen(
        f"http://{node_registry}/v2/mctl/snapshot/tags/list", timeout=10).read())
    assert sb.object_id.lower() in tags["tags"]
    # the nodes share this machine's podman storage: remove it there, the next node must pull
    subprocess.run(["podman", "rmi", "-f", ref], capture_output=True, timeout=60)
    assert subprocess.run(["podman", "image", "exists", ref]).returncode == 1
    again = mctl.Sandbox.create(app=app, image=image, isolation=isolation)
    try:
        assert run(again, "cat", "/tmp/work/f.txt")[1] == "from-the-first-node\n"
    finally:
        again.terminate()
        subprocess.run(["podman", "rmi", "-f", ref], capture_output=True, timeout=60)


# --- tunnels to a sandbox on a node -------------------------------------------------------------
@pytest.mark.parametrize("isolation", ["runc"])  # Debian's runsc has no network here
def test_a_tunnel_to_a_sandbox_on_a_node(app, isolation, slurm_server):  # noqa: F811
    """The sandbox publishes its port on its node; the client gets a relay on the control
    plane's address, and a real connection through it reaches the server in the sandbox."""
    import socket
    import time
    import urllib.request

    sb = mctl.Sandbox.create("python3", "-m", "http.server", "8000", "--directory", "/etc",
                             app=app, encrypted_ports=[8000], unencrypted_ports=[9000],
                             block_network=False, timeout=120)
    assert sb.isolation == "runc" and sb._record["backend"] == "slurm"
    tunnels = sb.tunnels()
    assert set(tunnels) == {8000, 9000}
    tunnel = tunnels[8000]
    assert tunnel.host == slurm_server.url.split("//")[1].rsplit(":", 1)[0]  # the control plane
    deadline = time.monotonic() + 30
    while True:
        try:
            body = urllib.request.urlopen(tunnel.url + "/hostname", timeout=5).read()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert body.strip() == b"sandbox"  # the container's, not the node's (node1/node2)
    # a raw TCP round trip to a second port: a server started there by exec
    p = sb.exec("python3", "-c", "import socket\ns = socket.create_server(('', 9000))\n"
                "print('listening', flush=True)\nc, _ = s.accept()\n"
                "c.sendall(c.recv(100).upper()); c.close()")
    assert next(iter(p.stdout)) == "listening\n"
    with socket.create_connection(tunnels[9000].tcp_socket, timeout=10) as conn:
        conn.sendall(b"ping through the relay")
        assert conn.recv(100) == b"PING THROUGH THE RELAY"
    assert p.wait() == 0
    sb.terminate()
    # the relay closed with the sandbox
    time.sleep(0.5)
    with pytest.raises(OSError):
        socket.create_connection(tunnel.tcp_socket, timeout=5).close()


@pytest.mark.slow
@pytest.mark.parametrize("isolation", ["gvisor"])
def test_a_function_runs_on_a_snapshot_image_on_a_node(node_registry, app, isolation,
                                                       slurm_cluster):
    """The snapshot is an image like any other: a function deployed on it runs on a node."""
    import os
    import sys

    from conftest import APPS

    sb = mctl.Sandbox.create(app=app)
    with sb.open("/tmp/result.txt", "w") as f:
        f.write("made in a sandbox")
    image = sb.snapshot_filesystem()
    sb.terminate()
    env = {**os.environ, "SNAPSHOT_IMAGE": image.base["tag"]}
    out = subprocess.run([sys.executable, "-m", "mctl", "deploy",
                          str(APPS / "snapshot_function.py")], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    try:
        node, text = mctl.Function.from_name("snapshot-function", "read").remote(
            "/tmp/result.txt").split(" ", 1)
        assert node in slurm_cluster.nodes and text == "made in a sandbox"
    finally:
        subprocess.run([sys.executable, "-m", "mctl", "app", "stop", "snapshot-function"],
                       env=os.environ, timeout=60, capture_output=True)
        subprocess.run(["podman", "rmi", "-f", image.base["tag"]], capture_output=True,
                       timeout=60)


@pytest.mark.parametrize("isolation", ["runc"])
def test_a_tunnel_is_relayed_again_after_a_control_plane_restart(app, isolation,
                                                                slurm_server):  # noqa: F811
    """The relays die with the control plane (SIGKILL); the restarted one adopts the sandbox's
    job and opens new ones from the node ports it recorded."""
    import time
    import urllib.request

    def get(url):
        deadline = time.monotonic() + 30
        while True:
            try:
                return urllib.request.urlopen(url + "/hostname", timeout=5).read().strip()
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    sb = mctl.Sandbox.create("python3", "-m", "http.server", "8000", "--directory", "/etc",
                             app=app, encrypted_ports=[8000], timeout=120)
    before = sb.tunnels()[8000]
    assert get(before.url) == b"sandbox"
    slurm_server.kill()
    slurm_server.start()
    after = mctl.Sandbox.from_id(sb.object_id).tunnels()[8000]
    assert get(after.url) == b"sandbox"
    mctl.Sandbox.from_id(sb.object_id).terminate()
