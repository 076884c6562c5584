"""The nomad scheduler backend. No Nomad agent can run here (see docs/guide.md): what it sends is
held to Nomad's own API types by tools/nomad-jobcheck, and its errors are checked where they can
be produced for real (an address where nothing listens)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import free_port, load_app
from mctl.core.compile import compile_app
from mctl.core.launch import build_launch
from mctl.core.server.control import deployed_app_id
from mctl.exception import InvalidError
from mctl.plugins.nomad_render import render_function
from mctl.plugins.scheduler_nomad import (NomadScheduler, image_ref, register_body, scale_body,
                                          variable_body)
from nomad_contract import check

TOKEN = "mctl_task_secret_token_value"


def launches(image=None):
    _, app = load_app("nomad_features")
    app_id = deployed_app_id(app.name)
    spec, _ = compile_app(app, app_id, app.name)
    built = {"python": sys.executable, "env": {}, "image": image,
             "runtime": "oci" if image else "process"}
    return [build_launch(app_id, spec, fspec, 3, server_url="https://mctl.internal:8600",
                         built_image=built, task_token=TOKEN, environment="main",
                         region="eu", provider="nomad")
            for fspec in spec.functions.values()]


@pytest.fixture
def nomad_env(monkeypatch):
    for key in ("NOMAD_ADDR", "NOMAD_TOKEN", "NOMAD_NAMESPACE", "NOMAD_REGION", "NOMAD_CACERT"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


@pytest.mark.parametrize("image", [None, "registry.internal/mctl:im-1"])
def test_every_body_the_backend_sends_passes_nomads_types(nomad_env, image):
    nomad_env.setenv("NOMAD_NAMESPACE", "ml")
    nomad_env.setenv("NOMAD_REGION", "eu")
    backend = NomadScheduler({"datacenters": "dc1"})
    jobs, scales, variables = [], [], []
    for launch in launches(image):
        for doc in render_function(launch, launch.spec, backend.render, image_ref(launch),
                                   version_from_variable=True):
            jobs.append(register_body(doc, backend.conn))
            variables.append(variable_body(doc["Job"]["ID"], TOKEN, backend.conn, 3))
        scales.append(scale_body(jobs[-1]["Job"]["ID"], 4, launch))
    for docs, kind in ((jobs, "job"), (scales, "scale"), (variables, "variable")):
        done = check(docs, kind)
        assert done.returncode == 0, (kind, done.stdout)
    assert all(j["Namespace"] == "ml" and j["Job"]["Namespace"] == "ml" for j in jobs)
    assert all(j["Job"]["Region"] == "eu" for j in jobs)
    # the task token travels only in the job's Nomad Variable, never in the job
    assert TOKEN not in json.dumps(jobs)
    assert variables[0]["Items"] == {"task_token": TOKEN, "app_version": "3"}
    # the app version too: the job is the same at every version of an unchanged function
    task = jobs[0]["Job"]["TaskGroups"][0]["Tasks"][0]
    assert "MCTL_APP_VERSION" not in task["Env"]
    assert "MCTL_APP_VERSION={{ .app_version }}" in task["Templates"][0]["EmbeddedTmpl"]
    drivers = {j["Job"]["TaskGroups"][0]["Tasks"][0]["Driver"] for j in jobs}
    assert drivers == ({"docker"} if image else {"raw_exec"})
    if image is None:  # a Python environment: the interpreter the builder chose
        task = jobs[0]["Job"]["TaskGroups"][0]["Tasks"][0]
        assert task["Config"]["command"] == sys.executable


def test_connection_settings_come_from_nomads_variables(nomad_env, tmp_path):
    nomad_env.setenv("NOMAD_ADDR", "https://nomad.internal:4646/")
    nomad_env.setenv("NOMAD_TOKEN", "secret-id")
    nomad_env.setenv("NOMAD_NAMESPACE", "team-a")
    backend = NomadScheduler({})
    assert backend.conn.address == "https://nomad.internal:4646"
    assert backend.conn.token == "secret-id"
    assert backend.render.namespace == "team-a"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    explicit = NomadScheduler({"namespace": "team-b", "token_file": str(token_file)})
    assert explicit.render.namespace == "team-b" and explicit.conn.token == "from-file"
    with pytest.raises(InvalidError, match="has no option"):
        NomadScheduler({"adress": "http://x"})


def test_permission_denied_names_the_token_setting(nomad_env):
    message = NomadScheduler({}).api._denied("PUT /v1/jobs", "Permission denied")
    assert "no ACL token was sent" in message and "Set NOMAD_TOKEN" in message
    nomad_env.setenv("NOMAD_TOKEN", "t")
    message = NomadScheduler({}).api._denied("PUT /v1/jobs", "Permission denied")
    assert "NOMAD_TOKEN needs the submit-job" in message


@pytest.mark.integration
def test_server_with_unreachable_nomad_stops_with_one_line(tmp_path):
    port = free_port()  # nothing listens there
    env = {**os.environ, "NOMAD_ADDR": f"http://127.0.0.1:{port}", "MCTL_HOME": str(tmp_path)}
    env.pop("NOMAD_TOKEN", None)
    done = subprocess.run([sys.executable, "-m", "mctl", "server", "--scheduler", "nomad",
                           "--port", "0", "--state-dir", str(tmp_path / "state")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, done.stderr
    assert f"Nomad is unreachable at http://127.0.0.1:{port}" in errors[0]
    assert "Set NOMAD_ADDR" in errors[0]
    assert "Traceback" not in done.stderr and "Unclosed" not in done.stderr


@pytest.mark.integration
def test_periodic_jobs_command_spawns_one_call_on_a_real_control_plane(tmp_path, server_process,
                                                                      monkeypatch):
    """What Nomad would run at each cron time, run here as a process: one call of the function
    reaches the deployed app and runs on its (local) workers."""
    from conftest import APPS
    from mctl.plugins.nomad_render import NomadOptions, render_app

    tick_file = tmp_path / "ticks"
    monkeypatch.setenv("TICK_FILE", str(tick_file))
    deployed = subprocess.run([sys.executable, "-m", "mctl", "deploy",
                               str(APPS / "nomad_trigger.py")],
                              capture_output=True, text=True, timeout=120)
    assert deployed.returncode == 0, deployed.stderr
    _, app = load_app("nomad_trigger")
    app_id = deployed_app_id(app.name)
    spec, _ = compile_app(app, app_id, app.name)
    jobs = render_app(spec, app_id, NomadOptions.parse({"server_url": server_process.url}))
    periodic = [d["Job"] for d in jobs if "Periodic" in d["Job"]]
    assert [j["ID"] for j in periodic] == ["mctl-nomad-trigger-nightly-schedule"]
    task = periodic[0]["TaskGroups"][0]["Tasks"][0]
    env = {**os.environ, **task["Env"]}  # MCTL_HOME's token stands in for the task token
    done = subprocess.run([sys.executable, *task["Config"]["args"]], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    from conftest import wait_until

    assert wait_until(lambda: tick_file.exists() and tick_file.read_text() == "fired\n")


def test_python_nomads_errors_become_one_line_that_says_what_to_set(nomad_env):
    """How NomadAPI reads python-nomad's exceptions (made here from requests' own Response
    objects; no server answers them)."""
    import asyncio

    import requests
    from nomad.api import exceptions

    from mctl.plugins.nomad_api import NomadError

    def answer(status, text):
        response = requests.Response()
        response.status_code, response._content = status, text.encode()
        return response

    def raising(exc):
        def call(_client):
            raise exc
        return call

    api = NomadScheduler({}).api
    cases = [
        (exceptions.URLNotAuthorizedNomadException(answer(403, "Permission denied")),
         "no ACL token was sent. Set NOMAD_TOKEN"),
        (exceptions.BadRequestNomadException(answer(400, "1 error occurred: bad group")),
         "Nomad answered 400 to POST /v1/job/x: 1 error occurred: bad group"),
        (exceptions.BaseNomadException(requests.exceptions.ConnectionError(
            "HTTPConnectionPool: Max retries exceeded ([Errno 111] Connection refused)")),
         "Nomad is unreachable at http://127.0.0.1:4646 (connection refused). Set NOMAD_ADDR"),
    ]
    for exc, message in cases:
        with pytest.raises(NomadError) as info:
            asyncio.run(api._call("POST /v1/job/x", raising(exc)))
        assert message in str(info.value) and "\n" not in str(info.value)
    missing = exceptions.URLNotFoundNomadException(answer(404, "job not found"))
    assert asyncio.run(api._call("GET /v1/job/x", raising(missing), missing_ok=True)) is None


def test_bad_connection_options_say_what_to_write(nomad_env, tmp_path):
    with pytest.raises(InvalidError, match="poll_interval='soon' is not a positive number"):
        NomadScheduler({"poll_interval": "soon"})
    with pytest.raises(InvalidError, match="request_timeout='0' is not a positive number"):
        NomadScheduler({"request_timeout": "0"})
    with pytest.raises(InvalidError, match="token_file=.* cannot be read"):
        NomadScheduler({"token_file": str(tmp_path / "missing")})
