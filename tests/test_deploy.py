"""`mctl deploy` and the `mctl app` commands against a real background server."""

import json
import os
import subprocess
import sys

import pytest

import mctl
from conftest import APPS, wait_until

pytestmark = pytest.mark.integration


def mctl_cli(*args, env=None, check=True):
    out = subprocess.run([sys.executable, "-m", "mctl", *args], capture_output=True, text=True,
                         env=env or os.environ, timeout=120)
    if check and out.returncode != 0:
        raise AssertionError(f"mctl {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out


def test_deploy_lifecycle(tmp_path, server_process, monkeypatch):
    tick_file = tmp_path / "ticks"
    monkeypatch.setenv("TICK_FILE", str(tick_file))
    env = dict(os.environ, APP_VERSION="v1")
    out = mctl_cli("deploy", str(APPS / "scheduled.py"), env=env)
    assert "Deployed app scheduled" in out.stdout and "version 1" in out.stdout

    version = mctl.Function.from_name("scheduled", "version")
    assert version.remote() == "v1"
    Greeter = mctl.Cls.from_name("scheduled", "Greeter")
    assert Greeter(name="ops").greet.remote() == "hello ops from v1"

    # the Period(seconds=1) schedule fires inside the server
    assert wait_until(lambda: tick_file.exists() and tick_file.read_text().count("tick") >= 2)

    mctl_cli("deploy", str(APPS / "scheduled.py"), env=dict(env, APP_VERSION="v2"))
    assert wait_until(lambda: version.remote() == "v2")

    apps = json.loads(mctl_cli("app", "list", "--json").stdout)
    assert [(a["name"], a["state"], a["version"]) for a in apps] == [("scheduled", "running", 2)]
    history = mctl_cli("app", "history", "scheduled").stdout
    assert "v1" in history and "*v2" in history

    out = mctl_cli("app", "rollback", "scheduled")
    assert "back to v1; now at v3" in out.stdout
    assert wait_until(lambda: version.remote() == "v1")

    logs = mctl_cli("app", "logs", "scheduled").stdout
    assert "ticked" in logs

    mctl_cli("app", "stop", "scheduled")
    apps = json.loads(mctl_cli("app", "list", "--json").stdout)
    assert apps[0]["state"] == "stopped"
    with pytest.raises(mctl.exception.NotFoundError, match="No running app"):
        mctl.Function.from_name("scheduled", "version").remote()


def test_rollback_errors_keep_state(server_process):
    mctl_cli("deploy", str(APPS / "scheduled.py"), env=dict(os.environ, TICK_FILE="/dev/null"))
    out = mctl_cli("app", "rollback", "scheduled", "7", check=False)
    assert out.returncode != 0 and "no version 7 to roll back to" in out.stderr
    out = mctl_cli("app", "rollback", "nope", check=False)
    assert "No app named 'nope'" in out.stderr
    history = json.loads(mctl_cli("app", "history", "scheduled", "--json").stdout)
    assert [v["version"] for v in history["versions"]] == [1]


def test_deploy_with_missing_secret_stores_nothing(server_process, tmp_path):
    app_file = tmp_path / "needs_secret.py"
    app_file.write_text(
        "import mctl\napp = mctl.App('needs-secret')\n"
        "@app.function(secrets=[mctl.Secret.from_name('absent')])\ndef f():\n    return 1\n")
    out = mctl_cli("deploy", str(app_file), check=False)
    assert out.returncode != 0
    assert "Secret 'absent'" in out.stderr and "mctl secret create absent" in out.stderr
    assert json.loads(mctl_cli("app", "list", "--json").stdout) == []


def test_secret_from_local_store(server_process, tmp_path):
    mctl_cli("secret", "create", "db", "PASSWORD=hunter2")
    app_file = tmp_path / "uses_secret.py"
    app_file.write_text(
        "import os, mctl\napp = mctl.App('uses-secret')\n"
        "@app.function(secrets=[mctl.Secret.from_name('db', required_keys=['PASSWORD'])])\n"
        "def f():\n    return os.environ['PASSWORD']\n")
    mctl_cli("deploy", str(app_file))
    assert mctl.Function.from_name("uses-secret", "f").remote() == "hunter2"


def test_mctl_run_example_prints_results():
    out = mctl_cli("run", str(APPS.parent.parent / "examples" / "hello.py"))
    assert "remote: 49" in out.stdout
    assert "map: [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]" in out.stdout
    assert "spawn: hello, mctl" in out.stdout


def test_mctl_run_entrypoint_args_and_errors(tmp_path):
    out = mctl_cli("run", str(APPS.parent.parent / "examples" / "hello.py"), "--n", "3")
    assert "map: [0, 1, 4]" in out.stdout
    out = mctl_cli("run", str(tmp_path / "missing.py"), check=False)
    assert out.returncode != 0 and "No such file" in out.stderr


def test_metrics_endpoint(server_process):
    from mctl.core.transport import urlopen

    mctl_cli("deploy", str(APPS / "scheduled.py"), env=dict(os.environ, TICK_FILE="/dev/null"))
    assert mctl.Function.from_name("scheduled", "version").remote() == "v1"
    body = urlopen(f"{server_process.url}/metrics").read().decode()
    assert 'mctl_inputs_finished_total{app="' in body
    assert "mctl_queue_depth" in body and "mctl_containers" in body


def test_local_modules_travel_with_the_app(tmp_path):
    """Helper modules and packages beside the app file are bundled for the workers."""
    out = mctl_cli("run", str(APPS / "multifile" / "multi.py::compute"), "--x", "3")
    assert "(6, 9)" in out.stdout


def test_bundle_is_deterministic_and_holds_local_modules():
    import io
    import zipfile

    from mctl.cli.main import import_app_file
    from mctl.core.compile import make_bundle

    _, app, _ = import_app_file(str(APPS / "multifile" / "multi.py"))
    module, data = make_bundle(app)
    assert module == "multi"
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert names == ["helpers.py", "multi.py", "shapes/__init__.py", "shapes/area.py"]
    assert make_bundle(app)[1] == data


def test_deployed_generator_looked_up_by_name(server_process):
    mctl_cli("deploy", str(APPS / "basic.py"))
    assert list(mctl.Function.from_name("basic", "gen").remote_gen(3)) == [0, 10, 20]
    with pytest.raises(mctl.exception.InvalidError, match="is a generator"):
        mctl.Function.from_name("basic", "gen").remote(3)  # not silently its first value
