"""The `store` volume driver against a real control plane: working copies that commit and reload
only what changed, Modal's visibility rules, a full store, racing commits, task-token scoping."""

import errno
import io
import os
import shutil
import subprocess
import textwrap
import threading

import pytest

import mctl
from conftest import ServerProcess, free_port
from test_images_build import images_dev  # noqa: F401 - a fixture: podman, buildah, the base
from mctl.core import mount_namespace
from mctl.core.volume_sync import WorkingCopy

pytestmark = pytest.mark.integration

needs_namespace = pytest.mark.skipif(
    not mount_namespace.method() and not os.environ.get("MCTL_REQUIRE_SERVERS"),
    reason="no way to make a mount namespace here (root with unshare, or bubblewrap)")


def copy(server, tmp_path, name, volume="vol"):
    directory = tmp_path / "copies" / name
    directory.mkdir(parents=True)
    return WorkingCopy(server.url, volume, "/data", str(directory), read_only=False)


def test_commit_and_reload_move_only_what_changed(server_process, tmp_path):
    from mctl.sdk.volume import create_volume

    create_volume("vol")
    a, b = copy(server_process, tmp_path, "a"), copy(server_process, tmp_path, "b")
    a.reload()
    (tmp_path / "copies/a/big.bin").write_bytes(os.urandom(8 << 20))
    os.makedirs(tmp_path / "copies/a/many")
    for i in range(300):
        (tmp_path / f"copies/a/many/{i}.txt").write_text(f"file {i}\n" * 100)
    (tmp_path / "copies/a/same1").write_bytes(b"twin" * 1000)
    (tmp_path / "copies/a/same2").write_bytes(b"twin" * 1000)  # one object for both
    assert a.commit() == 304
    assert a.moved["files_up"] == 302
    assert a.commit() == 0  # nothing changed: nothing travels
    assert a.moved["files_up"] == 302

    b.reload()
    assert (tmp_path / "copies/b/big.bin").read_bytes() == \
        (tmp_path / "copies/a/big.bin").read_bytes()
    assert (tmp_path / "copies/b/many/299.txt").read_text() == "file 299\n" * 100
    assert (tmp_path / "copies/b/same2").read_bytes() == b"twin" * 1000
    down = dict(b.moved)

    # one changed file, one removed, one touched but unchanged: only the change travels
    (tmp_path / "copies/a/many/7.txt").write_text("changed\n")
    os.unlink(tmp_path / "copies/a/many/8.txt")
    os.utime(tmp_path / "copies/a/big.bin", (1, 1))
    up = a.moved["up"]
    assert a.commit() == 2
    assert a.moved["up"] - up == len("changed\n")
    b.reload()
    assert b.moved["down"] - down["down"] == len("changed\n")
    assert (tmp_path / "copies/b/many/7.txt").read_text() == "changed\n"
    assert not (tmp_path / "copies/b/many/8.txt").exists()

    # a reload keeps what this copy changed and did not commit
    (tmp_path / "copies/b/many/9.txt").write_text("mine, uncommitted\n")
    (tmp_path / "copies/a/many/10.txt").write_text("theirs\n")
    a.commit()
    b.reload()
    assert (tmp_path / "copies/b/many/9.txt").read_text() == "mine, uncommitted\n"
    assert (tmp_path / "copies/b/many/10.txt").read_text() == "theirs\n"
    # and the client API sees the committed tree
    vol = mctl.Volume.from_name("vol")
    assert b"".join(vol.read_file("many/10.txt")) == b"theirs\n"
    assert "many/8.txt" not in {e.path for e in vol.listdir("/", recursive=True)}


def test_racing_commits_of_one_file_leave_one_whole_file(server_process, tmp_path):
    """Two copies commit different-length contents to one path over and over, at the same
    time: the file is always one writer's whole content, and the last commit wins."""
    from mctl.sdk.volume import create_volume

    create_volume("vol")
    copies = {"a": copy(server_process, tmp_path, "a"), "b": copy(server_process, tmp_path, "b")}
    contents = {"a": b"a" * (3 << 20), "b": b"b" * (1 << 20) + b"tail"}
    errors = []

    def writer(key):
        try:
            for i in range(15):
                path = tmp_path / "copies" / key / "same.bin"
                path.write_bytes(contents[key] + str(i).encode())
                copies[key].commit()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in copies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    data = b"".join(mctl.Volume.from_name("vol").read_file("same.bin"))
    assert data in {contents[k] + b"14" for k in copies}, data[:20]
    copies["a"].reload()  # a later commit replaces it whole
    (tmp_path / "copies/a/same.bin").write_bytes(b"last")
    copies["a"].commit()
    assert b"".join(mctl.Volume.from_name("vol").read_file("same.bin")) == b"last"


