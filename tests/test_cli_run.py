"""`mctl run` as Modal users type it: ::NAME, ::Cls.method, -m, --detach, --help after the app,
and arguments checked locally before anything runs."""

import json
import os
import subprocess
import sys

import pytest

from conftest import APPS, ServerProcess, free_port

pytestmark = pytest.mark.integration
TARGETS = str(APPS / "cli_targets.py")


def mctl_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mctl", *args], capture_output=True, text=True,
                          timeout=120, env=os.environ, cwd=cwd)


def test_help_after_the_app_lists_the_targets_parameters():
    out = mctl_cli("run", f"{TARGETS}::main", "--help")
    assert out.returncode == 0, out.stderr
    assert "--n INT" in out.stdout and "[required]" in out.stdout
    assert "--verbose" in out.stdout and "[default: False]" in out.stdout
    out = mctl_cli("run", f"{TARGETS}::Greeter.greet", "--help")
    assert "--name STR" in out.stdout and "--shout" in out.stdout and "self" not in out.stdout
    assert "--greeting STR" in out.stdout  # the class's parameter, as in Modal's CLI
    out = mctl_cli("run", "--help")  # mctl's own help
    assert "--detach" in out.stdout and "-m PACKAGE.MODULE" in out.stdout


def test_a_missing_or_misspelled_argument_is_refused_before_anything_runs():
    out = mctl_cli("run", f"{TARGETS}::square")
    assert out.returncode == 2
    assert "Missing --x for square" in out.stderr
    out = mctl_cli("run", f"{TARGETS}::main", "--m", "3")
    assert out.returncode == 2 and "main has no parameter 'm'; it takes n, verbose" in out.stderr
    out = mctl_cli("run", f"{TARGETS}::Greeter")
    assert "Greeter is a class; run one of its methods" in out.stderr
    assert "Greeter.METHOD (greet, count)" in out.stderr
    out = mctl_cli("run", f"{TARGETS}::Greeter.wave")
    assert "Greeter has no method 'wave'; it has greet, count" in out.stderr
    out = mctl_cli("run", "-m", "no_such_pkg.mod")
    assert out.returncode == 2 and "No module named 'no_such_pkg.mod'" in out.stderr


def test_entrypoint_function_and_class_methods_run():
    out = mctl_cli("run", f"{TARGETS}::main", "--n", "4", "--verbose")
    assert out.returncode == 0, out.stderr
    assert "main got 4 True sq=16" in out.stdout
    out = mctl_cli("run", f"{TARGETS}::square", "--x", "5", "--label", "five")
    assert out.stdout.strip().splitlines()[-1] == "five=25", out.stderr
    out = mctl_cli("run", f"{TARGETS}::Greeter.greet", "--name", "ada", "--shout")
    assert out.stdout.strip().splitlines()[-1] == "HELLO ADA", out.stderr
    out = mctl_cli("run", f"{TARGETS}::Greeter.greet", "--name", "ada", "--greeting", "hi")
    assert out.stdout.strip().splitlines()[-1] == "hi ada", out.stderr
    out = mctl_cli("run", f"{TARGETS}::Greeter.count", "--n", "3")
    assert out.stdout.split() == ["0", "1", "2"], out.stderr


def test_run_a_module_with_dash_m():
    out = mctl_cli("run", "-m", "clipkg.mod", cwd=str(APPS))
    assert out.returncode == 0, out.stderr
    assert "module result: ran in a worker" in out.stdout


def test_detach_keeps_the_app_running_until_it_is_stopped(tmp_path, monkeypatch):
    srv = ServerProcess(tmp_path / "state", free_port(), dict(os.environ)).start()
    monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
    try:
        out = mctl_cli("run", "--detach", f"{TARGETS}::square", "--x", "3")
        assert out.returncode == 0, out.stderr
        assert "keeps running after this command" in out.stderr
        app_id = out.stderr.split("detached: app ", 1)[1].split()[0]
        listed = json.loads(mctl_cli("app", "list", "--json").stdout)
        mine = [a for a in listed if a["app_id"] == app_id]
        assert mine and mine[0]["mode"] == "detached" and mine[0]["state"] == "running", listed
        stopped = mctl_cli("app", "stop", app_id)
        assert stopped.returncode == 0, stopped.stderr
        listed = json.loads(mctl_cli("app", "list", "--json", "--all").stdout)
        assert [a["state"] for a in listed if a["app_id"] == app_id] == ["stopped"]
        # the hint printed for a detached app (`mctl app logs NAME`) works after the stop too
        logs = mctl_cli("app", "logs", "cli_targets")
        assert logs.returncode == 0, logs.stderr
        history = mctl_cli("app", "history", "cli_targets", "--json")
        assert json.loads(history.stdout)["app"]["app_id"] == app_id, history.stderr
        again = mctl_cli("app", "stop", "cli_targets")  # stop and rollback want a running one
        assert again.returncode == 1 and f"the newest of that name, {app_id} (detached), " \
            "is stopped" in again.stderr, again.stderr
    finally:
        srv.stop()
