"""The slurm backend against the real development cluster (scripts/slurm-dev up)."""

import os
import subprocess
import sys
import time

import pytest

import mctl
from conftest import APPS, ServerProcess, free_port, load_app, wait_until
from test_images_build import images_dev  # noqa: F401 - a fixture: podman, buildah, the base

pytestmark = [pytest.mark.integration, pytest.mark.slurm]


@pytest.fixture(params=["cli"])
def slurm_server(request, slurm_cluster, tmp_path, isolated_home, monkeypatch):
    """A control plane on the bridge address the nodes reach, placing workers as Slurm jobs
    through Slurm's commands (api=cli) or slurmrestd (api=rest)."""
    for key, value in slurm_cluster.env.items():
        monkeypatch.setenv(key, value)
    if request.param == "rest":
        token = slurm_cluster.run_script("token").stdout
        monkeypatch.setenv("SLURM_JWT", token.strip().split("SLURM_JWT=", 1)[1].split()[0])
    port = free_port()
    srv = ServerProcess(tmp_path / "state", port, dict(os.environ), args=[
        "--host", slurm_cluster.host_addr, "--scheduler", "slurm",
        "--scheduler-option", f"api={request.param}",
        "--scheduler-option", f"output_dir={tmp_path / 'jobs'}",
        "--scheduler-option", "gpu_map=A100=a100"])
    srv.url = f"http://{slurm_cluster.host_addr}:{port}"
    srv.start()
    monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
    try:
        yield srv
    finally:
        srv.stop()


def our_jobs(cluster):
    out = subprocess.run(["squeue", "-h", "-o", "%i %j %k"], capture_output=True, text=True,
                         env=cluster.client_env(), timeout=20).stdout
    return [line for line in out.splitlines() if "mctl app=onslurm" in line]


@pytest.mark.parametrize("slurm_server", ["cli", "rest"], indirect=True)
def test_functions_run_as_slurm_jobs_on_the_nodes(slurm_server, slurm_cluster):
    from mctl.core.runner import deploy_app

    _, app = load_app("onslurm")
    deploy_app(app)
    where = mctl.Function.from_name("onslurm", "where")
    start = time.monotonic()
    assert where.remote(0) in slurm_cluster.nodes  # a cold start: no worker before this call
    cold = time.monotonic() - start
    hosts = set(where.map(range(12)))
    assert hosts == set(slurm_cluster.nodes[:2]), hosts  # both nodes under load
    jobs = [j for j in our_jobs(slurm_cluster) if "function=where" in j]
    assert len(jobs) == 2 and all("mctl-onslurm-where" in j for j in jobs), jobs
    assert cold < 60

    assert mctl.Function.from_name("onslurm", "gpus").remote() == "0,1"

    with pytest.raises(mctl.exception.ExecutionError,
                       match=r"too_many_gpus cannot be placed: no node offers 3 GPU\(s\) of "
                             r"type a100"):
        mctl.Function.from_name("onslurm", "too_many_gpus").remote()

    subprocess.run([sys.executable, "-m", "mctl", "app", "stop", "onslurm"], check=True,
                   env=os.environ, timeout=60)
    assert wait_until(lambda: not our_jobs(slurm_cluster), 60), our_jobs(slurm_cluster)


def test_node_failure_mid_map_completes_every_input_once(slurm_server, slurm_cluster):
    """One node's link is cut during a 10,000-input map: its worker's inputs are retried on the
    other node, the pool is brought back to size there, and every result arrives exactly once."""
    import threading

    from mctl.core.runner import deploy_app

    _, app = load_app("onslurm")
    deploy_app(app)
    quick = mctl.Function.from_name("onslurm", "quick")
    assert quick.remote(1) == 2
    results = {}
    caller = threading.Thread(target=lambda: results.update(out=list(quick.map(range(10_000)))))
    victim = slurm_cluster.nodes[0]
    try:
        caller.start()
        time.sleep(3.0)  # 10,000 inputs of 2 ms on two workers: about 10 s of work
        slurm_cluster.run_script("cut", victim)
        cut_at = time.monotonic()
        caller.join(240)
        assert not caller.is_alive(), "the map did not finish"
        assert results["out"] == [x * 2 for x in range(10_000)]
        print(f"map finished {time.monotonic() - cut_at:.1f}s after the cut")
    finally:
        slurm_cluster.run_script("heal", victim)
        slurm_cluster.run("scontrol", "update", f"nodename={victim}", "state=resume",
                          check=False)


