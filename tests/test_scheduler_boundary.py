"""Core's side of the scheduler boundary, with the local backend: scale-down counts idle time
from a worker's last finished input, a dropped worker connection resumes without loss or re-runs,
and a pool the backend cannot place fails its callers once, with the reason."""

import os
import threading
import time

import pytest

import mctl
from conftest import ServerProcess, TcpProxy, free_port, load_app, wait_until
from test_deploy import mctl_cli

pytestmark = pytest.mark.integration


def test_steady_calls_keep_the_same_worker(isolated_home):
    """A call every 0.5 s with scaledown_window=2: the worker is never idle for 2 s, so it stays
    (before, idle time counted from its start and a cold start replaced it every window)."""
    module, app = load_app("scaling")
    with app.run():
        tasks = [module.steady.remote(1)]  # the cold start, however slow, before the clock
        deadline = time.monotonic() + 7
        while time.monotonic() < deadline:
            tasks.append(module.steady.remote(1))
            time.sleep(0.5)
    assert len(tasks) >= 9
    assert len(set(tasks)) == 1, f"workers replaced under steady load: {tasks}"


def test_worker_connection_cut_mid_input_loses_and_repeats_nothing(tmp_path, isolated_home,
                                                                   monkeypatch):
    from mctl.core.runner import deploy_app

    runs = tmp_path / "runs"
    runs.mkdir()
    monkeypatch.setenv("RESUME_DIR", str(runs))
    port = free_port()
    proxy = TcpProxy(port)  # workers reach the server only through this relay
    srv = ServerProcess(tmp_path / "state", port, dict(os.environ),
                        args=["--advertise-url", f"http://127.0.0.1:{proxy.port}"]).start()
    monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
    try:
        _, app = load_app("resume")
        deploy_app(app)
        slow = mctl.Function.from_name("resume", "slow")
        results = {}
        caller = threading.Thread(target=lambda: results.update(
            out=list(slow.map(range(6)))))
        caller.start()
        assert wait_until(lambda: len(os.listdir(runs)) >= 2, 60)  # two inputs are running
        proxy.cut()  # both workers lose their connection mid-input; their processes live on
        caller.join(120)
        assert results.get("out") == [i * 10 for i in range(6)]
        per_input = sorted(name.split("-")[1] for name in os.listdir(runs))
        assert per_input == [str(i) for i in range(6)], f"runs per input: {per_input}"
    finally:
        srv.stop()
        proxy.close()


def test_unplaceable_pool_fails_its_callers_once_with_the_reason(tmp_path, isolated_home,
                                                                 monkeypatch):
    from mctl.core.runner import deploy_app

    config = tmp_path / "server.toml"
    config.write_text('[scheduler]\nname = "local"\n[scheduler.options]\n'
                      'strict_resources = "true"\n')
    srv = ServerProcess(tmp_path / "state", free_port(), dict(os.environ),
                        args=["--config", str(config)]).start()
    monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
    try:
        _, app = load_app("resources")
        deploy_app(app)
        huge = mctl.Function.from_name("resources", "huge")
        for _ in range(2):
            start = time.monotonic()
            with pytest.raises(mctl.exception.ExecutionError,
                               match=r"huge cannot be placed: this machine .* MiB of memory, "
                                     r"less than memory=1000000000"):
                huge.remote()
            assert time.monotonic() - start < 10
        assert mctl.Function.from_name("resources", "small").remote() == "ok"
        logs = mctl_cli("app", "logs", "resources").stdout
        assert logs.count("cannot be placed") == 1
        assert "huge: Function huge cannot be placed" in mctl_cli("app", "list").stdout
    finally:
        srv.stop()


def test_bad_scheduler_settings_say_what_to_write(tmp_path):
    out = mctl_cli("server", "--scheduler-option", "partition", check=False)
    assert out.returncode != 0
    assert "Scheduler option 'partition' is not KEY=VALUE" in out.stderr
    bad = tmp_path / "server.toml"
    bad.write_text("[scheduler\n")
    out = mctl_cli("server", "--config", str(bad), check=False)
    assert f"Cannot read server config {bad}" in out.stderr
    bad.write_text('prot = 8600\n')
    out = mctl_cli("server", "--config", str(bad), check=False)
    assert "unknown keys prot" in out.stderr
    out = mctl_cli("server", "--scheduler", "nosuch", "--port", "0", check=False)
    assert out.returncode != 0 and "No scheduler plugin named 'nosuch'" in out.stderr
