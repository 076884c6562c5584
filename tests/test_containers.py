"""`mctl container list|logs|stop` and `mctl config show` against a real control plane."""

import json
import os
import subprocess
import sys

import pytest

import mctl
from conftest import ServerProcess, free_port, load_app, wait_until

pytestmark = pytest.mark.integration


def mctl_cli(*args):
    out = subprocess.run([sys.executable, "-m", "mctl", *args], capture_output=True, text=True,
                         timeout=120, env=os.environ)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_list_read_logs_and_stop_a_container(tmp_path, isolated_home, monkeypatch):
    from mctl.core.runner import deploy_app

    srv = ServerProcess(tmp_path / "state", free_port(), dict(os.environ)).start()
    monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
    try:
        _, app = load_app("talker")
        deploy_app(app)
        talk = mctl.Function.from_name("talker", "talk")
        first_pid = talk.remote(1)
        rows = json.loads(mctl_cli("container", "list", "--json", "--app", "talker"))
        assert len(rows) == 1, rows
        row = rows[0]
        assert (row["app"], row["function"], row["state"], row["inputs"]) == (
            "talker", "talk", "idle", 0)
        cid = row["container_id"]
        assert cid in mctl_cli("container", "list")

        assert wait_until(lambda: "talking about 1" in mctl_cli("container", "logs", cid), 10)

        assert "finishes its 0 running input(s)" in mctl_cli("container", "stop", cid)
        assert wait_until(lambda: not json.loads(
            mctl_cli("container", "list", "--json", "--app", "talker")), 30)
        assert talk.remote(2) != first_pid  # a new container served the next call
        out = subprocess.run([sys.executable, "-m", "mctl", "container", "stop", cid],
                             capture_output=True, text=True, timeout=60, env=os.environ)
        assert out.returncode == 1 and f"Container {cid!r} is not running" in out.stderr
        out = subprocess.run([sys.executable, "-m", "mctl", "container", "logs", "ta-nope"],
                             capture_output=True, text=True, timeout=60, env=os.environ)
        assert out.returncode == 1 and "No container 'ta-nope'" in out.stderr
    finally:
        srv.stop()


def test_config_show_says_where_each_setting_comes_from(isolated_home, monkeypatch):
    monkeypatch.setenv("MCTL_SERVER_URL", "http://10.1.2.3:8600")
    monkeypatch.setenv("MCTL_TOKEN", "mctl_secret_value_never_shown")
    out = json.loads(mctl_cli("config", "show", "--json"))
    assert out["server"] == "http://10.1.2.3:8600" and out["server_from"] == "MCTL_SERVER_URL"
    assert out["token"] == "set" and out["token_from"] == "MCTL_TOKEN"
    assert "mctl_secret_value_never_shown" not in mctl_cli("config", "show")