@pytest.mark.parametrize("slurm_server", ["cli", "rest"], indirect=True)
def test_a_control_plane_killed_mid_map_adopts_its_jobs_and_runs_each_input_once(
        slurm_server, slurm_cluster, isolated_home, tmp_path):
    """The control plane is SIGKILLed during a map and restarted: it adopts the Slurm jobs that
    still run (no new submissions), their workers keep the inputs they hold, and every input
    runs once and returns once."""
    import threading

    from mctl.core.runner import deploy_app

    _, app = load_app("onslurm")
    deploy_app(app)
    counted = mctl.Function.from_name("onslurm", "counted")
    assert counted.remote(-1) == -1

    def job_ids():
        return {j.split()[0] for j in our_jobs(slurm_cluster) if "function=counted" in j}

    n = 400  # 0.05 s each on two workers: about 10 s of work
    results = {}
    caller = threading.Thread(target=lambda: results.update(out=list(counted.map(range(n)))))
    caller.start()
    ran = isolated_home / "counted"
    assert wait_until(lambda: len(ran.read_text().splitlines()) > 40, 60)
    before = job_ids()
    assert len(before) == 2, before
    slurm_server.kill()
    time.sleep(1.0)
    slurm_server.start()
    caller.join(180)
    assert not caller.is_alive(), "the map did not finish after the restart"
    assert results["out"] == list(range(n))
    assert job_ids() <= before, "the restarted control plane submitted new jobs"
    runs = [line.split()[0] for line in ran.read_text().splitlines()]
    twice = sorted({x for x in runs if runs.count(x) > 1})
    assert not twice, f"inputs run more than once: {twice[:10]}"
    assert "adopted job" in (tmp_path / "server.log").read_text()


def test_scale_to_zero_cold_start_and_schedules_on_the_cluster(slurm_server, slurm_cluster,
                                                              isolated_home):
    """A pool idle past scaledown_window has no job left; the next call starts one. A schedule
    fires in the control plane and runs on a node."""
    from mctl.core.runner import deploy_app

    ticks = isolated_home / "ticks"  # written by the scheduled function on a node
    _, app = load_app("onslurm")
    deploy_app(app)
    brief = mctl.Function.from_name("onslurm", "brief")
    assert brief.remote(1) in slurm_cluster.nodes

    def brief_jobs():
        return [j for j in our_jobs(slurm_cluster) if "function=brief" in j]

    assert brief_jobs()
    assert wait_until(lambda: not brief_jobs(), 60), brief_jobs()  # scaled to zero
    assert brief.remote(2) in slurm_cluster.nodes  # a cold start from zero
    assert wait_until(lambda: ticks.exists() and len(ticks.read_text().split()) >= 2, 60)
    assert set(ticks.read_text().split()) <= set(slurm_cluster.nodes)


def test_a_third_two_gpu_worker_waits_for_a_free_node(slurm_server, slurm_cluster):
    """Each node has 2 GPUs: two 2-GPU workers run, the third job waits in Slurm's queue (core
    asked for 3), and every input still finishes on the two that run."""
    from mctl.core.runner import deploy_app

    _, app = load_app("onslurm")
    deploy_app(app)
    gpu_work = mctl.Function.from_name("onslurm", "gpu_work")
    calls = [gpu_work.spawn(i) for i in range(6)]

    def states():
        out = slurm_cluster.run("squeue", "-h", "-o", "%T %k").stdout
        return sorted(line.split()[0] for line in out.splitlines() if "function=gpu_work" in line)

    assert wait_until(lambda: states() == ["PENDING", "RUNNING", "RUNNING"], 60), states()
    results = [call.get(timeout=120) for call in calls]
    assert {gpus for gpus, _ in results} == {"0,1"}
    assert {host for _, host in results} == set(slurm_cluster.nodes[:2])


def test_rest_settings_that_are_missing_or_wrong_say_which(slurm_cluster, tmp_path):
    """A missing or bad JWT, or Slurm unreachable: `mctl server` stops with one line naming the
    setting."""
    from test_deploy import mctl_cli

    base = ["server", "--host", slurm_cluster.host_addr, "--port", "0", "--state-dir",
            str(tmp_path / "state"), "--scheduler", "slurm", "--scheduler-option", "api=rest"]
    env = {k: v for k, v in slurm_cluster.client_env().items() if k != "SLURM_JWT"}
    out = mctl_cli(*base, env=env, check=False)
    assert out.returncode == 1 and "SLURM_JWT is not set" in out.stderr
    out = mctl_cli(*base, env={**env, "SLURM_JWT": "not-a-token"}, check=False)
    assert out.returncode == 1 and "Check that SLURM_JWT is a valid" in out.stderr, out.stderr
    assert "Unclosed" not in out.stderr
    out = mctl_cli(*base[:-1], "api=cli", "--scheduler-option", "command_timeout=3",
                   env={**env, "SLURM_CONF": str(tmp_path / "none.conf")}, check=False)
    assert out.returncode == 1 and "`scontrol show`" in out.stderr, out.stderr
    assert "SLURM_CONF" in out.stderr and len(out.stderr.strip().splitlines()) <= 2


