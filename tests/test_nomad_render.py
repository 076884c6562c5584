"""Nomad jobs rendered from apps, checked against Nomad's own API types (tools/nomad-jobcheck).

No Nomad agent can run here: these tests hold the contract instead — every job mctl would submit
decodes strictly into `api.JobRegisterRequest`, survives `Canonicalize()` and passes the checks
Nomad's server applies."""

import copy
import json

import pytest

from conftest import load_app
from mctl.core.compile import compile_app
from mctl.core.server.control import deployed_app_id
from mctl.exception import InvalidError
from mctl.plugins.nomad_render import NS, NomadOptions, job_id, render_app
from nomad_contract import check

OPTION_SETS = [
    {},
    {"driver": "podman", "image_registry": "registry.example.internal:5000",
     "default_image": "registry.example.internal:5000/mctl:base",
     "volume_type": "csi", "autoscaler": "nomad", "namespace": "ml", "region": "eu",
     "datacenters": "dc1,dc2", "node_pool": "gpu",
     "constraints": "${attr.kernel.name} = linux; ${meta.rack} != r9",
     "function.train.gpu_fallback": "H100,L40S", "function.plain.datacenters": "edge",
     "function.plain.driver": "exec", "prometheus_job": 'job="mctl"'},
    {"driver": "raw_exec", "secrets_from": "control-plane", "default_max_containers": "3",
     "cpu_mhz_per_core": "2400", "default_memory_mb": "256"},
]


def render(name="nomad_features", app_name=None, **options):
    _, app = load_app(name)
    app_name = app_name or app.name
    spec, _ = compile_app(app, deployed_app_id(app_name), app_name)
    return render_app(spec, deployed_app_id(app_name), NomadOptions.parse(options))


def jobs_by_id(jobs):
    return {doc["Job"]["ID"]: doc["Job"] for doc in jobs}


@pytest.mark.parametrize("options", OPTION_SETS, ids=["defaults", "everything-on", "raw-exec"])
def test_every_feature_passes_nomads_types(options):
    jobs = render(**options)
    assert len(jobs) == 18  # 13 functions + 5 periodic trigger jobs
    done = check(jobs)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "checked 18, rejected 0" in done.stdout
    from mctl.plugins.nomad_hcl import to_hcl

    hcl = "".join(to_hcl(job) for job in jobs)  # every field has its HCL name
    assert hcl.count("\njob ") + hcl.startswith("job ") == 18


@pytest.mark.parametrize("app_name", ["x", "My.App_2", "a" * 64, "0-starts-with-digit",
                                      "UPPER_and_lower"])
def test_odd_app_names_render_valid_job_ids(app_name):
    jobs = render(app_name=app_name)
    done = check(jobs)
    assert done.returncode == 0, done.stdout
    ids = [doc["Job"]["ID"] for doc in jobs]
    assert len(set(ids)) == len(ids)


def test_worker_pool_job():
    job = jobs_by_id(render())["mctl-nomad-features-everything"]
    group = job["TaskGroups"][0]
    task = group["Tasks"][0]
    assert job["Type"] == "service"
    assert group["Count"] == 2
    scaling = group["Scaling"]
    assert (scaling["Min"], scaling["Max"], scaling["Enabled"]) == (2, 8, False)
    policy = scaling["Policy"]
    assert policy["cooldown"] == "120s"
    check_ = policy["check"][0]["queue_depth"][0]
    assert check_["source"] == "prometheus" and "mctl_queue_depth" in check_["query"]
    assert check_["strategy"] == [{"target-value": [{"target": 1}]}]
    assert task["Driver"] == "docker" and task["Config"]["image"] == "python:3.12-slim"
    assert task["Resources"] == {"CPU": 2500, "MemoryMB": 4096}
    assert task["KillTimeout"] == 905 * NS
    assert group["RestartPolicy"]["Attempts"] == 3 and group["RestartPolicy"]["Delay"] == 2 * NS
    assert job["Meta"]["mctl.function"] == "everything"
    assert job["Meta"]["mctl.image"] == "python:3.12-slim"
    assert task["Env"]["MODE"] == "fast"
    assert task["VolumeMounts"] == [
        {"Volume": "training-data", "Destination": "/data", "ReadOnly": False},
        {"Volume": "models", "Destination": "/models", "ReadOnly": True}]  # vol.read_only()
    assert group["Volumes"]["training-data"]["Source"] == "training-data"
    assert group["Volumes"]["training-data"]["ReadOnly"] is False
    assert group["Volumes"]["models"]["ReadOnly"] is True
    assert task["Vault"]["Role"] == "mctl-nomad-features"
    secret_tmpl = [t for t in task["Templates"] if "api-keys" in t["EmbeddedTmpl"]]
    assert secret_tmpl and secret_tmpl[0]["Envvars"] is True


