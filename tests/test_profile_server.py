"""A profile's server counts like MCTL_SERVER_URL everywhere (`mctl run`, `app.run()`, deploy,
`mctl server status`), an unreachable named server is an error at once (never a hidden local
one), and refusals say which token was sent; against real `mctl server` processes."""

import json
import os
import time

import pytest

from conftest import APPS, ServerProcess, free_port
from test_deploy import mctl_cli

pytestmark = pytest.mark.integration

TEAM_APP = '''
import mctl

app = mctl.App("team-run")
vol = mctl.Volume.from_name("team-vol", create_if_missing=True)


@app.function(secrets=[mctl.Secret.from_name("team-secret")], volumes={"/data": vol})
def key():
    import os
    return os.environ["TEAM_KEY"]


@app.local_entrypoint()
def main():
    print("team key:", key.remote())
'''


@pytest.fixture
def team(tmp_path, server_process, monkeypatch):
    """A shared server and a user on another MCTL_HOME whose active profile names it."""
    monkeypatch.delenv("MCTL_SERVER_URL")
    admin_env = dict(os.environ, MCTL_SERVER_URL=server_process.url)
    mctl_cli("secret", "create", "team-secret", "TEAM_KEY=from-the-server", env=admin_env)
    token = mctl_cli("token", "create", "--scope", "deploy", "--name", "team",
                     env=admin_env).stdout.strip()
    env = {k: v for k, v in os.environ.items() if k != "MCTL_SERVER_URL"}
    env["MCTL_HOME"] = str(tmp_path / "user-home")
    mctl_cli("token", "set", token, "--server", server_process.url, "--profile", "team-deploy",
             env=env)
    return server_process, env, admin_env, token


def test_mctl_run_and_app_run_use_the_active_profiles_server(team, tmp_path, monkeypatch):
    server, env, admin_env, _ = team
    app_file = tmp_path / "team_app.py"
    app_file.write_text(TEAM_APP)
    out = mctl_cli("run", str(app_file), env=env)
    assert "team key: from-the-server" in out.stdout, out.stdout + out.stderr
    # the app and its volume are on the profile's server, nothing new in the user's home
    apps = json.loads(mctl_cli("app", "list", "--all", "--json", env=admin_env).stdout)
    assert "team-run" in [a["name"] for a in apps]
    volumes = mctl_cli("volume", "list", "--json", env=admin_env).stdout
    assert "team-vol" in volumes
    assert not (tmp_path / "user-home" / "server.json").exists()
    assert not (tmp_path / "user-home" / "volume-store").exists()
    shown = json.loads(mctl_cli("config", "show", "--json", env=env).stdout)
    assert shown["server"] == server.url and "profile team-deploy" in shown["server_from"]

    # `with app.run():` in a process of that user, too
    from conftest import load_app
    from mctl.core import runner

    monkeypatch.setenv("MCTL_HOME", env["MCTL_HOME"])
    module, app = load_app("basic")
    with app.run():
        assert runner.running_server_url() == server.url
        assert module.square.remote(7) == 49
    assert runner.embedded_runs() == []


def test_a_named_server_that_does_not_answer_is_an_error_at_once(tmp_path, isolated_home):
    env = {k: v for k, v in os.environ.items() if k != "MCTL_SERVER_URL"}
    env["MCTL_HOME"] = str(tmp_path / "home")
    mctl_cli("token", "set", "mctl_garbage", "--server", "http://127.0.0.1:1", "--profile", "bad",
             env=env)
    for extra in ({}, {"MCTL_SERVER_URL": "http://127.0.0.1:1"}):
        started = time.monotonic()
        out = mctl_cli("deploy", str(APPS / "basic.py"), env=dict(env, **extra), check=False)
        assert out.returncode != 0 and time.monotonic() - started < 15
        assert "Could not reach the mctl control plane at http://127.0.0.1:1" in out.stderr, \
            out.stderr
        assert ("profile bad" if not extra else "MCTL_SERVER_URL") in out.stderr
    # no hidden local server was started
    assert not (tmp_path / "home" / "server.json").exists()
    assert not (tmp_path / "home" / "server.log").exists()
    status = mctl_cli("server", "status", env=env, check=False)
    assert status.returncode == 1 and "does not answer /healthz" in status.stdout
    app_list = mctl_cli("app", "list", env=env, check=False)
    assert "Could not reach the mctl control plane at http://127.0.0.1:1" in app_list.stderr


def test_a_background_server_that_does_not_start_in_time_is_stopped(isolated_home):
    from mctl.core import runner
    from mctl.exception import ConnectionError

    with pytest.raises(ConnectionError, match=r"was stopped \(pid (\d+)\)") as info:
        runner.ensure_background_server(timeout=0.01)
    import re

    pid = int(re.search(r"pid (\d+)", str(info.value)).group(1))
    assert not runner.process_alive(pid)
    assert runner.background_server() is None


def test_server_status_and_stop_with_a_profiles_server(team):
    server, env, _, _ = team
    out = mctl_cli("server", "status", env=env)
    assert f"Commands use the mctl server at {server.url}" in out.stdout
    assert "profile team-deploy" in out.stdout and "it answers /healthz" in out.stdout
    assert "manage only a local background server; none runs" in out.stdout
    out = mctl_cli("server", "stop", env=env)
    assert "No local background server is running" in out.stdout and server.url in out.stdout
    assert "No mctl server is running" not in out.stdout
    assert server.proc.poll() is None  # still serving
    out = mctl_cli("server", "start", env=env)
    assert "no local background server was started" in out.stdout
    assert not (json.loads(mctl_cli("config", "show", "--json", env=env).stdout)["server"]
                or "").endswith("server.json")


def test_a_refused_token_says_where_it_came_from_and_if_it_was_revoked(team):
    server, env, admin_env, token = team
    assert mctl_cli("app", "list", env=env).returncode == 0
    mctl_cli("token", "revoke", "team", env=admin_env)
    out = mctl_cli("app", "list", env=env, check=False)
    assert out.returncode != 0 and "This token was revoked" in out.stderr, out.stderr
    assert "came from profile team-deploy at" in out.stderr and "profile.json" in out.stderr
    assert token not in out.stderr + out.stdout
    out = mctl_cli("app", "list", env=dict(env, MCTL_TOKEN="mctl_unknown"), check=False)
    assert "Missing or invalid token" in out.stderr and "came from MCTL_TOKEN" in out.stderr
    assert "mctl_unknown" not in out.stderr


def test_token_set_checks_the_server_url(tmp_path, isolated_home):
    env = dict(os.environ, MCTL_HOME=str(tmp_path / "home"))
    out = mctl_cli("token", "set", "mctl_x", "--server", "127.0.0.1:36011", "--profile", "bad2",
                   "--activate", env=env, check=False)
    assert out.returncode != 0
    assert "The server URL '127.0.0.1:36011' (from --server) must start with http:// or " \
           "https://" in out.stderr, out.stderr
    assert not (tmp_path / "home" / "profile.json").exists()
