"""Error messages name the user's function and file, and keep what the remote code said."""

import os
import subprocess
import sys

import pytest

from conftest import APPS

pytestmark = pytest.mark.integration
APP = str(APPS / "error_messages.py")


def line_of(code):
    with open(APP) as f:
        return next(i for i, line in enumerate(f, 1) if line.strip() == code)


def run(what):
    out = subprocess.run([sys.executable, "-m", "mctl", "run", APP, "--what", what],
                         capture_output=True, text=True, timeout=120, env=os.environ)
    return out, out.stdout + out.stderr


def test_unpicklable_result_names_the_function_and_what_to_do():
    out, both = run("lock")
    assert out.returncode != 0
    assert "The result of returns_lock (lock) cannot be pickled: cannot pickle '_thread.lock'" \
        in both, both
    assert "Return plain data" in both


def test_exception_that_cannot_be_rebuilt_keeps_its_type_and_message():
    out, both = run("needs_two")
    assert out.returncode == 0, both
    assert "caught RemoteError: NeedsTwo: weird failure (the remote exception could not be " \
           "rebuilt here" in both, both


def test_remote_traceback_reads_as_one_traceback_of_the_users_frames():
    out, both = run("key")
    assert out.returncode != 0
    assert "RemoteTraceback" not in both and "mctl.core" not in both, both
    lines = out.stderr.splitlines()
    lines = lines[lines.index("Traceback (most recent call last):"):]
    frames = [line.strip() for line in lines if line.startswith("  File ")]
    call, ret, sub = (line_of("raises_key_error.remote(1)"),
                      line_of('return helper({"x": x})'), line_of('return d["missing"]'))
    assert frames == [f'File "{APP}", line {call}, in main',
                      f'File "{APP}", line {ret}, in raises_key_error',
                      f'File "{APP}", line {sub}, in helper'], both
    assert lines[-1] == "KeyError: 'missing'"


def test_web_endpoint_error_logs_the_users_frames_only():
    out, both = run("web")
    assert "status 500" in both, both
    assert "ZeroDivisionError: division by zero" in both
    assert f'File "{APP}", line {line_of("return 1 / x")}, in divide' in both, both
    assert "bundles" not in both and "starlette" not in both and "fastapi/" not in both, both
    tb = out.stderr[out.stderr.index("Traceback (most recent call last):"):]  # printed to stderr
    tb = tb[:tb.index("ZeroDivisionError")]
    assert len(tb.splitlines()) == 4, tb  # the header, one frame (file, code, markers)
