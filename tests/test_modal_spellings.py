"""Modal's older spellings still work with one warning each, and the names real Modal apps
use exist: checked on the SDK objects and end to end against a real control plane."""

import warnings

import pytest

import mctl
import mctl as modal
from mctl.exception import InvalidError, NotFoundError
from mctl.sdk import deprecated

from conftest import load_app


@pytest.fixture(autouse=True)
def fresh_warnings():
    deprecated._warned.clear()
    yield
    deprecated._warned.clear()


def spelling_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, DeprecationWarning)]


OLD = [("concurrency_limit", 3, "max_containers", 3),
       ("keep_warm", 2, "min_containers", 2),
       ("container_idle_timeout", 30, "scaledown_window", 30),
       ("allow_concurrent_inputs", 5, "max_inputs", 5)]


@pytest.mark.parametrize("old,value,new,expected", OLD)
@pytest.mark.parametrize("decorator", ["function", "cls"])
def test_old_keyword_warns_once_and_applies(old, value, new, expected, decorator):
    app = modal.App("old-spellings")
    with warnings.catch_warnings(record=True) as record:
        for i in range(2):  # two uses, one warning
            if decorator == "function":
                def f():
                    pass
                f.__qualname__ = f"f{i}"
                handle = app.function(**{old: value})(f)
            else:
                handle = app.cls(**{old: value})(type(f"C{i}", (), {
                    "m": modal.method()(lambda self: None), "__module__": __name__}))
            assert handle.options[new] == expected
    messages = spelling_warnings(record)
    assert len(messages) == 1, messages
    today = "@mctl.concurrent(max_inputs=...)" if new == "max_inputs" else f"{new}=..."
    assert old in messages[0] and today in messages[0] and "\n" not in messages[0]


def test_old_and_new_spelling_together_is_refused():
    app = modal.App("both")
    with pytest.raises(InvalidError, match="keep only @app.function\\(max_containers"):
        app.function(concurrency_limit=2, max_containers=3)
    with pytest.raises(InvalidError, match="keep only @mctl.concurrent"), \
            warnings.catch_warnings(record=True):
        @app.function(allow_concurrent_inputs=2)
        @modal.concurrent(max_inputs=3)
        def g():
            pass


@pytest.mark.integration
def test_seed_reference_examples_run_as_written(server_process):
    """The seed reference's examples with older spellings ("Scaling" 2, "Dynamic Batching"),
    as written, with `import mctl as modal`."""
    with warnings.catch_warnings(record=True) as record:
        module, app = load_app("seed_scaling")
    messages = spelling_warnings(record)
    assert len(messages) == 1 and "concurrency_limit" in messages[0]
    assert "seed_scaling.py" in record[0].filename  # points at the user's line
    assert module.limited_concurrency_function.options["max_containers"] == 10
    with app.run():
        assert module.limited_concurrency_function.remote() is None
        assert list(module.batched_multiply.map([1, 2], [5, 6])) == [1, 4]


def test_module_paths_and_names():
    import mctl.app
    import mctl.cls
    import mctl.functions
    from mctl.queue import Queue

    assert mctl.app.App is mctl.App and mctl.cls.Cls is mctl.Cls and Queue is mctl.Queue
    assert mctl.functions.FunctionCall.gather is not None and mctl.Function.hydrate
    assert mctl.current_input_id() is None and mctl.current_function_call_id() is None
    assert mctl.interact() is None  # outside a worker and a terminal: nothing


@pytest.mark.integration
def test_deploy_app_old_spellings_warn_once(server_process, tmp_path):
    from mctl.runner import deploy_app as runner_deploy_app

    app = modal.App("old-deploy")

    @app.function(serialized=True, name="hello")
    def hello(name):
        return f"Hello, {name}!"

    with warnings.catch_warnings(record=True) as record:
        # Seed reference, "Deployment" 2, as written.
        from mctl import deploy_app

        result = deploy_app(app, name="my-app")
        runner_deploy_app(app, name="my-app")
    messages = spelling_warnings(record)
    assert len(messages) == 1 and "app.deploy(name=...)" in messages[0]
    assert result.app_id.startswith("ap-")
    hello_handle = modal.Function.from_name("my-app", "hello").hydrate()
    assert hello_handle.object_id.startswith("fu-")
    assert hello_handle.remote("World") == "Hello, World!"


@pytest.mark.integration
def test_names_real_apps_use(server_process):
    module, app = load_app("modalnames")
    with app.run():
        call = module.ids.spawn()
        call_id, input_id = call.get()
        assert call_id == call.object_id and input_id.startswith("in-")
        assert module.async_ids.remote()[1].startswith("in-")

        calls = [module.maybe_fail.spawn(i) for i in (1, 3)]
        assert modal.FunctionCall.gather(*calls) == [1, 3]
        out = list(module.maybe_fail.map([1, 2], return_exceptions=True,
                                         wrap_returned_exceptions=False))
        assert out[0] == 1 and isinstance(out[1], ValueError)

        assert list(module.Batcher().double.map([1, 2, 3])) == [2, 4, 6]

        # (what each option does is in tests/test_cls_variants.py)
        with warnings.catch_warnings(record=True) as record:
            variant = module.Model.with_options(gpu=None, timeout=100)
            assert variant(size=3).scale.remote(2) == 6
            assert module.Model.with_concurrency(max_inputs=4)().scale.remote(5) == 5
            assert module.Batcher.with_batching(max_batch_size=2, wait_ms=10)().double.remote(1) == 2
            old = module.Model.with_options(concurrency_limit=2)
            assert old().scale.remote(1) == 1
        assert [m for m in spelling_warnings(record)] == [
            "with_options(concurrency_limit=...) is an older Modal spelling; use "
            "with_options(max_containers=...)."]
        with pytest.raises(InvalidError, match="unknown options colour"):
            module.Model.with_options(colour="red")

    with pytest.raises(NotFoundError, match="create_if_missing=True"):
        modal.App.lookup("no-such-app")
    looked_up = modal.App.lookup("made-by-lookup", create_if_missing=True)
    assert looked_up.app_id and modal.App.lookup("made-by-lookup").app_id == looked_up.app_id
