"""Sandboxes for real: podman with gVisor (runsc) and runc, no fakes. Each escape test runs the
escape and checks the host, not the flags.

Needs podman, runsc and runc (`scripts/sandbox-dev install`) and the debian_slim base image
(`scripts/images-dev up`); skips without them, fails under MCTL_REQUIRE_SERVERS=1 (as CI runs).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest

import mctl
from mctl.core import sandbox_runtime
from mctl.exception import InvalidError, NotFoundError, SandboxTimeoutError

BASE = os.environ.get("MCTL_IMAGE_BASE_DEBIAN_SLIM", sandbox_runtime.DEFAULT_IMAGE)
PODMAN_ISOLATIONS = ["gvisor", "runc"]  # also on Slurm nodes (test_sandbox_slurm_escapes)
ISOLATIONS = [*PODMAN_ISOLATIONS, "bwrap"]  # bwrap: image-less, the host's /usr (sandbox_bwrap)


def _problem() -> str | None:
    if not shutil.which("podman"):
        return "podman is not installed (scripts/images-dev up)"
    if not os.access(sandbox_runtime.RUNSC, os.X_OK):
        return "runsc (gVisor) is not installed (scripts/sandbox-dev install)"
    if subprocess.run(["podman", "image", "exists", BASE]).returncode != 0:
        return f"the base image {BASE} is missing (scripts/images-dev up)"
    return None


@pytest.fixture(autouse=True)
def _needs_podman():
    problem = _problem()
    if problem:
        if os.environ.get("MCTL_REQUIRE_SERVERS") == "1":
            pytest.fail(problem)
        pytest.skip(problem)


@pytest.fixture(autouse=True)
def _needs_bwrap(request):
    """The tests run for isolation="bwrap" need what core/sandbox_bwrap needs (root, cgroups,
    bubblewrap, setpriv, libseccomp)."""
    params = getattr(request.node, "callspec", None)
    if params is None or params.params.get("isolation") != "bwrap":
        return
    from mctl.core import sandbox_bwrap

    problem = sandbox_bwrap.problem()
    if problem:
        if os.environ.get("MCTL_REQUIRE_SERVERS") == "1":
            pytest.fail(problem)
        pytest.skip(problem)


@pytest.fixture
def app():
    a = mctl.App("sandbox-tests")
    with a.run():
        yield a


def _leftover(sb) -> list[str]:
    out = subprocess.run(["podman", "ps", "-a", "--filter", f"name=^{sb._record['container']}$",
                          "--format", "{{.ID}}"], capture_output=True, text=True).stdout
    return out.split()


def run(sb, *cmd, timeout=60):
    p = sb.exec(*cmd, timeout=timeout)
    rc = p.wait()
    return rc, p.stdout.read(), p.stderr.read()


# --- the SDK ----------------------------------------------------------------------------------------
def test_exec_output_stdin_and_return_codes(app):
    sb = mctl.Sandbox.create(app=app)
    assert sb.isolation == "gvisor" and sb.object_id.startswith("sb-")
    p = sb.exec("python3", "-c", "import sys; print(6 * 7); print('oops', file=sys.stderr)")
    assert p.stdout.read() == "42\n" and p.stderr.read() == "oops\n" and p.wait() == 0
    assert p.returncode == 0 and p.poll() == 0
    assert sb.exec("python3", "-c", "import os; print(os.getcwd())", workdir="/tmp"
                   ).stdout.read() == "/tmp\n"
    assert sb.exec("printenv", "FOO", env={"FOO": "bar"}).stdout.read() == "bar\n"
    # the Modal reference's agent spells it so: `python`, and .decode() on the text it read
    assert sb.exec("python", "-c", "print(1)").stdout.read().decode() == "1\n"
    p = sb.exec("bash", "-c", "while read line; do echo \"got $line\"; done; exit 3")
    p.stdin.write(b"foo bar\n")
    p.stdin.write("second\n")
    p.stdin.write_eof()
    p.stdin.drain()
    assert p.wait() == 3
    assert list(p.stdout) == ["got foo bar\n", "got second\n"]
    p = sb.exec("bash", "-c", "kill -TERM $$")
    assert p.wait() == 128 + 15  # a signal: 128+n
    sb.terminate()
    assert sb.returncode == 137
    assert not _leftover(sb)


def test_main_command_output_wait_and_lookup(app):
    sb = mctl.Sandbox.create("bash", "-c", "echo out; echo err >&2; sleep 1; exit 5", app=app,
                             name="worker-1", tags={"team": "a"})
    assert mctl.Sandbox.from_id(sb.object_id).object_id == sb.object_id
    assert mctl.Sandbox.from_name("sandbox-tests", "worker-1").object_id == sb.object_id
    assert [s.object_id for s in mctl.Sandbox.list(app_id=app.app_id, tags={"team": "a"})] == [
        sb.object_id]
    assert list(mctl.Sandbox.list(app_id=app.app_id, tags={"team": "b"})) == []
    sb.set_tags({"team": "b"})
    assert sb.get_tags() == {"team": "b"}
    assert sb.poll() is None and sb.returncode is None
    assert sb.wait() == 5 and sb.returncode == 5
    assert sb.stdout.read() == "out\n" and sb.stderr.read() == "err\n"
    with pytest.raises(NotFoundError, match="No running sandbox named"):
        mctl.Sandbox.from_name("sandbox-tests", "worker-1")  # finished
    with pytest.raises(NotFoundError):
        mctl.Sandbox.from_id("sb-doesnotexist")


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_a_missing_command_or_workdir_says_so_in_the_users_words(app, isolation):
    """Not runc's `exec failed: ...` log line (exit 255) or prlimit's complaint about our own
    wrapper: a shell's "command not found" (127), also with a timeout, an env, a workdir.
    (bwrap's agent words it itself: "mctl: CMD: No such file or directory", 127.)"""
    def missing(err: str) -> bool:
        return err == ("nosuchcmd: command not found\n" if isolation != "bwrap"
                       else "mctl: nosuchcmd: No such file or directory\n")

    sb = mctl.Sandbox.create(app=app, isolation=isolation)
    for kwargs in ({}, {"timeout": 30}, {"env": {"A": "b"}}, {"workdir": "/tmp"}):
        p = sb.exec("nosuchcmd", "--flag", **kwargs)
        rc, err = p.wait(), p.stderr.read()
        assert rc == 127 and missing(err), (kwargs, err)
    p = sb.exec("pwd", workdir="/nonexist")
    rc, err = p.wait(), p.stderr.read()
    assert rc != 0 and "/nonexist" in err, err
    if isolation != "bwrap":
        assert rc == 1 and err == ("mctl: workdir /nonexist does not exist in the sandbox (or "
                                   "is not a directory it may enter)\n")
    p = sb.exec("sh", "-c", 'pwd; echo "$1"; exit 4', "sh", "a b", workdir="/tmp")
    assert (p.wait(), p.stdout.read()) == (4, "/tmp\na b\n")
    sb.terminate()
    # the main command too (was catatonit's "failed to exec pid1: No such file...", exit 1)
    main = mctl.Sandbox.create("nosuchcmd", "--flag", app=app, isolation=isolation)
    rc, err = main.wait(), main.stderr.read()
    assert rc == 127 and missing(err), err
    main = mctl.Sandbox.create("sh", "-c", 'echo "$1"; exit 3', "sh", "a b", app=app,
                               isolation=isolation, workdir="/tmp")
    assert main.wait() == 3 and main.stdout.read() == "a b\n"


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_exec_runs_in_the_sandboxs_workdir_by_default(app, isolation):
    sb = mctl.Sandbox.create(app=app, isolation=isolation, workdir="/tmp")
    assert run(sb, "python3", "-c", "import os; print(os.getcwd())")[1] == "/tmp\n"
    assert sb.exec("python3", "-c", "import os; print(os.getcwd())", workdir="/").stdout.read() == "/\n"
    sb.terminate()


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_files_open_and_snapshot(app, isolation, tmp_path):
    sb = mctl.Sandbox.create(app=app, isolation=isolation)
    with sb.open("/tmp/notes.txt", "w") as f:
        f.write("hello\n")
    with sb.open("/tmp/notes.txt", "a") as f:
        f.write("world\n")
    assert sb.open("/tmp/notes.txt").read() == "hello\nworld\n"
    assert run(sb, "cat", "/tmp/notes.txt")[1] == "hello\nworld\n"
    with pytest.raises(FileNotFoundError):
        sb.open("/tmp/missing.txt")
    with pytest.raises(PermissionError):
        with sb.open("/etc/passwd", "w") as f:
            f.write("x")
    if isolation != "bwrap":
        # Modal's guide writes a relative "test.txt"; the working directory is / and read-only
        with pytest.raises(PermissionError, match=r"runs as user nobody .* write under /tmp"):
            with sb.open("test.txt", "w") as f:
                f.write("Hello World\n")
    if isolation == "bwrap":  # no image to snapshot onto
        with pytest.raises(InvalidError, match="bwrap sandbox"):
            sb.snapshot_filesystem()
        sb.terminate()
        return
    assert run(sb, "sh", "-c", "mkdir -p /tmp/old/deeper /tmp/link && touch /tmp/old/deeper/a "
               "/tmp/gone.txt /tmp/link/canary")[0] == 0
    image = sb.snapshot_filesystem()
    sb.terminate()
    again = mctl.Sandbox.create(app=app, image=image, isolation=isolation)
    assert run(again, "cat", "/tmp/notes.txt")[1] == "hello\nworld\n"
    # still the sandbox user's: it may change them (a runc `podman commit` kept the user
    # namespace's host owners, and neither the file nor /tmp was writable any more)
    appended = run(again, "python3", "-c", "open('/tmp/notes.txt', 'a').write('!')")
    assert appended[0] == 0, appended
    assert run(again, "touch", "/tmp/new")[0] == 0
    # what a sandbox deletes stays deleted in its snapshot (it came back before)
    # (Python: coreutils' rm -r fails under this gVisor, its statx call is refused)
    # and a directory it replaced by a link to a host path: the deletion of what was in it
    # never follows that link on the host
    (tmp_path / "canary").write_text("host")
    removed = run(again, "python3", "-c", "import os, shutil; shutil.rmtree('/tmp/old'); "
                  "os.remove('/tmp/gone.txt'); shutil.rmtree('/tmp/link'); "
                  f"os.symlink({str(tmp_path)!r}, '/tmp/link')")
    assert removed[0] == 0, removed
    second = again.snapshot_filesystem()
    again.terminate()
    third = mctl.Sandbox.create(app=app, image=second, isolation=isolation)
    listed = run(third, "python3", "-c", "import os; print(sorted(os.listdir('/tmp')))")[1]
    assert listed == "['link', 'new', 'notes.txt']\n", listed
    assert (tmp_path / "canary").read_text() == "host"
    assert run(third, "readlink", "/tmp/link")[1] == f"{tmp_path}\n"
    assert run(third, "cat", "/tmp/notes.txt")[1] == "hello\nworld\n!"
    third.terminate()
    for made in (image, second):
        subprocess.run(["podman", "rmi", "-f", made.base["tag"]], capture_output=True,
                       timeout=60)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_modals_directory_calls_mkdir_ls_rm(app, isolation):
    """Modal's guide: `sb.mkdir`, `sb.ls`, `sb.rm`, with the errors of the same local calls; and
    file calls leave nothing behind in /tmp (each open() used to leave a pid file there)."""
    sb = mctl.Sandbox.create(app=app, isolation=isolation)
    sb.mkdir("/tmp/test")
    with sb.open("/tmp/test/hello.txt", "w") as f:
        f.write("Hello World\n")
    sb.mkdir("/tmp/test/.hidden")
    assert sb.ls("/tmp/test") == [".hidden", "hello.txt"]
    assert sb.ls("/tmp") == ["test"]
    sb.mkdir("/tmp/a/b", parents=True)
    sb.mkdir("/tmp/a/b", parents=True)  # exists: fine, as mkdir -p
    assert sb.ls("/tmp/a/b") == []
    with pytest.raises(FileExistsError):
        sb.mkdir("/tmp/test")
    with pytest.raises(FileNotFoundError):
        sb.mkdir("/tmp/x/y")
    with pytest.raises(PermissionError):
        sb.mkdir("/test")  # the image is read-only, the user nobody
    with pytest.raises(FileNotFoundError):
        sb.ls("/nope")
    with pytest.raises(NotADirectoryError):
        sb.ls("/tmp/test/hello.txt")
    with pytest.raises(OSError, match="not empty"):
        sb.rm("/tmp/test")
    sb.rm("/tmp/test/hello.txt")
    sb.rm("/tmp/test", recursive=True)
    with pytest.raises(FileNotFoundError):
        sb.rm("/tmp/test")
    sb.rm("/tmp/a/b")  # an empty directory
    assert sb.ls("/tmp") == ["a"]
    sb.terminate()


def test_aio_twins(app):
    import asyncio

    async def main():
        sb = await mctl.Sandbox.create.aio(app=app)
        p = await sb.exec.aio("python3", "-c", "print('a'); print('b')")
        lines = [line async for line in p.stdout]
        assert await p.wait.aio() == 0
        await sb.terminate.aio()
        return lines

    assert asyncio.run(main()) == ["a\n", "b\n"]


def test_a_failing_image_step_says_what_to_do_for_a_sandbox(app):
    """Not "deploy again": nothing was deployed; the user calls Sandbox.create."""
    if not shutil.which("buildah"):
        pytest.skip("buildah is not installed (scripts/images-dev up)")
    image = mctl.Image.debian_slim().run_commands("echo sandbox-step && exit 7")
    with pytest.raises(InvalidError) as err:
        mctl.Sandbox.create(app=app, image=image)
    assert "(exit 7); fix that step and call Sandbox.create again." in str(err.value)


def test_modals_other_create_keywords_as_for_functions(app):
    """environment_name= is accepted (one environment per control plane, as everywhere),
    placement keywords warn, the refused ones say what to do, Modal's defaults pass."""
    from mctl.sdk.deprecated import SpellingDeprecationWarning

    with pytest.warns(SpellingDeprecationWarning, match=r"region=\.\.\.\) has no effect"):
        sb = mctl.Sandbox.create(app=app, environment_name="main", region="us-east",
                                 network_file_systems={}, readiness_probe=None, client=None)
    assert sb.exec("echo", "ok").stdout.read() == "ok\n"
    sb.terminate()
    with pytest.raises(InvalidError, match="use a Volume instead"):
        mctl.Sandbox.create(app=app, network_file_systems={"/data": object()})
    with pytest.raises(InvalidError, match="readiness_probe=.*poll with sb.exec"):
        mctl.Sandbox.create(app=app, readiness_probe=object())
    with pytest.raises(InvalidError, match="unknown keyword 'timout'. Did you mean 'timeout'"):
        mctl.Sandbox.create(app=app, timout=5)  # a typo is still an error


def test_too_little_memory_is_refused_with_the_floor(app):
    """Was runsc's "unable to write into the start-sync descriptor" or a conmon error."""
    with pytest.raises(InvalidError, match=r"at least 32 for a gvisor sandbox .*runc.* not 10"):
        mctl.Sandbox.create(app=app, memory=10)
    with pytest.raises(InvalidError, match=r"number of MiB"):
        mctl.Sandbox.create(app=app, memory="1G")
    sb = mctl.Sandbox.create(app=app, memory=10, isolation="runc")
    assert sb.exec("echo", "ok").stdout.read() == "ok\n"
    sb.terminate()
    sb = mctl.Sandbox.create(app=app, memory=32)
    assert sb.exec("python3", "-c", "print(1)").stdout.read() == "1\n"
    sb.terminate()


CTRL_C_SCRIPT = """
import sys
import mctl

def go(app):
    sb = mctl.Sandbox.create(app=app)
    done = mctl.Sandbox.create(app=app)
    done.terminate()
    p = sb.exec("bash", "-c", "echo started; sleep 60")
    print(sb.object_id, flush=True)
    for line in p.stdout:
        print(line, end="", flush=True)

if sys.argv[1] == "lookup":
    go(mctl.App.lookup("ctrl-c-sandboxes", create_if_missing=True))
else:
    app = mctl.App("ctrl-c-run")
    with app.run():
        go(app)
"""


@pytest.mark.parametrize("how", ["lookup", "run"])
def test_ctrl_c_mid_exec_is_one_line_that_says_what_keeps_running(how, server_process, tmp_path):
    """Not a KeyboardInterrupt traceback through mctl's threads; a sandbox of App.lookup's app
    outlives the script (named, with how to end it); one of `with app.run():` ends with it."""
    import signal
    import sys

    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), how], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    sandbox_id = proc.stdout.readline().strip()
    assert proc.stdout.readline() == "started\n"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert "Traceback" not in err, err
    if how == "lookup":
        assert err.strip().splitlines()[-1] == (
            f"Aborted (Ctrl-C); sandbox {sandbox_id} keeps running until its timeout "
            f"(`mctl sandbox terminate {sandbox_id}` ends it).")
        sb = mctl.Sandbox.from_id(sandbox_id)
        assert sb.poll() is None
        sb.terminate()
    else:
        assert err.strip().splitlines()[-1] == "Aborted (Ctrl-C); the app was stopped."