@pytest.fixture
def small_store(tmp_path):
    """A 4 MiB tmpfs for the control plane's volume store (needs root to mount)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = tmp_path / "small-store"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_store_fails_the_commit_clearly_and_keeps_what_was_committed(
        small_store, tmp_path, isolated_home, monkeypatch):
    from mctl.sdk.volume import create_volume

    srv = ServerProcess(tmp_path / "state", free_port(),
                        dict(os.environ, MCTL_VOLUME_STORE=str(small_store)))
    srv.start()
    monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
    try:
        create_volume("vol")
        a, b = copy(srv, tmp_path, "a"), copy(srv, tmp_path, "b")
        (tmp_path / "copies/a/kept.txt").write_text("committed before the disk filled\n")
        a.commit()
        (tmp_path / "copies/a/kept.txt").write_text("a change that will not fit\n")
        (tmp_path / "copies/a/huge.bin").write_bytes(os.urandom(6 << 20))
        with pytest.raises(OSError) as caught:
            a.commit()
        assert caught.value.errno == errno.ENOSPC
        assert "volume store" in str(caught.value) and "is full" in str(caught.value)
        assert "the last commit is intact" in str(caught.value)
        # nothing of the failed commit is visible; what was committed before is whole
        b.reload()
        assert (tmp_path / "copies/b/kept.txt").read_text() == "committed before the disk filled\n"
        assert not (tmp_path / "copies/b/huge.bin").exists()
        assert not [p for p in small_store.rglob(".upload.*")]  # no half-written object left
        # the client API's upload says the same
        vol = mctl.Volume.from_name("vol")
        with pytest.raises(OSError, match="is full"):
            with vol.batch_upload(force=True) as batch:
                batch.put_file(str(tmp_path / "copies/a/huge.bin"), "huge.bin")
        assert b"".join(vol.read_file("kept.txt")) == b"committed before the disk filled\n"
        # once there is room again, the same commit goes through
        (tmp_path / "copies/a/huge.bin").write_bytes(os.urandom(1 << 20))
        a.commit()
        b.reload()
        assert (tmp_path / "copies/b/kept.txt").read_text() == "a change that will not fit\n"
    finally:
        srv.stop()


def test_a_working_copy_without_room_says_where_and_what_to_set(server_process, small_store,
                                                                 tmp_path):
    from mctl.sdk.volume import create_volume

    create_volume("vol")
    a = copy(server_process, tmp_path, "a")
    (tmp_path / "copies/a/big.bin").write_bytes(os.urandom(6 << 20))
    a.commit()
    b = WorkingCopy(server_process.url, "vol", "/data", str(small_store), read_only=False)
    with pytest.raises(OSError, match=r"No space for the working copy of volume 'vol' at .*"
                                      r"MCTL_VOLUME_SCRATCH") as caught:
        b.reload()
    assert caught.value.errno == errno.ENOSPC
    assert not [p for p in small_store.rglob(".mctl-sync-*")]  # no partial file left behind


def write_app(tmp_path, body):
    app_file = tmp_path / "store_app.py"
    app_file.write_text(textwrap.dedent(f"""\
        import os
        import mctl
        app = mctl.App('store-app')
        vol = mctl.Volume.from_name('notes', create_if_missing=True)
        other = mctl.Volume.from_name('other', create_if_missing=True)
        MOUNT = {str(tmp_path / "mnt" / "data")!r}
        """) + textwrap.dedent(body))
    return app_file


@needs_namespace
def test_workers_see_others_commits_after_reload_and_commit_on_return(server_process, tmp_path):
    """Modal's rules: a container sees the volume as it was when it started until it reloads;
    a function's writes are committed when it returns, without an explicit commit."""
    from test_deploy import mctl_cli

    mctl_cli("deploy", str(write_app(tmp_path, """
        import time

        @app.function(volumes={MOUNT: vol})
        def write(text):  # no vol.commit(): committed when it returns
            with open(MOUNT + '/note.txt', 'w') as fh:
                fh.write(text)
            return os.getpid()

        @app.function(volumes={MOUNT: vol}, scaledown_window=60)
        def read(reload):
            if reload:
                vol.reload()
            try:
                with open(MOUNT + '/note.txt') as fh:
                    return fh.read(), os.getpid(), os.path.realpath(MOUNT)
            except FileNotFoundError:
                return None, os.getpid(), None

        @app.function(volumes={MOUNT: vol})
        def sneak():  # syncing a volume this function does not mount is refused
            from mctl.core.volume_sync import WorkingCopy
            os.makedirs('/tmp/sneak', exist_ok=True)
            try:
                WorkingCopy(os.environ['MCTL_SERVER_URL'], 'other', '/x', '/tmp/sneak',
                            False).reload()
            except PermissionError as exc:
                return str(exc)
            return 'read it'
        """)))
    write = mctl.Function.from_name("store-app", "write")
    read = mctl.Function.from_name("store-app", "read")
    assert read.remote(False)[0] is None  # a reader started before any commit...
    writer_pid = write.remote("first")
    text, reader_pid, _ = read.remote(False)
    assert text is None and reader_pid != writer_pid  # ...does not see it without reload
    assert read.remote(True)[0] == "first"
    write.remote("second")
    assert read.remote(False)[0] == "first"
    assert read.remote(True)[0] == "second"
    assert b"".join(mctl.Volume.from_name("notes").read_file("note.txt")) == b"second"
    assert "does not mount volume 'other'" in mctl.Function.from_name("store-app",
                                                                         "sneak").remote()


