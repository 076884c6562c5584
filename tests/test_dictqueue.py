"""mctl.Dict and mctl.Queue against a real `mctl server` and real workers: shared between a
caller and two workers, blocking gets, durability across a restart, the errors users hit, and
the `mctl dict` / `mctl queue` commands."""

import asyncio
import queue
import threading
import time

import pytest
from click.testing import CliRunner

import mctl
from mctl.exception import InvalidError, NotFoundError, RequestSizeError

from conftest import load_app

pytestmark = pytest.mark.integration


def test_dict_operations(server_process):
    d = mctl.Dict.from_name("ops", create_if_missing=True)
    d["a"] = 1
    d[("t", 2)] = {"nested": [1, 2]}
    assert d["a"] == 1 and d[("t", 2)] == {"nested": [1, 2]}
    assert d.get("missing") is None and d.get("missing", 7) == 7
    assert "a" in d and "b" not in d and d.contains("a")
    assert d.put("a", 2, skip_if_exists=True) is False and d["a"] == 1
    assert d.put("b", 2, skip_if_exists=True) is True
    d.update({"c": 3}, e=5)
    assert len(d) == d.len() == 5
    assert sorted(map(repr, d.keys())) == sorted(map(repr, ["a", ("t", 2), "b", "c", "e"]))
    assert dict(d.items())["c"] == 3 and 5 in list(d.values())
    assert d.pop("c") == 3 and d.pop("c", None) is None
    with pytest.raises(KeyError):
        d["c"]
    with pytest.raises(KeyError):
        d.pop("c")
    d.clear()
    assert d.len() == 0


def test_queue_operations_and_partitions(server_process):
    q = mctl.Queue.from_name("ops", create_if_missing=True)  # Dicts and Queues: separate names
    q.put(1)
    q.put_many([2, 3])
    q.put("x", partition="other")
    assert q.len() == 3 and q.len(partition="other") == 1 and q.len(total=True) == 4
    assert list(q.iterate()) == [1, 2, 3]  # in place
    assert q.get() == 1 and q.get_many(10) == [2, 3]
    assert q.get(block=False) is None and q.get_many(5, block=False) == []
    assert q.get(partition="other") == "x"
    q.put_many([4, 5], partition="p")
    q.clear(partition="p")
    assert q.len(partition="p") == 0
    q.put_many([6, 7])
    q.put(8, partition="p")
    q.clear(all=True)
    assert q.len(total=True) == 0
    with pytest.raises(InvalidError, match="partition"):
        q.put(1, partition="")


def test_blocking_get_times_out_and_wakes_on_put(server_process):
    q = mctl.Queue.from_name("blocking", create_if_missing=True)
    start = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get(timeout=1)
    assert 0.9 < time.monotonic() - start < 3
    with pytest.raises(queue.Empty):
        q.get_many(3, timeout=0.5)

    # A get blocked in the control plane returns as soon as a put lands, long before its timeout.
    got = {}

    def consumer():
        got["value"] = q.get(timeout=30)
        got["at"] = time.monotonic()

    thread = threading.Thread(target=consumer)
    thread.start()
    time.sleep(0.5)
    put_at = time.monotonic()
    mctl.Queue.from_name("blocking").put("wake")
    thread.join(10)
    assert got["value"] == "wake"
    assert got["at"] - put_at < 0.5


def test_shared_between_caller_and_two_workers(server_process):
    module, app = load_app("dictqueue")
    jobs, seen = module.jobs, module.seen
    with app.run():
        jobs.clear()
        calls = [module.take_one.spawn(60) for _ in range(2)]
        # Both workers wait in a blocking get (each recorded itself first); then the jobs land.
        deadline = time.monotonic() + 60
        while sum(1 for k in seen.keys() if str(k).startswith("ready-")) < 2:
            assert time.monotonic() < deadline, "two workers did not start"
            time.sleep(0.2)
        jobs.put_many(["job-1", "job-2"])
        assert sorted(mctl.FunctionCall.gather(*calls)) == ["job-1", "job-2"]
        assert seen["job-1"] != seen["job-2"]  # two different containers took one each
        assert seen["job-1"].startswith("ta-")

        assert module.async_roundtrip.remote("k-async") == ["async", "k-async", True,
                                                            ["k-async"]]
        seen["given"] = "from-caller"
        assert module.use_handle.remote(jobs, seen) == "from-caller"
        assert jobs.get(timeout=5) == "from-worker"
        with pytest.raises(NotFoundError, match="dq-never-created"):
            module.missing_dict.remote()