def test_secrets_and_logs_reach_slurm_workers(slurm_server, slurm_cluster, tmp_path):
    """A Secret.from_dict value reaches the job (fetched with its task token, not in the job's
    environment or script), and what the function prints is in `mctl app logs`."""
    from mctl.core.runner import deploy_app
    from test_deploy import mctl_cli

    _, app = load_app("onslurm")
    deploy_app(app)
    assert mctl.Function.from_name("onslurm", "talk").remote() == "hello from a secret"[::-1]
    assert wait_until(lambda: "printed on node" in mctl_cli("app", "logs", "onslurm").stdout, 30)
    scripts = list((tmp_path / "jobs").glob("*.sbatch"))
    assert scripts and not any("hello from a secret" in p.read_text() for p in scripts)
    env_dump = slurm_cluster.run("scontrol", "show", "job", "-d").stdout
    assert "hello from a secret" not in env_dump


@pytest.fixture
def image_tools(images_dev, monkeypatch):  # noqa: F811 - the imported fixture
    for key, value in images_dev.items():
        monkeypatch.setenv(key, value)


def test_a_function_runs_in_its_container_image_on_a_node(image_tools, slurm_server,
                                                          slurm_cluster):
    """apt_install and run_commands build an OCI image on the control plane; the Slurm job runs
    the worker in it with podman on the node, and `app stop` leaves no job or container."""
    out = subprocess.run([sys.executable, "-m", "mctl", "deploy", str(APPS / "image_oci.py")],
                         capture_output=True, text=True, timeout=600, env=os.environ)
    assert out.returncode == 0, out.stderr
    tools = mctl.Function.from_name("image-oci", "tools").remote()
    assert tools["jq"].startswith("jq-") and tools["built"] == "built"
    assert (tools["cwd"], tools["flavour"]) == ("/srv", "oci")
    jobs = [line for line in subprocess.run(
        ["squeue", "-h", "-o", "%i %k"], capture_output=True, text=True,
        env=slurm_cluster.client_env(), timeout=20).stdout.splitlines() if "function=tools" in line]
    assert len(jobs) == 1, jobs

    def containers():
        return subprocess.run(["podman", "ps", "-q", "--filter", "label=mctl.pool"],
                              capture_output=True, text=True, timeout=60).stdout.split()

    assert containers()
    subprocess.run([sys.executable, "-m", "mctl", "app", "stop", "image-oci"], check=True,
                   env=os.environ, timeout=60)
    assert wait_until(lambda: not containers(), 60), containers()


def test_a_pip_installed_package_imports_on_a_node(image_tools, slurm_server, slurm_cluster):
    """An image that only pip-installs (the venv path on one machine) runs on a node too: the
    package the host lacks imports in the Slurm job."""
    import importlib.util

    assert importlib.util.find_spec("tomli_w") is None, "the test needs a package the host lacks"
    out = subprocess.run([sys.executable, "-m", "mctl", "deploy", str(APPS / "image_pip.py")],
                         capture_output=True, text=True, timeout=600, env=os.environ)
    assert out.returncode == 0, out.stderr
    assert mctl.Function.from_name("image-pip", "dump").remote({"a": 1}) == ("a = 1\n", "venv")
    jobs = subprocess.run(["squeue", "-h", "-o", "%i %k"], capture_output=True, text=True,
                          env=slurm_cluster.client_env(), timeout=20).stdout
    assert "function=dump" in jobs, jobs
    subprocess.run([sys.executable, "-m", "mctl", "app", "stop", "image-pip"], check=True,
                   env=os.environ, timeout=60)


