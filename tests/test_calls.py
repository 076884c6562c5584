"""End-to-end calls through the embedded control plane and real worker processes."""

import asyncio

import pytest

import mctl
from conftest import load_app

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def basic():
    import os
    import tempfile

    old = {k: os.environ.get(k) for k in ("MCTL_HOME", "MCTL_CACHE_DIR", "MCTL_SERVER_URL")}
    tmp = tempfile.mkdtemp()
    os.environ["MCTL_HOME"] = tmp + "/home"
    os.environ["MCTL_CACHE_DIR"] = tmp + "/cache"
    os.environ.pop("MCTL_SERVER_URL", None)
    module, app = load_app("basic")
    with app.run():
        yield module
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def isolated_home():  # the module-scoped app keeps one home for all tests here
    yield


def test_remote_returns_result(basic):
    assert basic.square.remote(7) == 49
    assert basic.add.remote(1, b=2) == 3


def test_map_preserves_order_and_starmap(basic):
    assert list(basic.square.map(range(50))) == [x * x for x in range(50)]
    assert list(basic.add.starmap([(1, 2), (3, 4)])) == [3, 7]
    assert list(basic.add.map([1, 2], [10, 20])) == [11, 22]


def test_map_unordered_returns_all(basic):
    assert sorted(basic.square.map(range(30), order_outputs=False)) == [x * x for x in range(30)]


def test_map_empty(basic):
    assert list(basic.square.map([])) == []


def test_remote_exception_keeps_type_and_traceback(basic):
    with pytest.raises(KeyError) as info:
        basic.fail.remote("boom")
    assert "boom" in str(info.value)
    import traceback

    # The remote frames are part of the exception's own traceback, after the caller's.
    shown = "".join(traceback.format_exception(info.value))
    assert "in fail" in shown and "raise KeyError" in shown, shown
    assert "RemoteTraceback" not in shown and info.value.__cause__ is None


def test_user_defined_exception_type(basic):
    with pytest.raises(basic.CustomError):
        basic.fail_custom.remote("mine")


def test_map_return_exceptions(basic):
    out = list(basic.fail.map(["a", "b"], return_exceptions=True))
    assert [type(e) for e in out] == [KeyError, KeyError]
    with pytest.raises(KeyError):
        list(basic.fail.map(["a"]))


def test_spawn_get_gather_from_id(basic):
    call = basic.square.spawn(5)
    assert isinstance(call, mctl.FunctionCall)
    assert call.get(timeout=30) == 25
    calls = [basic.square.spawn(i) for i in range(3)]
    assert mctl.gather(*calls) == [0, 1, 4]
    again = mctl.FunctionCall.from_id(call.object_id)
    again._server_url = basic.app._server_url
    assert again.get() == 25


def test_spawn_map(basic):
    call = basic.square.spawn_map(range(4))
    assert call.num_inputs() == 4
    assert [call.get(index=i) for i in range(4)] == [0, 1, 4, 9]


def test_get_timeout_then_cancel(basic):
    call = basic.slow.spawn(3)
    with pytest.raises(TimeoutError):
        call.get(timeout=0.2)
    call.cancel()
    with pytest.raises(mctl.exception.InputCancellation):
        call.get(timeout=10)


def test_for_each(basic):
    assert basic.square.for_each(range(5)) is None


def test_generator(basic):
    assert list(basic.gen.remote_gen(4)) == [0, 10, 20, 30]
    with pytest.raises(mctl.exception.InvalidError, match="remote_gen"):
        basic.gen.remote(2)


def test_async_function_and_aio_variants(basic):
    assert basic.async_double.remote(4) == 8

    async def main():
        a = await basic.square.remote.aio(6)
        b = [x async for x in basic.square.map.aio(range(5))]
        c = [x async for x in basic.gen.remote_gen.aio(3)]
        call = await basic.square.spawn.aio(3)
        d = await call.get.aio()
        return a, b, c, d

    assert asyncio.run(main()) == (36, [0, 1, 4, 9, 16], [0, 10, 20], 9)


def test_local_runs_here(basic):
    assert basic.square.local(3) == 9


def test_runtime_variables(basic):
    values = basic.env_vars.remote()
    assert values["TASK_ID"][0].startswith("ta-")
    assert values["IMAGE_ID"][0].startswith("im-")
    assert values["CLOUD_PROVIDER"][0] == "local"
    assert values["ENVIRONMENT"][0] == "main"
    assert all(mctl_value == modal_value for mctl_value, modal_value in values.values())


def test_large_argument_and_result(basic):
    data = b"\x01\x02\x03\x04" + bytes(100 * 1024 * 1024)
    assert basic.nbytes.remote(data) == (len(data), b"\x01\x02\x03\x04")
    assert len(basic.big_result.remote(2 * 1024 * 1024)) == 2 * 1024 * 1024


def test_function_calls_function(basic):
    assert basic.call_other.remote(4) == 17
    assert basic.spawn_other.remote(4) == 17  # a spawn and its .get() from inside a worker


def test_serialized_function(basic):
    assert basic.shipped.remote(1) == 1001


def test_secret_and_env(basic):
    assert basic.read_secret.remote() == ("t0k", "test")


def test_concurrent_inputs_share_a_container(basic):
    out = list(basic.concurrent_sleep.map(range(4)))
    assert [x for x, *_ in out] == [0, 1, 2, 3]
    # one container (max_containers=1) ran the four 0.5 s inputs at once: they all overlap
    assert len({pid for _, pid, _, _ in out}) == 1
    assert max(start for *_, start, _ in out) < min(end for *_, end in out)


def test_batched(basic):
    out = list(basic.batch_sum.map(range(8)))
    assert [x for x, _ in out] == list(range(8))
    assert max(size for _, size in out) > 1


def test_class_parameters_enter_and_methods(basic):
    counter = basic.Counter(start=5)
    assert counter.value.remote(1) == 106
    assert list(counter.count.remote_gen(2)) == [105, 106]
    assert basic.Counter().value.remote(0) == 100
    assert list(basic.Counter(start=1).value.map([1, 2])) == [102, 103]
    assert counter.value.local(1) == 106


def test_unpicklable_argument_is_named(basic):
    import threading

    with pytest.raises(mctl.exception.SerializationError, match="argument 'lock'"):
        basic.add.remote(1, lock=threading.Lock())
