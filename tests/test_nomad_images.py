"""Functions with container images on Nomad: the `docker` (or `podman`) driver with the image the
`oci` builder made, mctl's worker inside, registry credentials from Vault at start. No Nomad
agent can run here: each job is held to Nomad's API types and the drivers' config specs by
tools/nomad-jobcheck."""

import json
import sys

import pytest

from conftest import load_app
from mctl.core.compile import compile_app
from mctl.core.launch import build_launch
from mctl.core.server.control import deployed_app_id
from mctl.exception import InvalidError
from mctl.plugins.containers import BOOT, host_python_dirs
from mctl.plugins.nomad_render import NomadOptions, render_app, render_function
from mctl.plugins.scheduler_nomad import NomadScheduler, image_ref, register_body
from nomad_contract import check

REF = "registry.example.internal:5000/mctl/im-abc:0123456789abcdef"


def oci_launch(ref=REF, runtime="oci"):
    _, app = load_app("nomad_images")
    app_id = deployed_app_id(app.name)
    spec, _ = compile_app(app, app_id, app.name)
    fspec = spec.functions["from_builder"]
    built = {"python": "python3", "env": {"MODE": "prod"}, "image": ref, "runtime": runtime}
    return build_launch(app_id, spec, fspec, 2, server_url="https://mctl.internal:8600",
                        built_image=built, task_token="tok", environment="main", region="global",
                        provider="nomad")


def worker_task(doc):
    return doc["Job"]["TaskGroups"][0]["Tasks"][0]


@pytest.fixture
def nomad_env(monkeypatch):
    for key in ("NOMAD_ADDR", "NOMAD_TOKEN", "NOMAD_NAMESPACE", "NOMAD_REGION",
                "MCTL_IMAGE_REGISTRY"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


@pytest.mark.parametrize("driver", ["docker", "podman"])
def test_an_oci_image_runs_in_a_container_driver_with_mctls_worker_inside(nomad_env, driver):
    options = {"driver": driver} if driver == "podman" else {}
    backend = NomadScheduler({**options, "image_registry_secret": "regcred"})
    launch = oci_launch()
    docs = [register_body(d, backend.conn)
            for d in render_function(launch, launch.spec, backend.render, image_ref(launch))]
    done = check(docs)
    assert done.returncode == 0, done.stdout
    task = worker_task(docs[0])
    config = task["Config"]
    assert task["Driver"] == driver and config["image"] == REF
    # the image's Python runs mctl's worker from the node's mctl environment, bound read-only
    dirs = host_python_dirs()
    assert config["command"] == "python3" and config["args"] == ["-c", BOOT]
    assert config["volumes"] == [f"{d}:{d}:ro" for d in dirs]
    assert json.loads(task["Env"]["MCTL_HOST_SITE"]) == dirs
    assert task["Env"]["MODE"] == "prod"  # the image's env
    # registry credentials: interpolated from a Vault template at start, never in the job
    assert config["auth"] == [{"username": "${REGISTRY_USERNAME}",
                               "password": "${REGISTRY_PASSWORD}"}]
    templates = [t["EmbeddedTmpl"] for t in task["Templates"]]
    assert any('secret "secret/data/mctl/regcred"' in t for t in templates)
    assert task["Vault"]["Role"] == "mctl-nomad-images"


def test_mctl_from_the_image_and_no_credentials(nomad_env):
    backend = NomadScheduler({"mctl_source": "image"})
    launch = oci_launch()
    docs = render_function(launch, launch.spec, backend.render, image_ref(launch))
    assert check(docs).returncode == 0
    config = worker_task(docs[0])["Config"]
    assert config == {"image": REF, "command": "python3", "args": ["-m", "mctl.core.runtime"]}
    assert "Vault" not in worker_task(docs[0])


def test_an_image_only_on_the_control_planes_host_is_refused(nomad_env):
    launch = oci_launch(ref="localhost/mctl/im-abc:latest")
    with pytest.raises(InvalidError, match="Set MCTL_IMAGE_REGISTRY"):
        image_ref(launch)
    assert image_ref(oci_launch(ref=sys.executable, runtime="venv")) is None


def test_render_names_the_registry_images_and_their_secret(nomad_env):
    nomad_env.setenv("MCTL_IMAGE_REGISTRY", "registry.example.internal:5000/")
    _, app = load_app("nomad_images")
    app_id = deployed_app_id(app.name)
    spec, _ = compile_app(app, app_id, app.name)
    jobs = render_app(spec, app_id, NomadOptions.parse({}))
    done = check(jobs)
    assert done.returncode == 0, done.stdout
    by_id = {d["Job"]["ID"]: d for d in jobs}
    private = worker_task(by_id["mctl-nomad-images-from-private"])
    assert private["Config"]["image"] == "registry.example.internal:5000/team/tools:1"
    assert private["Config"]["auth"][0]["password"] == "${REGISTRY_PASSWORD}"
    trigger = worker_task(by_id["mctl-nomad-images-from-private-schedule"])
    assert trigger["Config"]["image"] == private["Config"]["image"] and "auth" in trigger["Config"]
    built = worker_task(by_id["mctl-nomad-images-from-builder"])
    image_id = spec.functions["from_builder"].image_id
    assert built["Config"]["image"] == f"registry.example.internal:5000/mctl/{image_id}:latest"
    assert "auth" not in built["Config"]
    assert worker_task(by_id["mctl-nomad-images-plain"])["Driver"] == "raw_exec"


def test_the_checker_refuses_a_config_key_the_driver_does_not_know(nomad_env):
    launch = oci_launch()
    doc = render_function(launch, launch.spec, NomadOptions(), image_ref(launch))[0]
    worker_task(doc)["Config"]["imagee"] = REF
    done = check([doc])
    assert done.returncode == 1 and 'the docker driver has no config "imagee"' in done.stdout
    worker_task(doc)["Config"].pop("imagee")
    worker_task(doc)["Config"]["auth"] = [{"user": "x"}]
    assert 'docker config "auth" is not a block' in check([doc]).stdout


def test_hcl_writes_the_registry_auth_as_a_block(nomad_env):
    from mctl.plugins.nomad_hcl import to_hcl

    launch = oci_launch()
    doc = render_function(launch, launch.spec, NomadOptions(), image_ref(launch), "regcred")[0]
    hcl = to_hcl(doc)
    lines = [line.strip() for line in hcl.splitlines()]
    at = lines.index("auth {")
    assert lines[at + 1:at + 4] == ['username = "${REGISTRY_USERNAME}"',
                                    'password = "${REGISTRY_PASSWORD}"', "}"]