@pytest.mark.parametrize("driver", ["store", "shared-path"])
def test_a_file_written_on_one_node_is_read_on_another(slurm_cluster, tmp_path, isolated_home,
                                                       monkeypatch, driver):
    """shared-path: every node sees the directory (here the nodes share this machine's file
    system); each job binds it at the mount path. store (the default): each job binds a working
    copy of its own, filled from and committed to the control plane over HTTP."""
    from test_deploy import mctl_cli

    for key, value in slurm_cluster.env.items():
        monkeypatch.setenv(key, value)
    shared = tmp_path / "shared"
    shared.mkdir()
    scratch = tmp_path / "scratch"
    if driver == "shared-path":
        monkeypatch.setenv("MCTL_VOLUME_DRIVER", "shared-path")
        monkeypatch.setenv("MCTL_VOLUME_SHARED_PATH", str(shared))
    else:
        monkeypatch.delenv("MCTL_VOLUME_DRIVER", raising=False)
        monkeypatch.delenv("MCTL_VOLUME_SHARED_PATH", raising=False)
        monkeypatch.setenv("MCTL_VOLUME_SCRATCH", str(scratch))
    port = free_port()
    srv = ServerProcess(tmp_path / "state", port, dict(os.environ), args=[
        "--host", slurm_cluster.host_addr, "--scheduler", "slurm",
        "--scheduler-option", f"output_dir={tmp_path / 'jobs'}"])
    srv.url = f"http://{slurm_cluster.host_addr}:{port}"
    srv.start()
    monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
    mount = str(tmp_path / "mnt" / "data")  # made on the node, empty: the bind is the job's
    app_file = tmp_path / "volapp.py"
    app_file.write_text(
        "import os, socket\nimport mctl\napp = mctl.App('slurmvol')\n"
        "vol = mctl.Volume.from_name('onnodes', create_if_missing=True)\n"
        "# cpu=3 of a node's 4: while the writer's worker is warm, the reader needs the other node\n"
        f"MOUNT = {mount!r}\n"
        "@app.function(volumes={MOUNT: vol}, cpu=3, scaledown_window=120)\n"
        "def write(text):\n"
        "    with open(MOUNT + '/note.txt', 'w') as fh:\n"
        "        fh.write(text + ' from ' + socket.gethostname())\n"
        "    vol.commit()\n"
        "    return socket.gethostname()\n"
        "@app.function(volumes={MOUNT: vol}, cpu=3)\n"
        "def read():\n"
        "    vol.reload()\n"
        "    from mctl.core import volume_sync\n"
        "    copies = [c.dir for c in volume_sync.copies_of('onnodes')]\n"
        "    return open(MOUNT + '/note.txt').read(), socket.gethostname(), copies\n")
    try:
        mctl_cli("deploy", str(app_file))
        writer = mctl.Function.from_name("slurmvol", "write").remote("hello")
        text, reader, copies = mctl.Function.from_name("slurmvol", "read").remote()
        assert reader != writer and {reader, writer} <= set(slurm_cluster.nodes)
        assert text == f"hello from {writer}"
        if driver == "shared-path":
            assert (shared / "onnodes" / "note.txt").read_text() == text
            assert copies == []
        else:  # the reader's own copy, filled over HTTP from the control plane's store
            assert len(copies) == 1 and copies[0].startswith(str(scratch))
            store = isolated_home / "volume-store"
            assert text.encode() in [p.read_bytes() for p in (store / "objects").glob("*/*")]
            assert b"".join(mctl.Volume.from_name("onnodes").read_file("note.txt")) == \
                text.encode()
        assert os.listdir(mount) == []
        mctl_cli("app", "stop", "slurmvol")
        if driver == "store":  # each job removed its copy on the way out
            assert wait_until(lambda: not any(scratch.rglob("*")), 60), list(scratch.rglob("*"))
    finally:
        srv.stop()


SLURM_FAILS = '''import os

import mctl

app = mctl.App("slurm-fails")


@app.function()
def fails(x):
    raise KeyError(f"missing {x}")


@app.function(retries=mctl.Retries(max_retries=1, initial_delay=0.0, max_delay=1.0))
def crashes():
    os._exit(3)
'''


def test_failed_and_crashed_inputs_on_nodes_are_in_the_app_logs(slurm_server, slurm_cluster,
                                                                 tmp_path):
    """The same entries as on the local backend (test_failure_logs): the control plane writes
    them, for a node's exception and for a job the backend saw end."""
    from test_deploy import mctl_cli

    app_file = tmp_path / "slurm_fails.py"
    app_file.write_text(SLURM_FAILS)
    assert mctl_cli("deploy", str(app_file)).returncode == 0
    with pytest.raises(KeyError):
        mctl.Function.from_name("slurm-fails", "fails").remote(1)
    with pytest.raises(mctl.exception.ContainerCrashedError) as info:
        mctl.Function.from_name("slurm-fails", "crashes").remote()
    assert "of crashes exited with code 3 before it finished; crashes failed after 2 attempts " \
        "(retries=1)" in str(info.value), str(info.value)

    def logged():
        return mctl_cli("app", "logs", "slurm-fails", "--stream", "stderr").stderr

    assert wait_until(lambda: "KeyError: 'missing 1'" in logged(), 30), logged()
    text = logged()
    assert text.count("mctl: fails failed (input ") == 1, text
    assert "mctl: crashes crashed (" in text and "attempt 1 of 2; retrying in" in text, text
    assert "attempt 2 of 2)" in text, text
    mctl_cli("app", "stop", "slurm-fails")
