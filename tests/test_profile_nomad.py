"""`mctl profile nomad NAME`: a profile's Nomad cluster for `mctl nomad force|logs`, below
NOMAD_* (as Nomad's CLI reads them) and `-o`; the token stays in the user's file."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mctl.cli.main import cli
from test_nomad_requests import Recorder

NOMAD_VARS = ("NOMAD_ADDR", "NOMAD_TOKEN", "NOMAD_NAMESPACE", "NOMAD_REGION", "NOMAD_CACERT")


@pytest.fixture
def no_nomad_env(monkeypatch):
    for key in NOMAD_VARS:
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def recorder():
    rec = Recorder()
    try:
        yield rec
    finally:
        rec.close()


def invoke(*args):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_settings_are_saved_shown_and_checked(tmp_path, isolated_home, no_nomad_env):
    token_file = tmp_path / "nomad-token"
    token_file.write_text("s3cr3t-nomad-token\n")
    assert invoke("token", "set", "mctl_test_token", "--server", "http://cp:8600", "--profile",
                  "prod")[0] == 0
    code, out = invoke("profile", "nomad", "prod", "--address", "https://nomad.prod:4646/",
                       "--namespace", "apps", "--token-file", str(token_file))
    assert code == 0, out
    assert "https://nomad.prod:4646" in out and str(token_file) in out
    saved = json.loads((isolated_home / "profile.json").read_text())["profiles"]["prod"]
    assert saved["nomad"] == {"address": "https://nomad.prod:4646", "namespace": "apps",
                              "token_file": str(token_file)}
    assert "s3cr3t" not in (isolated_home / "profile.json").read_text()
    code, out = invoke("profile", "nomad", "prod", "--region", "eu")  # adds to what is there
    assert code == 0 and "apps" in out and "eu" in out, out
    code, out = invoke("profile", "list")
    assert "nomad https://nomad.prod:4646" in out and "s3cr3t" not in out, out
    code, out = invoke("profile", "nomad", "prod")  # no option: shows them
    assert code == 0 and "namespace  apps" in out, out
    code, out = invoke("profile", "nomad", "prod", "--clear", "--region", "us")
    assert code == 0 and "apps" not in out and "us" in out, out

    code, out = invoke("profile", "nomad", "prod", "--address", "nomad.prod:4646")
    assert code != 0 and "must start with http:// or https://" in out, out
    code, out = invoke("profile", "nomad", "prod", "--token-file", str(tmp_path / "missing"))
    assert code != 0 and "no such file" in out, out
    code, out = invoke("profile", "nomad", "staging", "--address", "http://n:4646")
    assert code != 0 and "mctl token set TOKEN --server URL --profile staging" in out, out


def _force(env):
    return subprocess.run([sys.executable, "-m", "mctl", "nomad", "force", "rec", "work"],
                          capture_output=True, text=True, env=env, timeout=60)


def test_nomad_commands_use_the_active_profiles_cluster_below_nomad_variables(
        tmp_path, isolated_home, no_nomad_env, recorder):
    token_file = tmp_path / "nomad-token"
    token_file.write_text("profile-token\n")
    assert invoke("token", "set", "mctl_test_token", "--server", "http://cp:8600", "--profile",
                  "prod")[0] == 0
    assert invoke("profile", "nomad", "prod", "--address", recorder.url, "--namespace", "apps",
                  "--token-file", str(token_file))[0] == 0

    done = _force(dict(os.environ))
    assert done.returncode == 0, done.stderr
    force = [r for r in recorder.requests if r["path"].endswith("/periodic/force")]
    assert [(r["path"], r["query"].get("namespace"), r["token"]) for r in force] == [
        ("/v1/job/mctl-rec-work-schedule/periodic/force", "apps", "profile-token")]

    # Nomad's own variables win, as for Nomad's CLI; -o wins over both.
    recorder.requests.clear()
    done = _force({**os.environ, "NOMAD_NAMESPACE": "from-env", "NOMAD_TOKEN": "env-token"})
    assert done.returncode == 0, done.stderr
    force = [r for r in recorder.requests if r["path"].endswith("/periodic/force")]
    assert [(r["query"].get("namespace"), r["token"]) for r in force] == [("from-env",
                                                                         "env-token")]

    # Without the profile active, its cluster is not used.
    assert invoke("profile", "deactivate")[0] == 0
    recorder.requests.clear()
    done = _force({**os.environ, "NOMAD_ADDR": "http://127.0.0.1:9"})
    assert done.returncode != 0 and "127.0.0.1:9" in done.stderr, done.stderr
    assert not recorder.requests