def test_persists_across_control_plane_restart(server_process):
    d = mctl.Dict.from_name("durable", create_if_missing=True)
    q = mctl.Queue.from_name("durable", create_if_missing=True)
    d["k"] = {"v": 1}
    q.put_many(["first", "second"])
    q.put("p", partition="part")
    server_process.stop()
    server_process.start()
    assert mctl.Dict.from_name("durable")["k"] == {"v": 1}
    q2 = mctl.Queue.from_name("durable")
    assert q2.get(timeout=5) == "first" and q2.get_many(5) == ["second"]
    assert q2.get(partition="part") == "p"
    assert d["k"] == {"v": 1}  # the old handle works against the restarted server too


def test_errors_a_user_hits(server_process):
    with pytest.raises(NotFoundError, match=r"create_if_missing=True"):
        mctl.Dict.from_name("nope")["x"]
    with pytest.raises(NotFoundError, match="Queue 'nope' not found"):
        mctl.Queue.from_name("nope").put(1)
    q = mctl.Queue.from_name("limits", create_if_missing=True)
    with pytest.raises(RequestSizeError, match="1 MiB"):
        q.put(b"x" * (1024 * 1024 + 1))
    d = mctl.Dict.from_name("limits", create_if_missing=True)
    with pytest.raises(RequestSizeError, match="32 MiB"):
        d["big"] = b"x" * (32 * 1024 * 1024 + 1)
    q.put_many(list(range(5000)))
    with pytest.raises(queue.Full):
        q.put(1, block=False)
    start = time.monotonic()
    with pytest.raises(queue.Full):
        q.put(1, timeout=0.5)
    assert time.monotonic() - start >= 0.45
    mctl.Queue.delete("limits")
    with pytest.raises(NotFoundError):
        mctl.Queue.delete("limits")
    mctl.Queue.delete("limits", allow_missing=True)


def test_ephemeral_objects_and_aio(server_process):
    with mctl.Dict.ephemeral() as d, mctl.Queue.ephemeral() as q:
        d["a"] = 1
        q.put(2)
        assert d["a"] == 1 and q.get() == 2 and d.name is None
        object_id = d.object_id
    with pytest.raises(NotFoundError, match="no longer exists"):
        mctl.Dict(object_id=object_id)["a"]

    async def main():
        async with mctl.Queue.ephemeral() as q:
            await q.put_many.aio([1, 2])
            assert await q.len.aio() == 2
            assert [x async for x in q.iterate.aio()] == [1, 2]
            assert await q.get_many.aio(2) == [1, 2]
            with pytest.raises(queue.Empty):
                await q.get.aio(timeout=0.2)

    asyncio.run(main())


def test_modal_module_paths():
    from mctl.dict import Dict
    from mctl.queue import Queue

    assert Dict is mctl.Dict and Queue is mctl.Queue


def cli(*args, input=None):
    from mctl.cli.main import cli as group

    return CliRunner().invoke(group, list(args), input=input, catch_exceptions=False)


