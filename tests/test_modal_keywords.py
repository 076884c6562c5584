"""Modal's keywords are implemented, refused with a reason, or warned about: none is silently
ignored (README's table)."""

import shutil
import socket
import warnings

import pytest

import mctl
from mctl.exception import InvalidError
from mctl.sdk import deprecated

from conftest import load_app


@pytest.fixture(autouse=True)
def fresh_warnings():
    deprecated._warned.clear()
    yield
    deprecated._warned.clear()


@pytest.mark.parametrize("key,value,words", [
    ("network_file_systems", {"/data": object()}, "Volume"),
    ("cloud_bucket_mounts", {"/b": object()}, "Volume"),
    ("i6pn", True, "i6pn"),
])
def test_unsupported_security_and_storage_keywords_are_refused(key, value, words):
    app = mctl.App("refused")
    with pytest.raises(InvalidError, match=words):
        app.function(**{key: value})
    with pytest.raises(InvalidError, match=words):
        app.cls(**{key: value})
    app.function(**{key: None})  # the default is fine


def test_keywords_without_effect_warn_once():
    app = mctl.App("no-effect")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        app.function(region="us-east")
        app.function(region="eu")
        app.function(experimental_options={})  # the default: nothing to say
    messages = [str(w.message) for w in record]
    assert messages == ["@app.function(region=...) has no effect on mctl (it is about Modal's "
                        "cloud); it is ignored."]
    assert record[0].filename == __file__


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_max_inputs_must_be_a_positive_int(value):
    with pytest.raises(InvalidError, match="max_inputs"):
        mctl.App("bad").function(max_inputs=value)


def test_lifecycle_options_reach_the_spec():
    from mctl.core.compile import compile_app

    _, app = load_app("keywords")
    spec, _ = compile_app(app, "ap-test")
    fns = spec.functions
    assert fns["one_each"].container_max_inputs == 1
    assert fns["single"].container_max_inputs == 1
    assert fns["two_each"].container_max_inputs == 2
    assert fns["helper"].container_max_inputs is None
    assert fns["restricted"].restrict_modal_access and not fns["helper"].restrict_modal_access
    assert fns["one_each"].max_inputs == 1  # concurrency is @concurrent's, unchanged


@pytest.mark.integration
def test_lifecycle_and_restriction_end_to_end():
    module, app = load_app("keywords")
    with app.run():
        pids = [module.one_each.remote(i) for i in range(3)]
        assert len(set(pids)) == 3, pids  # a fresh container for each input
        pids = [module.single.remote(i) for i in range(2)]
        assert len(set(pids)) == 2, pids
        pids = [module.two_each.remote(i) for i in range(4)]
        assert len(set(pids)) == 2, pids  # two inputs per container, then a new one
        assert module.unrestricted.remote("call") == 2
        assert module.unrestricted.remote("dict") == "dict written"
        assert module.restricted.remote("plain") == "plain"
        for what in ("call", "dict"):
            answer = module.restricted.remote(what)
            assert answer.startswith("refused:") and "restrict_modal_access" in answer, answer


@pytest.mark.integration
@pytest.mark.skipif(not shutil.which("unshare"), reason="block_network needs util-linux's unshare")
def test_block_network_leaves_only_the_control_plane():
    module, app = load_app("keywords")
    with socket.socket() as listener, app.run():
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # reachable from here
        out = module.offline.remote(port)
    assert out == {"loopback": "ConnectionRefusedError", "internet": "OSError", "helper": 2}, out


def test_block_network_is_refused_where_it_cannot_be_enforced(tmp_path):
    from mctl.core.runtime.netjail_host import problem

    class Launch:
        runtime, env = "oci", {"MCTL_SERVER_URL": "http://127.0.0.1:1"}

    assert "container image" in problem(Launch())
    Launch.runtime, Launch.env = "process", {"MCTL_SERVER_URL": "http://10.0.0.5:1"}
    assert "loopback" in problem(Launch())
