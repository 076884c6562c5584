"""The client's view of volumes (listdir, read_file, batch_upload, ... and `mctl volume`), through a
real control plane, on the store driver (the default) and the local one."""

import io
import json
import os

import pytest

import mctl
from mctl.exception import AlreadyExistsError, InvalidError, NotFoundError
from mctl.sdk.volume import FileEntryType

pytestmark = pytest.mark.integration


def paths(entries):
    return [(e.path, e.type) for e in entries]


@pytest.fixture(params=["store", "local"])
def driver(request, monkeypatch):
    """The volume driver of the server started after it (`server_process`)."""
    monkeypatch.setenv("MCTL_VOLUME_DRIVER", request.param)
    return request.param


def test_upload_list_read_copy_remove(driver, server_process, tmp_path, isolated_home):
    vol = mctl.Volume.from_name("data", create_if_missing=True)
    local = tmp_path / "local"
    (local / "sub").mkdir(parents=True)
    (local / "a.txt").write_text("alpha")
    (local / "sub" / "b.bin").write_bytes(bytes(range(256)) * 8192)  # 2 MiB: several chunks
    with vol.batch_upload() as batch:
        batch.put_directory(local, "/inputs")
        batch.put_file(io.BytesIO(b"from memory"), "/notes/mem.txt")
        batch.put_file(local / "a.txt", "top.txt", mode=0o600)

    assert paths(vol.listdir("/")) == [("inputs", FileEntryType.DIRECTORY),
                                       ("notes", FileEntryType.DIRECTORY),
                                       ("top.txt", FileEntryType.FILE)]
    assert [e.path for e in vol.iterdir("/inputs")] == ["inputs/a.txt", "inputs/sub",
                                                        "inputs/sub/b.bin"]
    assert [e.path for e in vol.listdir("inputs")] == ["inputs/a.txt", "inputs/sub"]
    [entry] = vol.listdir("/inputs/sub/b.bin")
    assert entry.size == 2 * 1024 * 1024 and entry.mtime > 0
    assert b"".join(vol.read_file("/inputs/sub/b.bin")) == bytes(range(256)) * 8192
    assert b"".join(vol.read_file("notes/mem.txt")) == b"from memory"
    if driver == "local":
        on_disk = isolated_home / "volumes" / "data"
        assert oct(os.stat(on_disk / "top.txt").st_mode & 0o777) == "0o600"
    else:
        on_disk = isolated_home / "volume-store"
        manifest = json.loads((on_disk / "volumes/data/manifest.json").read_text())
        assert oct(manifest["entries"]["top.txt"]["mode"]) == "0o600"

    # an existing file is kept unless force=True, and nothing half-written is left
    with pytest.raises(FileExistsError, match="force"):
        with vol.batch_upload() as batch:
            batch.put_file(io.BytesIO(b"other"), "top.txt")
    assert b"".join(vol.read_file("top.txt")) == b"alpha"
    with vol.batch_upload(force=True) as batch:
        batch.put_file(io.BytesIO(b"replaced"), "top.txt")
    assert b"".join(vol.read_file("top.txt")) == b"replaced"
    assert not [p for p in on_disk.rglob("*") if ".mctl-upload-" in p.name]

    vol.copy_files(["top.txt"], "copy.txt")
    vol.copy_files(["top.txt", "inputs/sub"], "/backup")
    assert b"".join(vol.read_file("copy.txt")) == b"replaced"
    assert [e.path for e in vol.listdir("backup", recursive=True)] == [
        "backup/sub", "backup/sub/b.bin", "backup/top.txt"]

    with pytest.raises(IsADirectoryError, match="recursive"):
        vol.remove_file("backup")
    vol.remove_file("backup", recursive=True)
    vol.remove_file("/copy.txt")
    assert "copy.txt" not in [e.path for e in vol.listdir("/")]
    with pytest.raises(FileNotFoundError, match="copy.txt"):
        vol.remove_file("copy.txt")
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        b"".join(vol.read_file("nothing-here"))
    with pytest.raises(FileNotFoundError):
        vol.listdir("/missing")
    with pytest.raises(InvalidError, match="leaves the volume"):
        vol.listdir("../../")
    with pytest.raises(NotFoundError, match="does not exist"):
        mctl.Volume.from_name("never-made").listdir("/")