def test_autoscaler_option_hands_scaling_to_nomad_autoscaler():
    job = jobs_by_id(render(autoscaler="nomad"))["mctl-nomad-features-plain"]
    assert job["TaskGroups"][0]["Scaling"]["Enabled"] is True


def test_no_secret_value_or_task_token_in_any_job():
    text = json.dumps(render())
    assert "inline-value-never-rendered" not in text
    assert "MCTL_TASK_TOKEN=" not in text.replace("MCTL_TASK_TOKEN={{", "")


def test_gpu_devices_and_fallbacks_in_order():
    jobs = jobs_by_id(render(**{"function.train.gpu_fallback": "H100,L40S"}))
    device = jobs["mctl-nomad-features-train"]["TaskGroups"][0]["Tasks"][0]["Resources"][
        "Devices"][0]
    assert device["Name"] == "nvidia/gpu" and device["Count"] == 2
    assert [a["RTarget"] for a in device["Affinities"]] == ["(?i)A100.*80GB", "(?i)H100",
                                                            "(?i)L40S"]
    weights = [a["Weight"] for a in device["Affinities"]]
    assert weights == sorted(weights, reverse=True)
    any_gpu = jobs["mctl-nomad-features-any-gpu"]["TaskGroups"][0]["Tasks"][0]["Resources"]
    assert any_gpu["Devices"] == [{"Name": "nvidia/gpu", "Count": 1}]


def test_schedules_become_periodic_batch_jobs():
    jobs = jobs_by_id(render())
    report = jobs["mctl-nomad-features-weekday-report-schedule"]
    assert report["Type"] == "batch"
    assert report["Periodic"] == {"Enabled": True, "SpecType": "cron", "Specs": ["30 9 * * 1-5"],
                                  "TimeZone": "America/New_York", "ProhibitOverlap": True}
    args = report["TaskGroups"][0]["Tasks"][0]["Config"]["args"]
    assert "from_name('nomad-features', 'weekday_report').spawn()" in args[-1]
    assert jobs["mctl-nomad-features-every-quarter-hour-schedule"]["Periodic"]["Specs"] == [
        "*/15 * * * *"]


def test_a_period_no_cron_can_express_is_refused_with_a_hint(tmp_path):
    from mctl.core.spec import ScheduleSpec
    from mctl.plugins.nomad_render import cron_for

    with pytest.raises(InvalidError, match=r"Period of 420 seconds .* use Cron"):
        cron_for(ScheduleSpec(kind="period", seconds=420))
    app_file = tmp_path / "odd_period.py"
    app_file.write_text("import mctl\napp = mctl.App('odd')\n\n"
                        "@app.function(schedule=mctl.Period(hours=5))\ndef f():\n    pass\n")
    from mctl.cli.main import import_app_file

    _, app, _ = import_app_file(str(app_file))
    spec, _ = compile_app(app, deployed_app_id("odd"), "odd")
    with pytest.raises(InvalidError, match="Function f: A Period of 18000 seconds"):
        render_app(spec, deployed_app_id("odd"), NomadOptions())


def test_a_misspelled_field_is_rejected_by_the_decoder():
    job = render()[0]
    broken = copy.deepcopy(job)
    task = broken["Job"]["TaskGroups"][0]["Tasks"][0]
    task["KillTimout"] = task.pop("KillTimeout")
    done = check([job, broken])
    assert done.returncode == 1
    assert 'unknown field "KillTimout"' in done.stdout


@pytest.mark.parametrize("mutate, message", [
    (lambda j: j["TaskGroups"][0].update(Count=500), "outside scaling bounds"),
    (lambda j: j["TaskGroups"][0]["Tasks"][0]["Resources"].update(MemoryMB=0), "memory"),
    (lambda j: j.update(ID="has space"), "job ID"),
])
def test_server_side_checks_can_fail(mutate, message):
    job = copy.deepcopy(render()[0])
    mutate(job["Job"])
    done = check([job])
    assert done.returncode == 1 and message in done.stdout