@needs_namespace
def test_a_function_whose_commit_does_not_fit_fails_with_the_reason(
        small_store, tmp_path, isolated_home, monkeypatch):
    from test_deploy import mctl_cli

    srv = ServerProcess(tmp_path / "state", free_port(),
                        dict(os.environ, MCTL_VOLUME_STORE=str(small_store),
                             MCTL_VOLUME_SCRATCH=str(tmp_path / "scratch")))
    srv.start()
    monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
    try:
        mctl_cli("deploy", str(write_app(tmp_path, """
            @app.function(volumes={MOUNT: vol})
            def write(name, size):
                with open(MOUNT + '/' + name, 'wb') as fh:
                    fh.write(os.urandom(size))
                return size
            """)))
        write = mctl.Function.from_name("store-app", "write")
        assert write.remote("small.bin", 1 << 20) == 1 << 20
        with pytest.raises(OSError, match="volume store .* is full"):
            write.remote("big.bin", 8 << 20)
        names = {e.path for e in mctl.Volume.from_name("notes").listdir("/")}
        assert names == {"small.bin"}
        mctl_cli("app", "stop", "store-app")
        # the workers removed their working copies as they stopped
        from conftest import wait_until

        assert wait_until(lambda: not any((tmp_path / "scratch").rglob("*")), 30), \
            list((tmp_path / "scratch").rglob("*"))
    finally:
        srv.stop()
        shutil.rmtree(tmp_path / "scratch", ignore_errors=True)


CONTAINER_APP = """
import os
import mctl

app = mctl.App("store-oci")
vol = mctl.Volume.from_name("boxed", create_if_missing=True)
image = mctl.Image.debian_slim().apt_install("jq")  # the image test's image: built once

@app.function(image=image, volumes={"/data": vol})
def write(text):
    os.makedirs("/data/sub", exist_ok=True)
    with open("/data/sub/note.txt", "w") as fh:
        fh.write(text)
    return os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv")

@app.function(image=image, volumes={"/data": vol.read_only()})
def read():
    vol.reload()
    text = open("/data/sub/note.txt").read()
    try:
        open("/data/sub/note.txt", "w").write("clobbered")
    except OSError as exc:
        return text, exc.errno
    return text, None
"""


