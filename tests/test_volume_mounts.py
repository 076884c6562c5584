"""Volumes at their mount paths in workers (a mount namespace per worker on the local backend),
across workers, and a missing volume failing deploy."""

import os
import textwrap

import pytest

import mctl
from mctl.core import mount_namespace

pytestmark = pytest.mark.integration

needs_namespace = pytest.mark.skipif(
    not mount_namespace.method() and not os.environ.get("MCTL_REQUIRE_SERVERS"),
    reason="no way to make a mount namespace here (root with unshare, or bubblewrap)")


def write_app(tmp_path, body, volume="notes", create=True):
    app_file = tmp_path / "mount_app.py"
    app_file.write_text(textwrap.dedent(f"""\
        import os
        import mctl
        app = mctl.App('mount-app')
        vol = mctl.Volume.from_name({volume!r}, create_if_missing={create})
        MOUNT = {str(tmp_path / "mnt" / "data")!r}
        """) + textwrap.dedent(body))
    return app_file


WRITER_READER = """
    @app.function(volumes={MOUNT: vol})
    def write(text):
        os.makedirs(MOUNT + '/sub', exist_ok=True)
        with open(MOUNT + '/sub/note.txt', 'w') as fh:
            fh.write(text)
        vol.commit()
        return os.getpid()

    @app.function(volumes={MOUNT: vol})
    def read():
        vol.reload()
        with open(MOUNT + '/sub/note.txt') as fh:
            return fh.read(), os.getpid()
    """


@needs_namespace
def test_file_written_in_one_worker_is_read_in_another(server_process, tmp_path):
    from test_deploy import mctl_cli

    mctl_cli("deploy", str(write_app(tmp_path, WRITER_READER)))
    writer_pid = mctl.Function.from_name("mount-app", "write").remote("hello from a worker")
    text, reader_pid = mctl.Function.from_name("mount-app", "read").remote()
    assert text == "hello from a worker" and reader_pid != writer_pid
    # the client sees it too, and the bind lived in the workers' namespaces only
    assert b"".join(mctl.Volume.from_name("notes").read_file("sub/note.txt")) == \
        b"hello from a worker"
    assert os.listdir(tmp_path / "mnt" / "data") == []


@needs_namespace
def test_two_writers_of_one_file_last_writer_wins(server_process, tmp_path):
    from test_deploy import mctl_cli

    app_file = write_app(tmp_path, """
        @app.function(volumes={MOUNT: vol}, max_containers=2)
        def write(letter, rounds):
            for _ in range(rounds):
                with open(MOUNT + '/same.bin', 'wb') as fh:
                    fh.write(letter.encode() * (1 << 20))
                vol.commit()
            return letter
        """)
    mctl_cli("deploy", str(app_file))
    write = mctl.Function.from_name("mount-app", "write")
    assert sorted(write.map(["a", "b"], [30, 30])) == ["a", "b"]
    data = b"".join(mctl.Volume.from_name("notes").read_file("same.bin"))
    assert len(data) == 1 << 20 and data in (b"a" * (1 << 20), b"b" * (1 << 20))
    write.remote("c", 1)  # a later writer replaces it whole
    assert b"".join(mctl.Volume.from_name("notes").read_file("same.bin")) == b"c" * (1 << 20)


def test_missing_volume_fails_deploy(server_process, tmp_path):
    from test_deploy import mctl_cli

    app_file = write_app(tmp_path, WRITER_READER, volume="never-made", create=False)
    out = mctl_cli("deploy", str(app_file), check=False)
    assert out.returncode != 0
    assert "Volume 'never-made' does not exist" in out.stderr and "create_if_missing" in out.stderr
    assert "never-made" not in [v["name"] for v in mctl.sdk.volume.list_volumes()]

    # made beforehand, the same app deploys
    from mctl.sdk.volume import create_volume

    create_volume("never-made")
    mctl_cli("deploy", str(app_file))


def test_volume_deleted_after_deploy_fails_its_calls(server_process, tmp_path):
    """A volume deleted under a deployed app is never silently made again, empty."""
    from test_deploy import mctl_cli
    from mctl.sdk.volume import delete_volume

    mctl_cli("deploy", str(write_app(tmp_path, WRITER_READER)))
    delete_volume("notes")
    with pytest.raises(Exception, match="notes"):
        mctl.Function.from_name("mount-app", "write").remote("lost")
    assert "notes" not in [v["name"] for v in mctl.sdk.volume.list_volumes()]


def test_app_run_creates_volume_if_missing(server_process, tmp_path):
    vol = mctl.Volume.from_name("made-by-run", create_if_missing=True)
    app = mctl.App("run-vol")

    @app.function(volumes={str(tmp_path / "mnt" / "r"): vol}, serialized=True)
    def noop():
        return 1

    with app.run():
        assert noop.remote() == 1
    assert "made-by-run" in [v["name"] for v in mctl.sdk.volume.list_volumes()]

    missing = mctl.App("run-missing")

    @missing.function(volumes={"/x": mctl.Volume.from_name("not-there")}, serialized=True)
    def other():
        return 1

    with pytest.raises(mctl.exception.NotFoundError, match="'not-there' does not exist"):
        with missing.run():
            pass


@needs_namespace
def test_a_read_only_mount_refuses_writes_and_keeps_the_data(server_process, tmp_path):
    from test_deploy import mctl_cli

    app_file = write_app(tmp_path, WRITER_READER + """
    @app.function(volumes={MOUNT: vol.read_only()})
    def overwrite():
        with open(MOUNT + '/sub/note.txt') as fh:
            before = fh.read()
        try:
            with open(MOUNT + '/sub/note.txt', 'w') as fh:
                fh.write('clobbered')
        except OSError as exc:
            return before, str(exc)
        return before, 'written'
    """)
    mctl_cli("deploy", str(app_file))
    mctl.Function.from_name("mount-app", "write").remote("keep me")
    before, error = mctl.Function.from_name("mount-app", "overwrite").remote()
    assert before == "keep me" and "Read-only file system" in error
    assert mctl.Function.from_name("mount-app", "read").remote()[0] == "keep me"


def test_without_a_mount_namespace_a_function_with_volumes_fails_saying_what_to_install(
        tmp_path, isolated_home, monkeypatch):
    from conftest import ServerProcess, free_port
    from test_deploy import mctl_cli

    empty = tmp_path / "empty-bin"  # neither unshare nor bwrap on the server's PATH
    empty.mkdir()
    srv = ServerProcess(tmp_path / "state", free_port(), dict(os.environ, PATH=str(empty)))
    srv.start()
    monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
    try:
        mctl_cli("deploy", str(write_app(tmp_path, WRITER_READER)))
        with pytest.raises(mctl.exception.ExecutionError, match="install bubblewrap|Install "
                                                                "bubblewrap"):
            mctl.Function.from_name("mount-app", "write").remote("nowhere")
        assert not (tmp_path / "mnt" / "data").exists()
    finally:
        srv.stop()
