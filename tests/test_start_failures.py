"""A function whose workers cannot start fails its callers with the start error, fast."""

import json
import time

import pytest

import mctl
from conftest import load_app
from test_deploy import mctl_cli

pytestmark = pytest.mark.integration


def test_import_error_fails_callers_and_redeploy_clears_it(server_process, isolated_home):
    from mctl.core.runner import deploy_app

    _, app = load_app("startfail")
    deploy_app(app)
    f = mctl.Function.from_name("startfail", "f")
    start = time.monotonic()
    with pytest.raises(ModuleNotFoundError, match="no_such_module_for_mctl_tests") as info:
        f.remote(1)
    assert time.monotonic() - start < 30
    import traceback

    remote_tb = "".join(traceback.format_exception(info.value))
    assert "startfail.py" in remote_tb  # the user's frame is in the remote traceback

    # once failing, a new call fails at once instead of waiting for a worker
    start = time.monotonic()
    with pytest.raises(ModuleNotFoundError):
        f.remote(2)
    assert time.monotonic() - start < 5

    listing = mctl_cli("app", "list").stdout
    assert "failing" in listing and "f: Function f failed to start 3 times" in listing
    apps = json.loads(mctl_cli("app", "list", "--json").stdout)
    assert list(apps[0]["failing"]) == ["f"]
    logs = mctl_cli("app", "logs", "startfail").stdout
    assert logs.count("failed to start 3 times in a row") == 1  # said once, not in a loop

    (isolated_home / "fixed").write_text("")
    deploy_app(app)  # a new version clears the failure
    assert f.remote(1) == 2
    assert json.loads(mctl_cli("app", "list", "--json").stdout)[0]["failing"] == {}


def test_worker_dying_before_hello_fails_callers_with_its_output(server_process, isolated_home):
    from mctl.core.runner import deploy_app

    (isolated_home).mkdir(parents=True, exist_ok=True)
    (isolated_home / "die-hard").write_text("")
    _, app = load_app("startfail")
    deploy_app(app)
    with pytest.raises(mctl.exception.ExecutionError,
                       match="exited with code 7 before it connected"):
        mctl.Function.from_name("startfail", "f").remote(1)
