"""Ctrl-C while a call runs on the embedded control plane: out within a second or so, with one
line instead of a traceback through mctl's client."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import APPS

pytestmark = pytest.mark.integration


def _interrupt(argv):
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                             signal.SIG_DFL))
    assert proc.stdout.readline().strip().endswith("working")  # the call is running remotely
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)  # only to the caller, as `kill -INT` would
    out, err = proc.communicate(timeout=30)
    return time.monotonic() - start, proc.returncode, err


def test_ctrl_c_in_a_script_is_quick_and_one_line():
    took, code, err = _interrupt([sys.executable, str(APPS / "interrupted.py")])
    assert code != 0
    assert err.strip() == "Aborted (Ctrl-C); the app was stopped.", err
    assert took < 2.0, took  # ~0.5 s unloaded; the workers' drain is cut short


def test_ctrl_c_in_mctl_run_is_quick():
    took, code, err = _interrupt([sys.executable, "-m", "mctl", "run",
                                  f"{APPS / 'interrupted.py'}::slow"])
    assert code != 0
    assert "Traceback" not in err, err
    assert took < 2.0, took
