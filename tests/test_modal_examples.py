"""Common Modal apps, written as Modal's docs write them with `import mctl as modal`, run
through the CLI a user types (`mctl run`, `mctl deploy`) against a real control plane:
hello world, map/starmap/spawn, gather, retries, a parameterised class, Dict and Queue handed
to functions, FunctionCall.from_id from another process, schedules, a JSON web endpoint, and
`mctl environment list`."""

import json
import os
import subprocess
import sys
import urllib.request

import pytest

import mctl as modal
from conftest import APPS, wait_until

pytestmark = pytest.mark.integration


def mctl_cli(*args, check=True):
    out = subprocess.run([sys.executable, "-m", "mctl", *args], capture_output=True, text=True,
                         timeout=300, env=os.environ)
    if check:
        assert out.returncode == 0, f"mctl {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out


def test_mctl_run_of_common_examples(server_process):
    out = mctl_cli("run", str(APPS / "modal_examples.py"), "--n", "5").stdout
    expected = ["square(7) = 49", "local: 9", "sum of squares: 30", "starmap: [13, 17]",
                "spawned: foofoo", "gathered: ['bar', 4]", "gather raised: custom error",
                "unordered: [0, 1, 4]", "with exceptions: ['int', 'ValueError']",
                "greeting: Hi, Ada!", "retried: 3", "gave up: no luck", "queue total: 6 6"]
    for line in expected:
        assert line in out, (line, out)


def test_deployed_examples(server_process):
    mctl_cli("deploy", str(APPS / "modal_examples.py"))
    square = modal.Function.from_name("modal-examples", "square")
    call = square.spawn(9)
    code = (f"import mctl as modal; print(modal.FunctionCall.from_id({call.object_id!r})"
            ".get(timeout=60))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120, env=os.environ)
    assert other.stdout.strip() == "81", other.stderr

    greeter = modal.Cls.from_name("modal-examples", "Greeter")
    assert greeter().greet.remote("Bo") == "Hello, Bo!"
    assert greeter(greeting="Hi").greet.remote("Bo") == "Hi, Bo!"
    # The caller has no class to check against: the container checks, and says what was wrong.
    with pytest.raises(modal.exception.InvalidError, match="has no parameter volume"):
        greeter(volume=11).greet.remote("Bo")
    with pytest.raises(modal.exception.InvalidError,
                       match="parameter 'greeting' is declared str but was given int 3"):
        greeter(greeting=3).greet.remote("Bo")

    counts = modal.Dict.from_name("modal-examples-counts", create_if_missing=True)
    assert wait_until(lambda: counts.get("ticks", 0) >= 2, 30)  # the schedule fires

    url = modal.Function.from_name("modal-examples", "echo").get_web_url()
    req = urllib.request.Request(url, data=json.dumps({"x": 4}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert json.loads(resp.read()) == {"got": {"x": 4}, "squared": 16}

    envs = json.loads(mctl_cli("environment", "list", "--json").stdout)
    assert [e["name"] for e in envs] == ["main"] and envs[0]["default"]
    assert "main" in mctl_cli("environment", "list").stdout
    refused = mctl_cli("environment", "create", "staging", check=False)
    assert refused.returncode == 1 and "one environment per control plane" in refused.stderr
    mctl_cli("app", "stop", "modal-examples")


def test_script_run_with_python(isolated_home, monkeypatch):
    """`python app.py` with `with app.run():` under `__main__`, on an embedded control plane."""
    monkeypatch.delenv("MCTL_SERVER_URL", raising=False)
    out = subprocess.run([sys.executable, str(APPS / "script_style.py")], capture_output=True,
                         text=True, timeout=300, env=os.environ, cwd=str(APPS))
    assert out.returncode == 0, out.stderr
    for line in ["gen: [0, 1, 2]", "is_local here/there: True False", "aio: 8",
                 "map.aio: [2, 4]", "from_id: 10"]:
        assert line in out.stdout, (line, out.stdout)
