"""Faults: killed workers, timeouts, retries, a control plane restarted mid-map."""

import os
import signal
import threading
import time

import pytest

import mctl
from conftest import ServerProcess, free_port, load_app

pytestmark = pytest.mark.integration


@pytest.fixture
def faults(tmp_path, monkeypatch):
    monkeypatch.setenv("FAULTS_DIR", str(tmp_path))
    module, app = load_app("faults")
    module.SCRATCH = tmp_path
    return module, app, tmp_path


def _wait_for(path, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def test_sigkill_mid_input_is_retried(faults):
    module, app, scratch = faults
    with app.run():
        call = module.killed_once.spawn("k1")
        os.kill(int(_wait_for(scratch / "k1.pid")), signal.SIGKILL)
        assert call.get(timeout=60) == "survived"
    assert (scratch / "k1.attempts").read_text() == "2"


def test_sigkill_without_retries_reports_crash(faults):
    module, app, scratch = faults
    with app.run():
        call = module.killed_no_retry.spawn("k2")
        os.kill(int(_wait_for(scratch / "k2.pid")), signal.SIGKILL)
        with pytest.raises(mctl.exception.ContainerCrashedError, match=r"was killed by signal 9 \(SIGKILL\)"):
            call.get(timeout=60)


def test_retries_with_backoff(faults):
    module, app, scratch = faults
    with app.run():
        assert module.flaky.remote("f1") == 3


def test_timeout_kills_the_attempt(faults):
    module, app, _ = faults
    with app.run():
        start = time.monotonic()
        with pytest.raises(mctl.exception.FunctionTimeoutError, match="timed out after 1s"):
            module.too_slow.remote()
        assert time.monotonic() - start < 15


def test_control_plane_restart_mid_map(faults, tmp_path, monkeypatch):
    module, app, _ = faults
    srv = ServerProcess(tmp_path / "state", free_port(), dict(os.environ)).start()
    monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
    n = 10_000
    results = []
    errors = []
    try:
        with app.run():
            def consume():
                try:
                    results.extend(module.inc.map(range(n)))
                except BaseException as exc:  # reported below
                    errors.append(exc)

            consumer = threading.Thread(target=consume)
            consumer.start()
            # let part of the map finish, then kill the control plane without warning
            deadline = time.monotonic() + 60
            while not results and time.monotonic() < deadline and consumer.is_alive():
                time.sleep(0.01)
            srv.kill()
            done_at_kill = len(results)
            time.sleep(0.5)
            srv.start()
            consumer.join(240)
            assert not consumer.is_alive(), "map did not finish after the restart"
    finally:
        srv.stop()
    assert not errors, errors
    assert 0 < done_at_kill < n, "the kill did not land in the middle of the map"
    assert results == [x + 1 for x in range(n)]


def test_ephemeral_app_stops_when_its_caller_dies(tmp_path, monkeypatch):
    import json
    import subprocess
    import sys

    from conftest import APPS, wait_until
    from mctl.core.transport import urlopen

    monkeypatch.setenv("MCTL_EPHEMERAL_GRACE", "1")
    srv = ServerProcess(tmp_path / "state", free_port(), dict(os.environ)).start()
    script = tmp_path / "caller.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(APPS)!r})\n"
        "from basic import app, square\n"
        "with app.run():\n"
        "    print(square.remote(3), flush=True)\n"
        "    time.sleep(600)\n")

    def apps():
        with urlopen(f"{srv.url}/api/apps?all=1") as resp:
            return json.load(resp)

    caller = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, MCTL_SERVER_URL=srv.url))
    try:
        assert caller.stdout.readline().strip() == "9"
        time.sleep(2)  # longer than the grace: a connected caller keeps its app
        assert [a["state"] for a in apps()] == ["running"]
        caller.kill()
        caller.wait()
        assert wait_until(lambda: [a["state"] for a in apps()] == ["stopped"], timeout=20)
    finally:
        caller.kill()
        srv.stop()