def test_read_only_volumes_render_read_only_and_nomads_csi_rules_hold():
    """`vol.read_only()` reaches the volume request and its mount; a CSI volume claimed
    reader-only must be read-only (Nomad's rule), which the checker holds."""
    job = jobs_by_id(render(volume_type="csi"))["mctl-nomad-features-everything"]
    volumes = job["TaskGroups"][0]["Volumes"]
    assert volumes["models"]["ReadOnly"] is True
    assert volumes["models"]["AccessMode"] == "multi-node-reader-only"
    assert volumes["training-data"]["AccessMode"] == "multi-node-multi-writer"
    assert check([{"Job": job}]).returncode == 0
    from mctl.plugins.nomad_hcl import to_hcl

    hcl = to_hcl({"Job": job})
    assert 'volume "models" {' in hcl and "read_only = true" in hcl
    writable = copy.deepcopy(job)
    writable["TaskGroups"][0]["Volumes"]["models"]["ReadOnly"] = False
    done = check([{"Job": writable}])
    assert done.returncode == 1
    assert "multi-node-reader-only volumes must be read-only" in done.stdout
    no_mode = copy.deepcopy(job)
    del no_mode["TaskGroups"][0]["Volumes"]["models"]["AccessMode"]
    assert "must have an access mode" in check([{"Job": no_mode}]).stdout


def test_bad_cron_or_time_zone_is_rejected():
    job = copy.deepcopy(jobs_by_id(render())["mctl-nomad-features-monthly-schedule"])
    job["Periodic"]["TimeZone"] = "Mars/Olympus_Mons"
    job["Periodic"]["Specs"] = ["61 * * * *"]
    done = check([{"Job": job}])
    assert done.returncode == 1
    assert "invalid cron spec" in done.stdout and "invalid time zone" in done.stdout


def test_options_are_validated():
    with pytest.raises(InvalidError, match="has no option"):
        NomadOptions.parse({"datacenter": "dc1"})
    with pytest.raises(InvalidError, match="driver='docker2'"):
        NomadOptions.parse({"driver": "docker2"})
    with pytest.raises(InvalidError, match="ATTRIBUTE OPERATOR VALUE"):
        NomadOptions.parse({"constraints": "${attr.kernel.name} ~ linux"})
    with pytest.raises(InvalidError, match="function.<tag>.<option>"):
        NomadOptions.parse({"function.train.image": "x"})


def test_job_ids():
    assert job_id("shop", "send_email") == "mctl-shop-send-email"
    odd = job_id("shop", "Ünïcode_näme")
    assert odd.startswith("mctl-shop-") and odd.isascii() and "--" not in odd
    assert job_id("shop", "Ünïcode_näme") != job_id("shop", "Ünïcode_nämé")


def test_a_driver_needing_an_image_without_one_says_what_to_do():
    with pytest.raises(InvalidError, match="Function plain: driver=docker needs a container"):
        render(driver="docker")


def _documents(text):
    decoder, docs, i = json.JSONDecoder(), [], 0
    while i < len(text.strip()):
        doc, end = decoder.raw_decode(text, i)
        docs.append(doc)
        i = end + 1
    return docs


def test_cli_render_and_deploy_dry_run_print_checked_jobs():
    from click.testing import CliRunner

    from conftest import APPS
    from mctl.cli.main import cli

    app_file = str(APPS / "nomad_features.py")
    runner = CliRunner()
    rendered = runner.invoke(cli, ["nomad", "render", app_file, "-o", "datacenters=dc7"])
    assert rendered.exit_code == 0, rendered.output
    docs = _documents(rendered.output)
    assert len(docs) == 18 and all(d["Job"]["Datacenters"] == ["dc7"] for d in docs)
    assert check(docs).returncode == 0
    dry = runner.invoke(cli, ["deploy", app_file, "--scheduler", "nomad", "--dry-run",
                              "--name", "shop"])
    assert dry.exit_code == 0, dry.output
    assert all(d["Job"]["ID"].startswith("mctl-shop-") for d in _documents(dry.output))
    hcl = runner.invoke(cli, ["nomad", "render", app_file, "--hcl"])
    assert 'job "mctl-nomad-features-everything" {' in hcl.output
    assert 'strategy "target-value" {' in hcl.output and 'crons = ["30 9 * * 1-5"]' in hcl.output
    refused = runner.invoke(cli, ["deploy", app_file, "--dry-run"])
    assert refused.exit_code != 0 and "--scheduler nomad --dry-run" in refused.output
    bad = runner.invoke(cli, ["nomad", "render", app_file, "-o", "datacenter=dc1"])
    assert bad.exit_code != 0 and "has no option datacenter" in bad.output