def test_cli(server_process):
    d = mctl.Dict.from_name("cli-d", create_if_missing=True)
    d.update({"alpha": 1, "beta": [2]})
    q = mctl.Queue.from_name("cli-q", create_if_missing=True)
    q.put_many(["one", "two"])
    q.put("p", partition="x")

    out = cli("dict", "list").output
    assert "cli-d" in out and " 2 " in out
    assert "'alpha'" in cli("dict", "items", "cli-d").output
    assert cli("dict", "get", "cli-d", "beta").output.strip() == "[2]"
    result = cli("dict", "get", "cli-d", "gamma")
    assert result.exit_code == 1 and "no key 'gamma'" in result.output
    assert cli("dict", "clear", "cli-d", "--yes").exit_code == 0 and d.len() == 0

    assert "cli-q" in cli("queue", "list").output
    assert cli("queue", "peek", "cli-q", "2").output.split() == ["'one'", "'two'"]
    assert cli("queue", "len", "cli-q").output.strip() == "2"
    assert cli("queue", "len", "cli-q", "--total").output.strip() == "3"
    cli("queue", "clear", "cli-q", "--partition", "x", "--yes")
    assert q.len(total=True) == 2
    assert cli("queue", "delete", "cli-q", input="n\n").exit_code == 1  # not confirmed
    assert cli("queue", "delete", "cli-q", "--yes").exit_code == 0
    assert cli("dict", "delete", "cli-d", "--yes").exit_code == 0
    assert "cli-d" not in cli("dict", "list").output
    result = cli("dict", "delete", "cli-d", "--yes")
    assert result.exit_code == 1 and "--allow-missing" in result.output


def test_tokens_and_scopes(server_process, monkeypatch):
    from mctl.exception import AuthError
    from test_auth import create_token

    mctl.Dict.from_name("scoped", create_if_missing=True)["k"] = 1
    invoke = create_token("invoke", "dq-invoke")
    monkeypatch.setenv("MCTL_TOKEN", invoke)
    d = mctl.Dict.from_name("scoped")  # a new handle: a new connection with this token
    import threading

    result = {}

    def use():  # a fresh thread: its own kept-alive connection, with the invoke token
        result["value"] = d["k"]
        try:
            mctl.Dict.delete("scoped")
        except AuthError as exc:
            result["error"] = str(exc)

    thread = threading.Thread(target=use)
    thread.start()
    thread.join(30)
    assert result["value"] == 1 and "needs scope deploy" in result["error"]

    monkeypatch.setenv("MCTL_TOKEN", "mctl_wrong")
    thread = threading.Thread(target=lambda: result.update(
        bad=pytest.raises(AuthError, mctl.Dict.from_name("scoped").get, "k")))
    thread.start()
    thread.join(30)
    assert "invalid token" in str(result["bad"].value).lower()


def test_partition_ttl_clears_a_partition_after_its_last_put(server_process):
    """Modal's semantics: a partition is cleared `partition_ttl` seconds after its last put
    (default 24 hours); another put pushes the time back; other partitions are untouched."""
    q = mctl.Queue.from_name("ttl", create_if_missing=True)
    q.put("short", partition="a", partition_ttl=2)
    q.put_many(["x", "y"], partition="b", partition_ttl=60)
    q.put("default")  # 24 hours
    time.sleep(1.2)
    q.put("again", partition="a", partition_ttl=2)  # the partition's clock starts over
    time.sleep(1.2)
    assert q.len(partition="a") == 2
    time.sleep(1.5)
    assert q.len(partition="a") == 0 and q.get(partition="a", block=False) is None
    assert list(q.iterate(partition="b")) == ["x", "y"] and q.get() == "default"
    assert q.len(total=True) == 2
    q.put("new", partition="a", partition_ttl=2)  # a cleared partition starts afresh
    assert q.get(partition="a") == "new"

    # expiry survives a restart: the time is stored with the partition
    q.put("gone", partition="c", partition_ttl=2)
    server_process.stop()
    time.sleep(2.2)
    server_process.start()
    assert mctl.Queue.from_name("ttl").len(partition="c") == 0

    with pytest.raises(InvalidError, match="partition_ttl=0 must be"):
        q.put(1, partition_ttl=0)
    with pytest.raises(InvalidError, match="at most 86400"):
        q.put(1, partition_ttl=90000)