def test_containers_get_working_copies_too(images_dev, tmp_path, isolated_home, monkeypatch):
    import errno as errnos

    from test_deploy import mctl_cli

    for key, value in images_dev.items():
        monkeypatch.setenv(key, value)
    srv = ServerProcess(tmp_path / "server-state", free_port(),
                        dict(os.environ, MCTL_VOLUME_SCRATCH=str(tmp_path / "scratch")))
    srv.start()
    monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
    try:
        app_file = tmp_path / "store_oci.py"
        app_file.write_text(CONTAINER_APP)
        mctl_cli("deploy", str(app_file))
        assert mctl.Function.from_name("store-oci", "write").remote("in a container") is True
        assert mctl.Function.from_name("store-oci", "read").remote() == (
            "in a container", errnos.EROFS)
        assert b"".join(mctl.Volume.from_name("boxed").read_file("sub/note.txt")) == \
            b"in a container"
        mctl_cli("app", "stop", "store-oci")
    finally:
        srv.stop()


@needs_namespace
def test_an_ephemeral_volume_lives_for_its_with_block(server_process, tmp_path):
    app = mctl.App("ephemeral-vol")
    mount = str(tmp_path / "mnt" / "eph")

    with mctl.Volume.ephemeral() as vol:
        @app.function(volumes={mount: vol}, serialized=True)
        def shout():
            text = open(mount + "/in.txt").read()
            with open(mount + "/out.txt", "w") as fh:
                fh.write(text.upper())
            return text

        with vol.batch_upload() as batch:
            batch.put_file(io.BytesIO(b"quiet"), "in.txt")
        with app.run():
            assert shout.remote() == "quiet"
        assert b"".join(vol.read_file("out.txt")) == b"QUIET"  # committed when it returned
        name = vol.name
        assert name in [v["name"] for v in mctl.sdk.volume.list_volumes()]
    assert name not in [v["name"] for v in mctl.sdk.volume.list_volumes()]


@needs_namespace
def test_a_web_endpoints_writes_are_committed_after_its_response(server_process, tmp_path):
    import urllib.request

    from conftest import wait_until
    from test_deploy import mctl_cli

    mctl_cli("deploy", str(write_app(tmp_path, """
        @app.function(volumes={MOUNT: vol})
        @mctl.fastapi_endpoint(method="GET")
        def visit(who: str):
            with open(MOUNT + '/visitor.txt', 'w') as fh:
                fh.write(who)
            return {"hello": who}
        """)))
    url = mctl.Function.from_name("store-app", "visit").get_web_url()
    with urllib.request.urlopen(url + "?who=ada", timeout=60) as resp:
        assert resp.read() == b'{"hello":"ada"}'
    vol = mctl.Volume.from_name("notes")
    assert wait_until(lambda: "visitor.txt" in {e.path for e in vol.listdir("/")}, 20)
    assert b"".join(vol.read_file("visitor.txt")) == b"ada"


def test_collection_removes_only_contents_no_volume_names(tmp_path, monkeypatch):
    from mctl.plugins import volumes_store as store

    monkeypatch.setenv("MCTL_VOLUME_STORE", str(tmp_path / "store"))
    store.mount("v", True)

    def put(data):
        sha = store.store_object(io.BytesIO(data).read, len(data))
        store.commit("v", {"f.txt": {"type": "file", "sha": sha, "size": len(data),
                                     "mode": 0o644, "mtime": 1}})
        return sha

    old, new = put(b"old"), put(b"new")
    assert store.gc(min_age_s=3600) == 0  # young objects are left alone
    assert store.gc(min_age_s=0) == 1
    assert not store.object_path(old).exists() and store.object_path(new).exists()
    assert store.Files.listdir("v", "/", False)[0]["path"] == "f.txt"


def test_a_home_with_volumes_of_the_older_default_keeps_them_working(tmp_path, isolated_home,
                                                                     monkeypatch):
    """An upgrade must not hide volumes: a home whose volumes the `local` driver (the default
    before `store`) keeps stays on `local`, says so at start, and says how to move."""
    from conftest import ServerProcess, free_port

    (isolated_home / "volumes" / "from-before").mkdir(parents=True)
    (isolated_home / "volumes" / "from-before" / "kept.txt").write_text("still here")
    monkeypatch.delenv("MCTL_VOLUME_DRIVER", raising=False)
    srv = ServerProcess(tmp_path / "state", free_port(), dict(os.environ))
    srv.start()
    monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
    try:
        log = (tmp_path / "server.log").read_text()
        assert "Volumes from-before are in" in log and "MCTL_VOLUME_DRIVER=store" in log
        assert b"".join(mctl.Volume.from_name("from-before").read_file("kept.txt")) == \
            b"still here"
    finally:
        srv.stop()
