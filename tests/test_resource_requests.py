"""Modal's resource forms: `gpu=[...]` (fallbacks in order), `cpu=(request, limit)` and
`memory=(request, limit)` are accepted and reach each backend's launch."""

import pytest

import mctl
from mctl.core.launch import LaunchSpec
from mctl.core.spec import GpuRequest
from mctl.exception import InvalidError
from mctl.plugins.containers import run_argv
from mctl.plugins.scheduler_slurm import SlurmScheduler, place_gpu_choice

from conftest import load_app


def test_the_modal_forms_reach_the_spec():
    from mctl.core.compile import compile_app

    _, app = load_app("resource_forms")
    spec, _ = compile_app(app, "ap-test")
    res = spec.functions["modal_forms"].resources
    assert res.gpu == GpuRequest(type="H100", count=1)
    assert res.gpu_fallbacks == [GpuRequest(type="A100-80GB", count=2)]
    assert (res.cpu, res.cpu_limit, res.memory_mb, res.memory_limit_mb) == (1, 4, 1024, 2048)


@pytest.mark.parametrize("kwargs,words", [
    (dict(cpu=(4, 1)), "less than the request"),
    (dict(memory=(2048, 1024)), "less than the request"),
    (dict(memory=(1, 2, 3)), "(request, limit) pair"),
    (dict(cpu=(1, -2)), "cpu"),
    (dict(gpu=[]), "empty"),
    (dict(gpu=["H100", 3]), "gpu must be a string"),
])
def test_bad_pairs_and_lists_are_refused(kwargs, words):
    with pytest.raises(InvalidError, match=words.replace("(", r"\(").replace(")", r"\)")):
        mctl.App("bad").function(**kwargs)


def _launch(**kw):
    return LaunchSpec(pool_id="fu-x-v1", app_id="ap-x", app_name="res", version=1,
                      function_id="fu-x", function="f", command=("python3", "-m", "mctl.core.runtime"),
                      env={"MCTL_SERVER_URL": "http://127.0.0.1:1"}, image="localhost/mctl/im-x:latest",
                      image_id="im-x", runtime="oci", **kw)


def test_limits_become_podman_limits():
    argv, _ = run_argv(_launch(cpu=1, cpu_limit=2.5, memory_mb=512, memory_limit_mb=1024), "ta-x")
    assert argv[argv.index("--cpus") + 1] == "2.5"
    assert argv[argv.index("--memory") + 1] == "1024m"
    argv, _ = run_argv(_launch(cpu=1, memory_mb=512), "ta-x")
    assert "--cpus" not in argv and "--memory" not in argv


NODES = [{"name": "node1", "cpus": 4, "memory_mb": 4096, "gpus": {"a100": 2}},
         {"name": "node2", "cpus": 4, "memory_mb": 4096, "gpus": {}}]


def test_slurm_takes_the_first_gpu_choice_a_node_offers():
    sched = SlurmScheduler({})
    launch = _launch(gpu=GpuRequest(type="H100"), gpu_fallbacks=(GpuRequest(type="A100", count=2),))
    chosen, problem = place_gpu_choice(launch, NODES, sched.gres_type)
    assert problem == "" and chosen.gpu == GpuRequest(type="A100", count=2)
    assert "--gres=gpu:a100:2" in sched.job_script(chosen, "ta-x")
    first, problem = place_gpu_choice(_launch(gpu=GpuRequest(type="A100")), NODES, sched.gres_type)
    assert problem == "" and first.gpu.type == "A100"
    none, problem = place_gpu_choice(
        _launch(gpu=GpuRequest(type="H100"), gpu_fallbacks=(GpuRequest(type="L4"),)), NODES,
        sched.gres_type)
    assert "no node offers 1 GPU(s) of type h100" in problem


def test_slurm_memory_limit_is_its_mem():
    sched = SlurmScheduler({})
    assert "#SBATCH --mem=2048M" in sched.job_script(_launch(memory_mb=1024,
                                                             memory_limit_mb=2048), "ta-x")


def test_nomad_takes_any_gpu_choice_preferring_the_first():
    from mctl.plugins.nomad_render import NomadOptions, _gpu_device

    device = _gpu_device(_launch(gpu=GpuRequest(type="H100"),
                                 gpu_fallbacks=(GpuRequest(type="A100"),)), NomadOptions.parse({}))
    assert device["Constraints"][0]["RTarget"] == "(?i)(H100|A100)"
    assert [a["RTarget"] for a in device["Affinities"]] == ["(?i)H100", "(?i)A100"]


def test_the_local_backend_says_plainly_what_gpu_it_lacks_and_which_names_are_unknown(
        monkeypatch):
    """A trial's `gpu="T5"` printed "h requests what this machine has no 1 GPU(s) of type T5"."""
    import asyncio
    import dataclasses

    from mctl.core import plugins
    from mctl.core.spec import unknown_gpu
    from mctl.plugins.scheduler_local import LocalScheduler

    monkeypatch.setattr(plugins, "registrations", lambda hook: [])  # a machine with no GPU
    notices = []

    class Events:
        def notice(self, pool_id, text):
            notices.append(text)

    sched = LocalScheduler({})
    sched.events = Events()
    asyncio.run(sched.ensure_pool(_launch(gpu=GpuRequest(type="T5"))))
    assert notices[0] == "f: this machine has no GPU, and it asks for 1 T5 GPU; it runs here anyway."
    assert "'T5' is not one of Modal's" in notices[1] and "did you mean 'T4'?" in notices[1]
    notices.clear()
    launch = dataclasses.replace(_launch(gpu=GpuRequest(type=None, count=2)), pool_id="fu-y-v1",
                                 gpu_fallbacks=(GpuRequest(type="H100"),))
    asyncio.run(sched.ensure_pool(launch))
    assert notices == ["f: this machine has no GPU, and it asks for 2 GPUs or 1 H100 GPU; it "
                       "runs here anyway."]  # any and Modal's names: no warning about the name
    assert unknown_gpu("h100") == "" and unknown_gpu("RTX6000", ("RTX6000",)) == ""
