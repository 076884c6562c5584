"""SIGTERM, SIGHUP, a closed stdout and SIGKILL during `mctl run` or a script's `with app.run():`:
the app's sandbox, warm and worker containers go as after Ctrl-C (one line, 128 + signal), and
what a crash leaves is removed by the next embedded control plane. Real processes and podman."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import wait_until

pytestmark = pytest.mark.integration

APP = """
import sys, time
import mctl

app = mctl.App("signals")

@app.function()
def slow(i):
    time.sleep(120)
    return i

@app.local_entrypoint()
def main():
    sb = mctl.Sandbox.create(app=app, timeout=600)
    print("sandbox", sb.object_id, flush=True)
    print(list(slow.map(range(2))))

if __name__ == "__main__":
    with app.run():
        main()
"""

NOISY = """
import mctl

app = mctl.App("noisy")

@app.function()
def noisy(k):
    for i in range(10000):
        print(f"k{k} line {i}")
    return k

@app.local_entrypoint()
def main():
    print(list(noisy.map(range(4))))
"""


def _podman_problem():
    from mctl.core import sandbox_runtime

    base = os.environ.get("MCTL_IMAGE_BASE_DEBIAN_SLIM", sandbox_runtime.DEFAULT_IMAGE)
    if not shutil.which("podman"):
        return "podman is not installed (scripts/images-dev up)"
    if subprocess.run(["podman", "image", "exists", base]).returncode != 0:
        return f"the base image {base} is missing (scripts/images-dev up)"
    return None


@pytest.fixture
def podman():
    problem = _podman_problem()
    if problem:
        if os.environ.get("MCTL_REQUIRE_SERVERS") == "1":
            pytest.fail(problem)
        pytest.skip(problem)


def _containers_of(pid):
    """The containers (sandbox and warm) of the embedded control plane in process `pid`."""
    out = subprocess.run(["podman", "ps", "-a", "--format", '{{.Names}} {{index .Labels '
                          '"mctl.ephemeral"}}'], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines()
            if len(line.split()) == 2 and line.split()[1].split(":")[1:2] == [str(pid)]}


def _start(argv, tmp_path):
    app = tmp_path / "signals_app.py"
    app.write_text(APP)
    proc = subprocess.Popen([*argv, str(app)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    line = proc.stdout.readline()
    assert line.startswith("sandbox sb-"), (line, proc.communicate(timeout=30))
    sandbox_id = line.split()[1]
    # the sandbox and the warm container that replaces the one it took
    wait_until(lambda: len(_containers_of(proc.pid)) >= 2, timeout=60)
    assert f"mctl-{sandbox_id.lower()}" in _containers_of(proc.pid)
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("how", ["mctl run", "script"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_term_and_hup_clean_up_as_ctrl_c_does(how, sig, tmp_path, podman):
    """They used to end the process at once, leaving the sandbox (podman timeout 630 s) and a
    warm container (24 h) that no command could see or remove."""
    argv = ([sys.executable, "-m", "mctl", "run"] if how == "mctl run" else [sys.executable])
    proc = _start(argv, tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    what = {signal.SIGTERM: "Terminated (SIGTERM)", signal.SIGHUP: "Hung up (SIGHUP)"}[sig]
    assert err.strip().splitlines() == [f"{what}; the app was stopped."], err
    assert _containers_of(proc.pid) == set()


@pytest.mark.slow
def test_a_crashed_runs_containers_are_removed_by_the_next_one(tmp_path, podman):
    """SIGKILL leaves them; the next embedded control plane removes them, not a live one's."""
    live = _start([sys.executable], tmp_path)
    crashed = _start([sys.executable, "-m", "mctl", "run"], tmp_path)
    try:
        left = _containers_of(crashed.pid)
        crashed.kill()
        crashed.wait()
        assert _containers_of(crashed.pid) == left  # nothing ran to remove them
        (tmp_path / "quick.py").write_text(
            "import mctl\napp = mctl.App('quick')\n\n@app.function()\ndef f():\n    return 1\n")
        subprocess.run([sys.executable, "-m", "mctl", "run", str(tmp_path / "quick.py")],
                       check=True, timeout=120, capture_output=True)
        wait_until(lambda: _containers_of(crashed.pid) == set(), timeout=30)
        assert len(_containers_of(live.pid)) >= 2  # a live run's are left alone
        # the net under a crash is an hour for a warm container (sandboxes.WARM_TTL_S), not 24 h
        warm = [n for n in _containers_of(live.pid) if n.startswith("mctl-warm-")]
        assert warm
        timeout = subprocess.run(["podman", "inspect", "--format", "{{.Config.Timeout}}",
                                  warm[0]], capture_output=True, text=True).stdout.strip()
        assert timeout == "3630"
    finally:
        live.send_signal(signal.SIGTERM)
        live.communicate(timeout=60)
    assert _containers_of(live.pid) == set()


def test_a_closed_stdout_ends_the_run_quietly(tmp_path):
    """`mctl run app.py | head -2` printed ~1,700 lines of mctl's own BrokenPipeError tracebacks
    and ran on to the end."""
    (tmp_path / "noisy.py").write_text(NOISY)
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "mctl", "run", str(tmp_path / "noisy.py")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"k0 line 0\n"
    proc.stdout.close()  # as `head -1` does once it has its line
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert err == "", err
    assert proc.returncode == 128 + signal.SIGPIPE
    assert time.monotonic() - start < 30


def test_ctrl_c_in_mctl_run_exits_130_with_the_scripts_line(tmp_path):
    """It said click's `Aborted!` and exited 1; a script says this line and exits 130."""
    (tmp_path / "slow.py").write_text(
        "import time\nimport mctl\napp = mctl.App('ctrl-c')\n\n@app.function()\ndef slow():\n"
        "    print('working', flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-m", "mctl", "run", str(tmp_path / "slow.py")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().strip() == "working"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["Aborted (Ctrl-C); the app was stopped."], err


def test_app_logs_into_a_closed_pipe_is_quiet(server_process, tmp_path):
    """`mctl app logs APP | head`: no traceback, 141 (the exit of `yes | head`)."""
    (tmp_path / "talk.py").write_text(
        "import mctl\napp = mctl.App('logs-pipe')\n\n@app.function()\ndef talk():\n"
        "    for i in range(3000):\n        print(f'line {i}')\n")
    run = subprocess.run([sys.executable, "-m", "mctl", "run", "--detach",
                          str(tmp_path / "talk.py")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    app_id = run.stderr.split("detached: app ")[1].split()[0]
    proc = subprocess.Popen([sys.executable, "-m", "mctl", "app", "logs", app_id],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=30)
    assert err == "", err
    assert proc.returncode == 141
