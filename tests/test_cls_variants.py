"""Cls.with_options / with_concurrency / with_batching: calls through the returned class run on
a variant of the class (a function with its own id and workers) with those options, end to end
against a real control plane and real workers."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import mctl as modal
from mctl.exception import FunctionTimeoutError, InvalidError

from conftest import load_app
from test_auth import http

pytestmark = pytest.mark.integration


def test_variants_run_with_their_options(server_process):
    module, app = load_app("variants")
    Model = module.Model
    with app.run():
        base = Model(size=2).info.remote()
        assert base["colour"] == "base" and base["secret"] is None and base["size"] == 2

        # env and secrets reach the variant's workers only
        red = Model.with_options(env={"COLOUR": "red"},
                                 secrets=[modal.Secret.from_dict({"VARIANT_SECRET": "s3"})])
        got = red(size=3).info.remote()
        assert got["colour"] == "red" and got["secret"] == "s3" and got["size"] == 3
        assert got["shape"] == "round"  # env is added to the class's
        assert got["function_id"] != base["function_id"] and got["pid"] != base["pid"]
        assert Model().info.remote()["colour"] == "base"  # the class itself is unchanged

        # the same options reuse one variant; different ones make another
        again = Model.with_options(env={"COLOUR": "red"},
                                   secrets=[modal.Secret.from_dict({"VARIANT_SECRET": "s3"})])
        assert again().info.remote()["function_id"] == got["function_id"]

        # timeout: the variant's input is stopped, the class's is not
        with pytest.raises(FunctionTimeoutError):
            Model.with_options(timeout=1)().info.remote(sleep=4)

        # chained: one container (max_containers=1 from the class) running 4 inputs at once
        wide = Model.with_options(env={"COLOUR": "wide"}).with_concurrency(max_inputs=4)
        wide().info.remote()  # warm
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda _: wide().info.remote(sleep=1.5), range(4)))
        assert {o["colour"] for o in outs} == {"wide"} and len({o["pid"] for o in outs}) == 1
        assert max(o["t0"] for o in outs) < min(o["t1"] for o in outs)  # all ran together

        # batching: the class takes one input per call; the variant up to 4
        assert {n for _, n in module.Doubler().double.map(range(6))} == {1}
        batched = module.Doubler.with_batching(max_batch_size=4, wait_ms=500)()
        calls = [batched.double.spawn(x) for x in range(4)]
        outs = [c.get() for c in calls]
        assert [v for v, _ in outs] == [0, 2, 4, 6] and max(n for _, n in outs) > 1

        # the resources reach the variant's spec (what a backend places the workers by)
        sized = Model.with_options(cpu=0.5, memory=300, max_containers=2, scaledown_window=5)
        assert sized().info.remote()["colour"] == "base"
        status, record = http(f"{server_process.url}/api/apps/{app.app_id}",
                              token=server_process.token)
        assert status == 200
        variants = [f for f in record["spec"]["functions"].values()
                    if f.get("variant_of") == "Model" and f["resources"]["cpu"] == 0.5]
        assert len(variants) == 1
        assert variants[0]["resources"]["memory_mb"] == 300
        assert variants[0]["autoscaling"]["max_containers"] == 2
        assert variants[0]["autoscaling"]["scaledown_window"] == 5


def test_bad_options_are_refused_with_the_rule(server_process):
    module, app = load_app("variants")
    with pytest.raises(InvalidError, match="unknown options colour"):
        module.Model.with_options(colour="red")
    with pytest.raises(InvalidError, match="max_inputs"):
        module.Model.with_concurrency(max_inputs=0)
    with app.run():
        with pytest.raises(InvalidError, match="timeout"):
            module.Model.with_options(timeout=0)().info.remote()
        with pytest.raises(InvalidError, match="gpu"):
            module.Model.with_options(gpu=3)().info.remote()


def test_variant_of_a_deployed_class_survives_restart(server_process):
    from mctl.core.runner import deploy_app

    module, app = load_app("variants")
    deploy_app(app)
    Model = modal.Cls.from_name("variants", "Model")
    blue = Model.with_options(env={"COLOUR": "blue"})
    first = blue().info.remote()
    assert first["colour"] == "blue"

    # a token without the deploy scope may size a variant, not give it secrets
    admin = server_process.token
    status, tok = http(f"{server_process.url}/api/tokens", "POST", admin,
                       {"scope": "invoke", "name": "caller"})
    assert status == 200, tok
    base_id = Model.hydrate()._service._function_id
    url = f"{server_process.url}/api/functions/{base_id}/variants"
    status, body = http(url, "POST", tok["token"], {"overrides": {"timeout": 10}})
    assert status == 200 and body["function_id"].startswith("fu-")
    status, body = http(url, "POST", tok["token"],
                        {"overrides": {"secrets": [{"name": "x", "required_keys": []}]}})
    assert status == 403 and "deploy scope" in body["error"]

    server_process.stop()
    server_process.start()
    time.sleep(0.5)
    again = modal.Cls.from_name("variants", "Model").with_options(env={"COLOUR": "blue"})
    after = again().info.remote()
    assert after["colour"] == "blue" and after["function_id"] == first["function_id"]
    assert after["shape"] == "round"  # the deployed class's env, kept by a looked-up variant

    # a redeploy moves the variant to the new version with the class (new workers)
    deploy_app(app)
    redeployed = again().info.remote()
    assert redeployed["colour"] == "blue" and redeployed["function_id"] == first["function_id"]
    assert redeployed["pid"] != after["pid"]
