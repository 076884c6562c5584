"""`mctl app rollback` on the nomad backend: each function's job goes back to the Nomad job version
that ran the same function spec, through `PUT /v1/job/:id/revert`. No Nomad agent can run here:
the revert body is held to `api.JobRevertRequest` by tools/nomad-jobcheck, and the choice of
version is made from job versions exactly as the backend renders them."""

import sys

import pytest

from conftest import load_app
from mctl.core.compile import compile_app
from mctl.core.launch import build_launch
from mctl.core.server.control import deployed_app_id
from mctl.plugins.nomad_render import SPEC_META, render_function
from mctl.plugins.scheduler_nomad import NomadScheduler, revert_body, revert_target
from nomad_contract import check


@pytest.fixture
def backend(monkeypatch):
    for key in ("NOMAD_ADDR", "NOMAD_TOKEN", "NOMAD_NAMESPACE", "NOMAD_REGION"):
        monkeypatch.delenv(key, raising=False)
    return NomadScheduler({"namespace": "ml"})


def service_job(backend, version, timeout=None):
    """The service job the backend registers for function `plain` at app `version`."""
    _, app = load_app("nomad_images")
    app_id = deployed_app_id(app.name)
    spec, _ = compile_app(app, app_id, app.name)
    fspec = spec.functions["plain"]
    if timeout is not None:
        fspec = fspec.model_copy(update={"timeout": timeout})
    launch = build_launch(app_id, spec, fspec, version, server_url="http://cp:8600",
                          built_image={"python": sys.executable}, task_token=f"tok-{version}",
                          environment="main", region="global", provider="nomad")
    return render_function(launch, fspec, backend.render, None,
                           version_from_variable=True)[0]["Job"]


def as_nomad_version(job, version, count=None):
    """The job as `GET /v1/job/:id/versions` lists it: with Nomad's Version (and the count the
    scale API gave it)."""
    job = {**job, "Version": version, "Stop": False}
    if count is not None:
        job["TaskGroups"] = [{**job["TaskGroups"][0], "Count": count}]
    return job


def test_an_unchanged_function_renders_the_same_job_at_every_app_version(backend):
    v1, v2 = service_job(backend, 1), service_job(backend, 2)
    assert v1["Meta"][SPEC_META] == v2["Meta"][SPEC_META]
    assert v1["Meta"]["mctl.version"] == "1" and v2["Meta"]["mctl.version"] == "2"
    assert service_job(backend, 3, timeout=77)["Meta"][SPEC_META] != v1["Meta"][SPEC_META]


def test_rollback_reverts_to_the_job_version_that_ran_the_same_spec(backend):
    old, new = service_job(backend, 1), service_job(backend, 2, timeout=77)
    versions = {"Versions": [as_nomad_version(new, 3, count=4),  # v2 of the app, scaled to 4
                             as_nomad_version(new, 2),
                             as_nomad_version(old, 1, count=2),
                             as_nomad_version(old, 0)],
                "Diffs": None}
    rollback = service_job(backend, 3)  # app v3 = `mctl app rollback` to v1's spec
    assert revert_target(versions, rollback["Meta"][SPEC_META]) == (1, 3)
    body = revert_body(rollback["ID"], 1, 3)
    assert body == {"JobID": "mctl-nomad-images-plain", "JobVersion": 1,
                    "EnforcePriorVersion": 3}
    done = check([body], "revert")
    assert done.returncode == 0, done.stdout
    # a redeploy of the spec that runs now, a new spec, or a new job: a plain register
    assert revert_target(versions, new["Meta"][SPEC_META]) is None
    assert revert_target(versions, service_job(backend, 4, timeout=5)["Meta"][SPEC_META]) is None
    assert revert_target(None, rollback["Meta"][SPEC_META]) is None
    # a job the app's stop deregistered: the same spec runs again by reverting to it
    stopped = {"Versions": [{**as_nomad_version(old, 5), "Stop": True}, as_nomad_version(old, 4)]}
    assert revert_target(stopped, old["Meta"][SPEC_META]) == (4, 5)


def test_the_checker_refuses_a_revert_nomad_would_refuse(backend):
    assert "can't revert to the current version" in check(
        [revert_body("mctl-a-f", 3, 3)], "revert").stdout
    unforced = revert_body("mctl-a-f", 1, 3)
    del unforced["EnforcePriorVersion"]
    assert check([unforced], "revert").returncode == 1
    misspelled = {**revert_body("mctl-a-f", 1, 3), "Version": 1}
    assert 'unknown field "Version"' in check([misspelled], "revert").stdout
