"""What a new user meets first: a script in Modal's docs' shape, errors in their own code, the
background server, and commands that exit cleanly."""

import json
import os
import subprocess
import sys

import pytest

from conftest import APPS
from mctl.core.runner import process_alive

pytestmark = pytest.mark.integration


def python(*args, cwd=None, check=True):
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                         env=os.environ, cwd=cwd)
    if check and out.returncode != 0:
        raise AssertionError(f"python {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out


def mctl_cli(*args, check=True):
    return python("-m", "mctl", *args, check=check)


def assert_no_unclosed_warnings(out):
    # -X dev shows every ResourceWarning and asyncio misuse that a user could otherwise meet
    assert "Unclosed" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr


def test_unnamed_app_with_module_level_run(tmp_path, monkeypatch):
    """`app = mctl.App()` and `with app.run():` at module level, run with `python file.py`: the
    worker imports the same file without starting an app or running the script after the
    block, and the caller gets the results."""
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("MARK_DIR", str(marks))
    out = python("-X", "dev", str(APPS / "unnamed_script.py"))
    assert "square: 49" in out.stdout
    assert "app name: unnamed_script" in out.stdout
    assert out.stdout.count("after the block: 40") == 1
    assert sorted(os.listdir(marks)) == ["local"]  # the worker stopped at `app.run()`
    assert_no_unclosed_warnings(out)


def broken_app(tmp_path, name, source, command="run"):
    """Write `source` to `name` and run `mctl COMMAND` on it: it must fail; returns its stderr."""
    path = tmp_path / name
    path.write_text(source)
    out = mctl_cli(command, str(path), check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    return out.stderr


def test_syntax_error_shows_file_line_and_message(tmp_path):
    source = "import mctl\napp = mctl.App('bad')\n\n@app.function()\ndef f(:\n    pass\n"
    for command in ("run", "deploy"):
        err = broken_app(tmp_path, "bad.py", source, command)
        assert f'File "{tmp_path / "bad.py"}", line 5' in err and "SyntaxError" in err
        assert "Traceback" not in err and "click" not in err
        assert len(err.splitlines()) <= 6, err


def test_name_error_at_import_shows_the_users_frames_only(tmp_path):
    err = broken_app(tmp_path, "typo.py", "import mctl\napp = mctl.App('typo')\n\n"
                     "def setup():\n    return cofnig\n\nsetup()\n")
    assert "NameError: name 'cofnig' is not defined" in err
    frames = [line for line in err.splitlines() if line.strip().startswith("File ")]
    path = tmp_path / "typo.py"
    assert frames == [f'  File "{path}", line 7, in <module>',
                      f'  File "{path}", line 5, in setup'], err


def test_refused_declaration_names_the_line(tmp_path):
    err = broken_app(tmp_path, "limits.py", "import mctl\napp = mctl.App('limits')\n\n"
                     "@app.function(timeout=0)\ndef f():\n    pass\n")
    assert f"{tmp_path / 'limits.py'}:4: @app.function: timeout=0 must be between 1 second" in err


def test_remote_exception_shows_the_users_frames():
    out = mctl_cli("run", str(APPS / "errors.py"), check=False)
    assert out.returncode == 1
    err = out.stderr
    assert "ValueError: expected a positive number, got -3" in err
    # the worker's frames: the user's function and its helper, with lines, and none of mctl's
    assert 'errors.py", line 16, in reciprocal' in err
    assert 'errors.py", line 10, in check_positive' in err
    assert "mctl/core" not in err and "mctl/sdk" not in err and "click" not in err, err
    # then the caller's line
    assert f'File "{APPS / "errors.py"}", line 21, in main' in err
    assert_no_unclosed_warnings(out)


def test_background_server_status_and_stop(isolated_home, tmp_path):
    out = mctl_cli("server", "status", check=False)
    assert out.returncode == 1 and "No mctl server is running" in out.stdout

    deployed = python("-X", "dev", "-m", "mctl", "deploy", str(APPS / "scheduled.py"))
    assert "Deployed app scheduled" in deployed.stdout
    assert_no_unclosed_warnings(deployed)
    listed = python("-X", "dev", "-m", "mctl", "app", "list")
    assert "scheduled" in listed.stdout
    assert_no_unclosed_warnings(listed)
    script = tmp_path / "call.py"
    script.write_text("import mctl\nprint(mctl.Function.from_name('scheduled', 'version')"
                      ".remote())\n")
    called = python("-X", "dev", str(script))
    assert called.stdout.strip() == "v1"
    assert_no_unclosed_warnings(called)

    status = mctl_cli("server", "status")
    record = json.loads((isolated_home / "server.json").read_text())
    assert f"mctl server running at {record['url']} (pid {record['pid']}, up 00:00:" \
        in status.stdout

    stopped = mctl_cli("server", "stop")
    assert f"Stopped the mctl server at {record['url']}" in stopped.stdout
    assert not process_alive(record["pid"])
    assert "No mctl server is running" in mctl_cli("server", "status", check=False).stdout
    assert "nothing to stop" in mctl_cli("server", "stop").stdout

    # Started again, it listens where it did: printed web URLs and saved profiles keep working.
    started = mctl_cli("server", "start")
    assert f"running at {record['url']}" in started.stdout, started.stdout
    mctl_cli("server", "stop")


def test_read_only_commands_with_no_server_start_none(isolated_home):
    """With no server running, `sandbox list`/`app list`/`container list` say nothing runs (they
    used to fail), commands on one running thing say no server runs, and none of them starts a
    server (`sandbox exec sb-x` did, only to say there was no such sandbox)."""
    for args, empty in ((("app", "list"), "No apps are running"),
                        (("container", "list"), "No containers are running"),
                        (("sandbox", "list"), "No sandboxes are running")):
        out = mctl_cli(*args)
        assert empty in out.stdout and "no mctl server is running" in out.stdout, out.stdout
        assert json.loads(mctl_cli(*args, "--json").stdout) == []
    for args in (("sandbox", "exec", "sb-x", "--", "ls"), ("sandbox", "logs", "sb-x"),
                 ("container", "exec", "ta-x", "--", "ls"), ("app", "logs", "nope")):
        out = mctl_cli(*args, check=False)
        assert out.returncode == 1 and "No mctl server is running" in out.stderr, \
            (args, out.stdout + out.stderr)
    assert not (isolated_home / "server.json").exists()  # none was started
