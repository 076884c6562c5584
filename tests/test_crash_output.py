"""What a function prints just before its process ends reaches `mctl run` and the app's logs, and
the error says how the process ended."""

import os
import subprocess
import sys

import pytest

from conftest import APPS

pytestmark = pytest.mark.integration
CRASHES = str(APPS / "crashes.py")


def mctl_cli(*args):
    return subprocess.run([sys.executable, "-m", "mctl", *args], capture_output=True, text=True,
                          timeout=120, env=os.environ)


def test_output_before_os_exit_is_shown_with_the_exit_code():
    out = mctl_cli("run", CRASHES, "--what", "crash")
    both = out.stdout + out.stderr
    assert out.returncode != 0
    assert "about to crash" in both and "on stderr too" in both, both
    assert "exited with code 3 before it finished" in both, both
    assert both.index("about to crash") < both.index("exited with code 3")


def test_exit_handler_output_reaches_mctl_run():
    out = mctl_cli("run", CRASHES, "--what", "exit")
    assert out.returncode == 0, out.stderr
    assert "hi" in out.stdout
    assert "exit handler ran" in out.stdout + out.stderr, out.stdout + out.stderr


def test_how_it_ended():
    from mctl.core.server.control import _how_it_ended

    assert _how_it_ended(3) == "exited with code 3 before it finished"
    assert _how_it_ended(-9) == ("was killed by signal 9 (SIGKILL) before it finished "
                                 "\N{EM DASH} out of memory?")
    assert _how_it_ended(-11) == "was killed by signal 11 (SIGSEGV) before it finished"
    assert _how_it_ended(None) == "crashed or was killed before it finished"


def test_old_spellings_warn_once_from_the_client_at_the_users_line():
    app_file = str(APPS / "old_spellings_run.py")
    out = mctl_cli("run", app_file)
    assert out.returncode == 0, out.stderr
    assert "listed:" in out.stdout
    lines = [line for line in out.stderr.splitlines() if "Warning" in line]
    web = [line for line in lines if "web_endpoint is deprecated" in line]
    mount = [line for line in lines if "Mount.from_local_dir is deprecated" in line]
    assert len(web) == 1 and len(mount) == 1, out.stderr
    for line in web + mount:
        assert line.startswith(app_file + ":"), line  # the user's file, not a bundle's copy
    assert "bundles" not in out.stderr and "bundles" not in out.stdout
