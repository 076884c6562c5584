"""Bad input is refused at decoration time with a one-line error that says what to do."""

import pytest

import mctl
from mctl.exception import DeprecationError, InvalidError


@pytest.fixture
def app():
    return mctl.App("validation")


def test_bare_decorator(app):
    with pytest.raises(InvalidError, match=r"@app.function\(\) with parentheses"):
        @app.function
        def f():
            pass


def test_unknown_keyword_suggests(app):
    with pytest.raises(InvalidError, match="unknown keyword 'timout'.*'timeout'"):
        app.function(timout=5)


def test_removed_keywords_name_new_spelling(app):
    with pytest.raises(DeprecationError, match="buffer_containers"):
        app.function(_experimental_buffer_containers=1)


@pytest.mark.parametrize("name", ["Stub", "SharedVolume"])
def test_removed_names(name):
    with pytest.raises(DeprecationError, match="removed"):
        getattr(mctl, name)


def test_sandbox_is_a_public_name_loaded_on_first_use():
    assert mctl.Sandbox.__name__ == "Sandbox"
    assert mctl.ContainerProcess.__name__ == "ContainerProcess"


def test_web_decorator_goes_below_app_function():
    app = mctl.App("order")
    with pytest.raises(InvalidError, match=r"below @app.function\(\)"):
        @mctl.fastapi_endpoint()
        @app.function(serialized=True)
        def f():
            pass
    with pytest.raises(InvalidError, match="method='FETCH'"):
        mctl.fastapi_endpoint(method="FETCH")


def test_enable_output_is_accepted():
    with mctl.enable_output():
        pass


def test_bad_cron():
    with pytest.raises(InvalidError, match="Invalid cron string"):
        mctl.Cron("61 * * * *")


def test_bad_timezone():
    with pytest.raises(InvalidError, match="Unknown time zone 'Mars/Base'"):
        mctl.Cron("0 9 * * *", timezone="Mars/Base")


def test_min_above_max(app):
    with pytest.raises(InvalidError, match="min_containers=3 is greater than max_containers=1"):
        app.function(min_containers=3, max_containers=1)


@pytest.mark.parametrize("timeout", [0, 0.5, 86401, "10"])
def test_timeout_bounds(app, timeout):
    with pytest.raises(InvalidError, match="timeout"):
        app.function(timeout=timeout)


def test_non_global_function(app):
    with pytest.raises(InvalidError, match="serialized=True"):
        @app.function()
        def inner():
            pass


def test_non_global_ok_with_serialized(app):
    @app.function(serialized=True)
    def inner():
        return 1

    assert inner.local() == 1


def test_class_to_function(app):
    with pytest.raises(InvalidError, match="@app.cls"):
        app.function()(type("X", (), {}))


def test_bad_gpu_and_volume(app):
    with pytest.raises(InvalidError, match="gpu"):
        app.function(gpu="A100:x")
    with pytest.raises(InvalidError, match="absolute path"):
        app.function(volumes={"data": mctl.Volume.from_name("v")})


def test_scheduled_function_takes_no_args(app):
    with pytest.raises(InvalidError, match="no required arguments"):
        @app.function(schedule=mctl.Period(minutes=1), serialized=True)
        def needs(x):
            pass


def test_decorator_twice_and_duplicate_name(app):
    @app.function(serialized=True)
    def f():
        pass

    with pytest.raises(InvalidError, match="twice"):
        app.function(serialized=True)(f)
    with pytest.raises(InvalidError, match="already has a function named"):
        app.function(serialized=True, name=f.tag)(lambda: 1)


def test_concurrent_twice():
    with pytest.raises(InvalidError, match="twice"):
        mctl.concurrent(max_inputs=2)(mctl.concurrent(max_inputs=3)(lambda: 1))


def test_calling_before_run(app):
    @app.function(serialized=True)
    def f():
        pass

    with pytest.raises(InvalidError, match="app.run"):
        f.remote()


def test_retries():
    assert mctl.Retries(max_retries=3, initial_delay=1, backoff_coefficient=2).delay(3) == 4
    with pytest.raises(InvalidError):
        mctl.Retries(max_retries=11)


def test_gpu_parsing_recorded():
    from mctl.core.spec import GpuRequest

    assert GpuRequest.parse("a100-80gb:2") == GpuRequest(type="A100-80GB", count=2)
    assert GpuRequest.parse("any") == GpuRequest(type=None, count=1)


def test_spec_round_trips_json(tmp_path):
    from conftest import load_app
    from mctl.core.compile import compile_app
    from mctl.core.spec import AppSpec

    _, app = load_app("basic")
    spec, blobs = compile_app(app, "ap-test")
    again = AppSpec.model_validate_json(spec.model_dump_json())
    assert again == spec
    assert spec.functions["Counter"].kind == "class"
    assert spec.bundle_blob in blobs


def test_import_is_light():
    import subprocess
    import sys

    code = ("import sys, mctl; heavy = {'aiohttp', 'pydantic', 'cloudpickle', 'croniter', "
            "'prometheus_client', 'sqlite3', 'asyncio'} & set(sys.modules); print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