def test_function_sees_what_the_client_uploaded(driver, server_process, tmp_path):
    from test_deploy import mctl_cli

    vol = mctl.Volume.from_name("shared", create_if_missing=True)
    with vol.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"hello from the client"), "in.txt")
    app_file = tmp_path / "vol_app.py"
    app_file.write_text(
        "import json, os\nimport mctl\napp = mctl.App('vol-app')\n"
        "vol = mctl.Volume.from_name('shared')\n"
        f"MOUNT = {str(tmp_path / 'mnt' / 'data')!r}\n"
        "@app.function(volumes={MOUNT: vol})\n"
        "def echo():\n"
        "    root = MOUNT\n"
        "    text = open(os.path.join(root, 'in.txt')).read()\n"
        "    with open(os.path.join(root, 'out.txt'), 'w') as fh:\n"
        "        fh.write(text.upper())\n"
        "    return text\n")
    mctl_cli("deploy", str(app_file))
    assert mctl.Function.from_name("vol-app", "echo").remote() == "hello from the client"
    assert b"".join(vol.read_file("out.txt")) == b"HELLO FROM THE CLIENT"


def test_cli(server_process, tmp_path):
    from test_deploy import mctl_cli

    assert "Created volume models" in mctl_cli("volume", "create", "models").stdout
    out = mctl_cli("volume", "create", "models", check=False)
    assert out.returncode != 0 and "Volume 'models' exists" in out.stderr
    assert [v["name"] for v in json.loads(mctl_cli("volume", "list", "--json").stdout)] == [
        "models"]

    (tmp_path / "weights.bin").write_bytes(b"\x00\x01weights")
    (tmp_path / "dir" / "deep").mkdir(parents=True)
    (tmp_path / "dir" / "deep" / "x.txt").write_text("x")
    mctl_cli("volume", "put", "models", str(tmp_path / "weights.bin"), "/v1/")
    mctl_cli("volume", "put", "models", str(tmp_path / "dir"), "/tree")
    out = mctl_cli("volume", "put", "models", str(tmp_path / "weights.bin"), "/v1/", check=False)
    assert out.returncode != 0 and "exists" in out.stderr and "--force" in out.stderr
    mctl_cli("volume", "put", "models", str(tmp_path / "weights.bin"), "/v1/", "--force")

    rows = json.loads(mctl_cli("volume", "ls", "models", "/", "-r", "--json").stdout)
    assert [(r["path"], r["type"]) for r in rows] == [
        ("tree", "directory"), ("tree/deep", "directory"), ("tree/deep/x.txt", "file"),
        ("v1", "directory"), ("v1/weights.bin", "file")]
    assert "v1/weights.bin" in mctl_cli("volume", "ls", "models", "v1").stdout

    out = mctl_cli("volume", "get", "models", "v1/weights.bin", "-")
    assert out.stdout == "\x00\x01weights"
    mctl_cli("volume", "get", "models", "v1/weights.bin", str(tmp_path / "down"))
    assert (tmp_path / "down").read_bytes() == b"\x00\x01weights"
    out = mctl_cli("volume", "get", "models", "v1/nope", str(tmp_path / "nope"), check=False)
    assert out.returncode != 0 and "No file or directory 'v1/nope'" in out.stderr
    assert not (tmp_path / "nope").exists()

    out = mctl_cli("volume", "rm", "models", "tree", check=False)
    assert out.returncode != 0 and "-r" in out.stderr
    mctl_cli("volume", "rm", "models", "tree", "-r")
    assert [r["path"] for r in json.loads(
        mctl_cli("volume", "ls", "models", "--json").stdout)] == ["v1"]

    mctl_cli("volume", "delete", "models", "--yes")
    out = mctl_cli("volume", "ls", "models", check=False)
    assert out.returncode != 0 and "does not exist" in out.stderr
    out = mctl_cli("volume", "delete", "models", "--yes", check=False)
    assert out.returncode != 0 and "No volume named 'models'" in out.stderr
    assert mctl_cli("volume", "delete", "models", "--yes", "--allow-missing").returncode == 0
    with pytest.raises(AlreadyExistsError):
        from mctl.sdk.volume import create_volume

        create_volume("again")
        create_volume("again")