def test_a_timeout_out_of_range_is_refused_not_replaced(app):
    """timeout=0 used to become the default 300 s without a word."""
    for bad in (0, -5, 86401, "60"):
        with pytest.raises(InvalidError, match=f"between 1 and 86400 seconds, not {bad!r}"):
            mctl.Sandbox.create(app=app, timeout=bad)


def test_create_needs_a_running_app():
    with pytest.raises(InvalidError, match="needs app="):
        mctl.Sandbox.create()
    with pytest.raises(InvalidError, match="is not running"):
        mctl.Sandbox.create(app=mctl.App("not-running"))
    # gpu= (CDI devices; runc unless runsc has nvproxy): tests/test_gpu_containers.py


def test_app_lookup_create_if_missing_hosts_sandboxes(server_process):
    app = mctl.App.lookup("sandbox-home", create_if_missing=True)
    sb = mctl.Sandbox.create(app=app)
    assert run(sb, "echo", "hi")[1] == "hi\n"
    again = mctl.App.lookup("sandbox-home")
    assert [s.object_id for s in mctl.Sandbox.list(app_id=again.app_id)] == [sb.object_id]
    sb.terminate()


def test_timeout_ends_with_minus_one(app):
    sb = mctl.Sandbox.create("sleep", "100", app=app, timeout=2)
    started = time.monotonic()
    with pytest.raises(SandboxTimeoutError):
        sb.wait()
    assert sb.returncode == -1 and time.monotonic() - started < 20
    sb2 = mctl.Sandbox.create(app=app)
    p = sb2.exec("bash", "-c", "echo started; sleep 100", timeout=2)
    assert p.wait() == -1 and p.stdout.read() == "started\n"
    assert run(sb2, "bash", "-c", "ps -e -o comm= 2>/dev/null | grep -c sleep || true")[1].strip() in (
        "0", "")  # the timed-out command is gone, not only the podman exec that ran it
    sb2.terminate()


def test_stdin_round_trips_bytes(app):
    sb = mctl.Sandbox.create(app=app)
    data = os.urandom(300_000)
    p = sb.exec("cat", text=False)
    p.stdin.write(data)
    p.stdin.write_eof()
    assert p.wait() == 0 and p.stdout.read() == data
    sb.terminate()


@pytest.mark.slow
def test_a_chatty_process_does_not_block(app):
    sb = mctl.Sandbox.create(app=app, memory=2048)
    started = time.monotonic()
    # 100 MB on stdout and some on stderr, read by nobody until the end
    p = sb.exec("python3", "-c", "import sys\nfor _ in range(100): sys.stdout.write('x' * 1048575 + '\\n')\n"
                "sys.stderr.write('e' * 1000000)", timeout=120)
    assert p.wait() == 0
    assert len(p.stdout.read()) == 100 * 1048576 and len(p.stderr.read()) == 1000000
    assert time.monotonic() - started < 120
    sb.terminate()


# --- isolation: the escapes, for each runtime -------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_rm_rf_root_leaves_the_host_and_mounts_alone(app, isolation, tmp_path):
    canary = tmp_path / "canary"
    canary.write_text("alive")
    vol = mctl.Volume.from_name("sb-canary", create_if_missing=True)
    from mctl.core import volume_files

    volume_files.create("sb-canary", True)
    root = volume_files.root("sb-canary")
    (root / "keep.txt").write_text("kept")
    sb = mctl.Sandbox.create(app=app, isolation=isolation, volumes={"/data": vol.read_only()})
    rc, out, err = run(sb, "rm", "-rf", "/", "--no-preserve-root", timeout=120)
    assert rc != 0  # most of it is not the sandbox user's to delete
    assert canary.read_text() == "alive"
    assert (root / "keep.txt").read_text() == "kept"
    assert os.path.exists("/etc/passwd") and os.path.exists("/usr/bin/python3")
    sb.terminate()
    fresh = mctl.Sandbox.create(app=app, isolation=isolation)  # the image is untouched too
    assert run(fresh, "python3", "-c", "print('ok')")[1] == "ok\n"
    fresh.terminate()


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_secrets_of_the_host_are_out_of_reach(app, isolation, tmp_path):
    marker = tmp_path / "host-only"
    marker.write_text("secret")
    sb = mctl.Sandbox.create(app=app, isolation=isolation)
    rc, out, err = run(sb, "cat", "/etc/shadow")
    # bwrap: the host's /etc is not there at all (only a few files of it, read-only)
    assert rc != 0 and out == "" and ("Permission denied" in err or (
        isolation == "bwrap" and "No such file" in err)), err
    host_home = os.path.expanduser("~")
    code = (f"import os\nfor p in [{str(marker)!r}, {host_home + '/.bash_history'!r}, "
            f"{str(tmp_path)!r}]:\n    print(p, os.path.exists(p))")
    rc, out, err = run(sb, "python3", "-c", code)
    assert rc == 0 and "True" not in out, out
    # no capabilities at all, and no way to get them back
    code = ("import ctypes\nlibc = ctypes.CDLL(None)\n"
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('Cap')])\n"
            "print('no_new_privs', libc.prctl(39, 0, 0, 0, 0))\n")  # PR_GET_NO_NEW_PRIVS
    rc, out, _ = run(sb, "python3", "-c", code)
    caps = eval(out.splitlines()[0])
    assert caps and set(caps[:3]) == {"0000000000000000"}, out  # inheritable, permitted, effective
    assert "no_new_privs 1" in out, out
    rc, out, err = run(sb, "python3", "-c", "import os; print(os.getuid(), os.geteuid())")
    assert out.split() == ["65534", "65534"]
    sb.terminate()


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_block_network_refuses_sockets(app, isolation):
    # a port on the host that answers: the control plane itself
    url = app._server_url
    host, port = url.split("//")[1].split(":")
    sb = mctl.Sandbox.create(app=app, isolation=isolation, block_network=True)
    code = ("import socket\n"
            f"for addr in [({host!r}, {int(port)}), ('1.1.1.1', 80), ('10.77.0.1', 22)]:\n"
            "    try:\n"
            "        socket.create_connection(addr, timeout=3).close(); print(addr, 'OPEN')\n"
            "    except OSError as e:\n"
            "        print(addr, 'BLOCKED', e)\n")
    rc, out, err = run(sb, "python3", "-c", code)
    assert rc == 0 and "OPEN" not in out and out.count("BLOCKED") == 3, out + err
    sb.terminate()


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_writes_outside_the_scratch_layer_fail(app, isolation, tmp_path):
    from mctl.core import volume_files

    volume_files.create("sb-ro", True)
    root = volume_files.root("sb-ro")
    (root / "f.txt").write_text("orig")
    vol = mctl.Volume.from_name("sb-ro")
    rw = mctl.Volume.from_name("sb-rw", create_if_missing=True)
    volume_files.create("sb-rw", True)
    os.chmod(volume_files.root("sb-rw"), 0o777)
    sb = mctl.Sandbox.create(app=app, isolation=isolation,
                             volumes={"/ro": vol.read_only(), "/rw": rw})
    for target in ["/ro/f.txt", "/ro/new.txt", "/usr/bin/evil", "/etc/passwd",
                   "/proc/sys/kernel/hostname", "/sys/kernel/notes"]:
        rc, out, err = run(sb, "python3", "-c", f"open({target!r}, 'w').write('x')")
        assert rc != 0, f"{target} was writable"
    assert (root / "f.txt").read_text() == "orig" and not (root / "new.txt").exists()
    # the scratch layer and a read-write volume (asked for) are writable
    assert run(sb, "python3", "-c", "open('/tmp/x', 'w').write('x')")[0] == 0
    assert run(sb, "python3", "-c", "open('/rw/out.txt', 'w').write('hi')")[0] == 0
    assert (volume_files.root("sb-rw") / "out.txt").read_text() == "hi"
    if isolation == "bwrap":
        sb.terminate()
        return
    # a snapshot is the sandbox's own files: not its volumes'
    image = sb.snapshot_filesystem()
    sb.terminate()
    again = mctl.Sandbox.create(app=app, isolation=isolation, image=image)
    found = run(again, "python3", "-c", "import os; print([p for p in ('/rw/out.txt', "
                "'/ro/f.txt', '/tmp/x') if os.path.exists(p)])")
    assert found[1] == "['/tmp/x']\n", found
    again.terminate()
    subprocess.run(["podman", "rmi", "-f", image.base["tag"]], capture_output=True, timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_fork_past_the_pid_limit_fails_inside(app, isolation):
    sb = mctl.Sandbox.create(app=app, isolation=isolation, pids=64)
    code = ("import os, time\nn = 0\ntry:\n    for i in range(400):\n"
            "        if os.fork() == 0:\n            time.sleep(2); os._exit(0)\n        n += 1\n"
            "    print('forked', n)\nexcept OSError as e:\n    print('refused after', n)\n")
    rc, out, err = run(sb, "python3", "-c", code, timeout=60)
    assert "refused after" in out, out + err
    assert int(out.split()[-1]) < 64
    time.sleep(3)
    assert run(sb, "echo", "still here")[1] == "still here\n"  # the sandbox survives
    sb.terminate()


@pytest.mark.slow
@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_memory_limit_stops_the_hog_not_the_host(app, isolation):
    sb = mctl.Sandbox.create(app=app, isolation=isolation, memory=128)
    rc, out, err = run(sb, "python3", "-c", "x = bytearray(600 * 2**20); print('allocated')",
                       timeout=60)
    assert rc != 0 and "allocated" not in out
    sb.terminate()


@pytest.mark.slow
@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_terminate_kills_the_process_tree(app, isolation):
    tag = f"mctl-tree-{isolation}-{os.getpid()}"
    sb = mctl.Sandbox.create("bash", "-c", f"(sleep 1000 & sleep 1001 &) ; exec -a {tag} sleep 1002",
                             app=app, isolation=isolation)
    p = sb.exec("bash", "-c", "sleep 1003 & sleep 1004")
    time.sleep(1)
    sb.terminate()
    assert p.wait() != 0
    assert not _leftover(sb)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    ours = {f"sleep {n}" for n in range(1000, 1005)}  # not another test's `sleep 100`
    assert not [line for line in ps.splitlines() if line.strip() in ours or tag in line], ps
    with pytest.raises(InvalidError, match="terminated"):
        sb.exec("true")


def test_tunnel_answers(app, tmp_path):
    sb = mctl.Sandbox.create("python3", "-m", "http.server", "8000", "--directory", "/etc",
                             app=app, encrypted_ports=[8000], block_network=False)
    assert sb.isolation == "runc"  # Debian's runsc has no network here: the fallback
    tunnel = sb.tunnels()[8000]
    deadline = time.monotonic() + 30
    while True:
        try:
            body = urllib.request.urlopen(tunnel.url + "/hostname", timeout=5).read()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert body.strip() == b"sandbox"
    host, port = tunnel.tcp_socket
    socket.create_connection((host, port), timeout=5).close()
    sb.terminate()


def test_gvisor_with_network_is_refused_not_downgraded(app):
    with pytest.raises(InvalidError, match="gVisor sandboxes cannot have network"):
        mctl.Sandbox.create(app=app, isolation="gvisor", block_network=False)


def test_no_isolating_runtime_means_no_sandbox(app, monkeypatch):
    monkeypatch.setattr(sandbox_runtime, "available", lambda: [])
    # the control plane runs in this process (app.run): it sees the same "nothing here"
    with pytest.raises(InvalidError, match="No runtime on this machine can isolate a sandbox"):
        mctl.Sandbox.create(app=app)


def test_coreutils_ls_works_under_gvisor(app):
    """What users run: coreutils ls/stat (statx) under Debian's runsc."""
    sb = mctl.Sandbox.create(app=app)
    rc, out, err = run(sb, "ls", "/")
    sb.terminate()
    if rc != 0:
        pytest.xfail(f"Debian's runsc 20221219 refuses coreutils' statx: {err.strip()}")
    assert "usr" in out.split()


# --- the CLI and tokens -----------------------------------------------------------------------------
def _mctl(*args, input=None, env=None):
    import sys

    return subprocess.run([sys.executable, "-m", "mctl", *args], capture_output=True, text=True,
                          input=input, timeout=120, env={**os.environ, **(env or {})})


def test_cli_list_exec_logs_terminate(server_process):
    app = mctl.App.lookup("sandbox-cli", create_if_missing=True)
    sb = mctl.Sandbox.create("bash", "-c", "echo main-out; echo main-err >&2; sleep 600",
                             app=app, name="cli-box", tags={"k": "v"})
    listed = _mctl("sandbox", "list")
    assert sb.object_id in listed.stdout and "gvisor" in listed.stdout and "cli-box" in listed.stdout
    assert "k=v" in listed.stdout
    by_name = _mctl("sandbox", "list", "--app", "sandbox-cli")  # a name, as `mctl app` takes
    assert sb.object_id in by_name.stdout, by_name.stderr
    assert sb.object_id in _mctl("sandbox", "list", "--app", app.app_id).stdout
    missing = _mctl("sandbox", "list", "--app", "no-such-app")
    assert missing.returncode == 1 and "No app named 'no-such-app'" in missing.stderr
    done = _mctl("sandbox", "exec", sb.object_id, "--", "python3", "-c",
                 "import sys; d = sys.stdin.read(); print(d.upper()); sys.exit(7)", input="hello")
    assert done.returncode == 7 and done.stdout == "HELLO\n", done.stderr
    logs = _mctl("sandbox", "logs", sb.object_id)
    assert logs.stdout == "main-out\n" and logs.stderr == "main-err\n"
    assert "is terminated" in _mctl("sandbox", "terminate", sb.object_id).stdout
    assert sb.object_id not in _mctl("sandbox", "list").stdout
    assert "terminated" in _mctl("sandbox", "list", "--all").stdout
    bad = _mctl("sandbox", "exec", sb.object_id, "--", "true")
    assert bad.returncode == 1 and "terminated; exec and open need a running sandbox" in bad.stderr


def _sandbox_cmdlines(sb) -> str:
    return run(sb, "sh", "-c", "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '; true")[1]


def test_cli_exec_ctrl_c_stops_the_command_in_the_sandbox(server_process):
    """Ctrl-C in `mctl sandbox exec SB -- sleep 100` printed click's "Aborted!" (exit 1) and
    left the command running in the sandbox."""
    import signal
    import sys

    app = mctl.App.lookup("sandbox-cli", create_if_missing=True)
    sb = mctl.Sandbox.create(app=app)
    proc = subprocess.Popen([sys.executable, "-m", "mctl", "sandbox", "exec", sb.object_id, "--",
                             "sleep", "103"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while "sleep 103" not in _sandbox_cmdlines(sb):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [
        f"mctl: interrupted (Ctrl-C); the command in sandbox {sb.object_id} was stopped."], err
    assert "sleep 103" not in _sandbox_cmdlines(sb)
    sb.terminate()


def test_routes_check_token_scopes(server_process):
    import json
    import urllib.error

    def http(url, method="GET", token=None):
        req = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None,
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, None

    def create_token(scope, name):
        return _mctl("token", "create", "--scope", scope, "--name", name).stdout.strip()

    app = mctl.App.lookup("sandbox-scopes", create_if_missing=True)
    sb = mctl.Sandbox.create(app=app)
    url = server_process.url
    invoke = create_token("invoke", "caller")
    proxy = create_token("proxy", "web")
    assert http(f"{url}/api/sandboxes", token=None)[0] == 401
    assert http(f"{url}/api/sandboxes", token=proxy)[0] == 403
    assert http(f"{url}/api/sandboxes/{sb.object_id}/terminate", "POST", token=proxy)[0] == 403
    assert http(f"{url}/api/sandboxes", token=invoke)[0] == 200
    assert http(f"{url}/api/sandboxes/{sb.object_id}/logs", token=invoke)[0] == 403  # deploy
    assert sb.poll() is None  # still running: the refused terminate did nothing
    # named secrets: an invoke token may not read them through a sandbox
    _mctl("secret", "create", "sb-secret", "TOKEN=s3cr3t")
    body = json.dumps({"app_id": app.app_id, "secret_names": ["sb-secret"]}).encode()
    for path in ["/api/sandboxes", f"/api/sandboxes/{sb.object_id}/exec"]:
        req = urllib.request.Request(url + path, data=body, method="POST", headers={
            "Authorization": f"Bearer {invoke}", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=30)
        assert refused.value.code == 403 and b"s3cr3t" not in refused.value.read()
    with_secret = mctl.Sandbox.create(app=app, secrets=[mctl.Secret.from_name("sb-secret")])
    assert run(with_secret, "printenv", "TOKEN")[1] == "s3cr3t\n"  # the admin token may
    with_secret.terminate()
    assert http(f"{url}/api/sandboxes/{sb.object_id}/terminate", "POST", token=invoke)[0] == 200
    assert sb.poll() == 137


def test_stopping_the_app_removes_its_sandboxes():
    a = mctl.App("sandbox-cleanup")
    with a.run():
        done = mctl.Sandbox.create("true", app=a)
        assert done.wait() == 0
        running = mctl.Sandbox.create(app=a)
    assert not _leftover(done) and not _leftover(running)


APP_WITH_FUNCTION = '''
import mctl

app = mctl.App("sandbox-from-function")


@app.function()
def run_untrusted(code: str) -> dict:
    sb = mctl.Sandbox.create(timeout=60)  # inside a function: its own app
    p = sb.exec("python", "-c", code, timeout=30)
    out, rc = p.stdout.read(), p.wait()
    listed = [s.object_id for s in mctl.Sandbox.list(app_id=app.app_id)]
    sb.terminate()
    return {"out": out, "rc": rc, "isolation": sb.isolation, "listed": sb.object_id in listed}


@app.local_entrypoint()
def main():
    print(run_untrusted.remote("print(2 ** 10)"))
'''


def test_a_function_creates_and_uses_a_sandbox(tmp_path):
    path = tmp_path / "fn_sandbox.py"
    path.write_text(APP_WITH_FUNCTION)
    done = _mctl("run", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "'out': '1024\\n', 'rc': 0, 'isolation': 'gvisor', 'listed': True" in done.stdout


def test_a_crashed_control_plane_finds_its_sandboxes_again(server_process):
    app = mctl.App.lookup("sandbox-restart", create_if_missing=True)
    keep = mctl.Sandbox.create(app=app, timeout=120)
    ends = mctl.Sandbox.create("sleep", "3", app=app)
    server_process.kill()  # no shutdown: the containers outlive it
    time.sleep(4)  # `ends` finishes while no control plane watches
    server_process.start()
    again = mctl.Sandbox.from_id(keep.object_id)
    assert again.poll() is None and run(again, "echo", "back")[1] == "back\n"
    assert mctl.Sandbox.from_id(ends.object_id).wait() == 0  # its exit, from podman
    again.terminate()
    assert not _leftover(again)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_exec_timeouts_leave_no_files_and_kill_what_the_command_started(app, isolation):
    """exec(timeout=) used to leave a /tmp/.mctl-exec-* pid file per call in the sandbox (seen
    in `ls /tmp` and in snapshots), and its kill reached only the top process."""
    sb = mctl.Sandbox.create(app=app, isolation=isolation)
    assert run(sb, "echo", "quick", timeout=30)[:2] == (0, "quick\n")
    p = sb.exec("sh", "-c", "sleep 101 & sleep 102; echo never", timeout=2)
    assert p.wait() == -1 and "never" not in p.stdout.read()
    rc, out, _ = run(sb, "sh", "-c", "ls -a /tmp; cat /proc/[0-9]*/cmdline 2>/dev/null | "
                                     "tr '\\0' ' '; true")
    assert rc == 0 and ".mctl-exec" not in out, out
    assert "sleep 101" not in out and "sleep 102" not in out, out
    sb.terminate()
