"""isolation="bwrap": image-less sandboxes under bubblewrap (core/sandbox_bwrap), for hosts
without podman. tests/test_sandbox.py runs the escape suite (rm -rf /, host secrets, sockets,
writes outside the scratch space, fork bombs, memory) under bwrap too; these are the escapes and
the plumbing of its own: the agent that runs execs, the seccomp filter, no nested user
namespaces, uids, cgroups, and the automatic choice where podman is missing."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

import mctl
from conftest import wait_until
from mctl.core import sandbox_bwrap, sandbox_runtime
from mctl.exception import InvalidError


@pytest.fixture(autouse=True)
def _needs_bwrap():
    problem = sandbox_bwrap.problem()
    if problem:
        if os.environ.get("MCTL_REQUIRE_SERVERS") == "1":
            pytest.fail(problem)
        pytest.skip(problem)


@pytest.fixture
def app():
    a = mctl.App("sandbox-bwrap-tests")
    with a.run():
        yield a


def run(sb, *cmd, timeout=60):
    p = sb.exec(*cmd, timeout=timeout)
    rc = p.wait()
    return rc, p.stdout.read(), p.stderr.read()


def py(sb, code):
    return run(sb, "python3", "-c", code)


def test_a_bwrap_sandbox_runs_execs_through_its_agent(app):
    sb = mctl.Sandbox.create(app=app, isolation="bwrap")
    assert sb.isolation == "bwrap"
    assert py(sb, "import os, socket; print(os.getuid(), os.getgid(), socket.gethostname())"
              ) == (0, "65534 65534 sandbox\n", "")
    p = sb.exec("bash", "-c", "while read l; do echo \"got $l\"; done; echo bye >&2; exit 3")
    p.stdin.write("a\nb\n")
    p.stdin.write_eof()
    assert p.wait() == 3 and p.stdout.read() == "got a\ngot b\n" and p.stderr.read() == "bye\n"
    assert sb.exec("printenv", "FOO", env={"FOO": "bar"}).stdout.read() == "bar\n"
    assert sb.exec("pwd", workdir="/usr").stdout.read() == "/usr\n"
    assert sb.exec("bash", "-c", "kill -TERM $$").wait() == 128 + 15
    missing = sb.exec("no-such-command")
    assert missing.wait() == 127 and "no-such-command" in missing.stderr.read()
    nowhere = sb.exec("true", workdir="/nowhere")
    assert nowhere.wait() == 127 and "workdir /nowhere" in nowhere.stderr.read()
    # an exec's timeout ends the command inside, not only the client
    assert sb.exec("sleep", "300", timeout=1).wait() == -1
    time.sleep(0.5)
    assert "sleep 300" not in py(sb, "import os\nfor p in os.listdir('/proc'):\n"
                                 "    if p.isdigit():\n"
                                 "        print(open(f'/proc/{p}/cmdline').read().replace("
                                 "'\\0', ' '))")[1]
    with sb.open("/tmp/notes.txt", "w") as f:
        f.write("kept")
    assert sb.open("/tmp/notes.txt").read() == "kept"
    with pytest.raises(InvalidError, match="bwrap sandbox"):
        sb.snapshot_filesystem()
    sb.terminate()
    assert sb.returncode == 137
    with pytest.raises(InvalidError, match="terminated"):
        sb.exec("true")


def test_the_main_command_its_output_and_timeout(app):
    sb = mctl.Sandbox.create("bash", "-c", "echo out; echo err >&2; sleep 1; exit 5", app=app,
                             isolation="bwrap")
    assert sb.wait() == 5
    assert sb.stdout.read() == "out\n" and sb.stderr.read() == "err\n"
    sb = mctl.Sandbox.create("sleep", "300", app=app, isolation="bwrap", timeout=2)
    with pytest.raises(mctl.exception.SandboxTimeoutError):
        sb.wait()
    assert sb.returncode == -1
    assert wait_until(lambda: not sandbox_bwrap.sandbox_pids(sb.object_id), 10)


def test_the_agent_and_the_host_are_out_of_reach(app):
    sb = mctl.Sandbox.create(app=app, isolation="bwrap")
    run_dir = sb._record["run_dir"]
    assert os.path.exists(os.path.join(run_dir, "agent.sock"))
    code = ("import os\n"
            f"for p in ['/run', {run_dir!r}, '/home', '/root', '/var', '/sys/kernel', "
            "'/etc/shadow']:\n"
            "    print(p, os.path.exists(p))\n"
            "print('pids', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
            "try:\n    print(os.listdir('/proc/2/fd'))\n"  # the agent: not dumpable
            "except OSError as e:\n    print('agent fds', e.strerror)\n")
    rc, out, err = py(sb, code)
    assert rc == 0, err
    assert "True" not in out, out
    assert "agent fds Permission denied" in out, out
    pids = eval(out.split("pids ")[1].splitlines()[0])
    assert max(pids) < 100, pids  # its own pid namespace: not one host process
    # the code cannot kill anything outside, nor reach the host's processes by pid
    assert py(sb, "import os\ntry:\n    os.kill(os.getppid() + 1000, 0); print('reached')\n"
              "except ProcessLookupError:\n    print('none')")[1] == "none\n"
    sb.terminate()


def test_no_mounts_namespaces_or_kernel_interfaces(app):
    sb = mctl.Sandbox.create(app=app, isolation="bwrap")
    code = ("import ctypes, errno, os\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "def call(name, *args):\n"
            "    r = getattr(libc, name)(*args)\n"
            "    return 'ok' if r >= 0 else errno.errorcode[ctypes.get_errno()]\n"
            "print('mount', call('mount', b'none', b'/tmp', b'tmpfs', 0, None))\n"
            "print('unshare_user', call('unshare', 0x10000000))\n"  # CLONE_NEWUSER
            "print('unshare_net', call('unshare', 0x40000000))\n"  # CLONE_NEWNET
            "print('keyctl', call('syscall', 250, 0, 0, 0, 0))\n"  # keyctl on x86-64
            "print('io_uring', call('syscall', 425, 1, None))\n"  # io_uring_setup
            "print('bpf', call('syscall', 321, 0, None, 0))\n")
    rc, out, err = py(sb, code)
    assert rc == 0, err
    seen = dict(line.split() for line in out.splitlines())
    assert seen == {"mount": "EPERM", "unshare_user": "EPERM", "unshare_net": "EPERM",
                    "keyctl": "EPERM", "io_uring": "EPERM", "bpf": "EPERM"}, out
    # no capability anywhere, no_new_privs, no way back to root
    rc, out, _ = run(sb, "grep", "-E", "^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs)",
                     "/proc/self/status")
    assert out.split()[1::2] == ["0000000000000000"] * 5 + ["1"], out
    sb.terminate()


def test_ownership_keeps_host_files_private_even_when_mounted(app, tmp_path):
    from mctl.core import volume_files

    volume_files.create("bw-own", True)
    root = volume_files.root("bw-own")
    os.chmod(root, 0o777)
    (root / "root-only.txt").write_text("secret")
    os.chmod(root / "root-only.txt", 0o600)
    vol = mctl.Volume.from_name("bw-own")
    sb = mctl.Sandbox.create(app=app, isolation="bwrap", volumes={"/data": vol})
    rc, out, err = run(sb, "cat", "/data/root-only.txt")
    assert rc != 0 and "Permission denied" in err and out == ""
    assert run(sb, "sh", "-c", "echo hi > /data/new.txt")[0] == 0
    owner = os.stat(root / "new.txt").st_uid
    assert owner == sandbox_bwrap.host_uid(sb.object_id) and owner >= sandbox_bwrap.UID_BASE
    sb.terminate()


def test_limits_live_in_cgroups_that_go_with_the_sandbox(app):
    sb = mctl.Sandbox.create(app=app, isolation="bwrap", memory=256, pids=100, cpu=0.5)
    groups = sandbox_bwrap.cgroups(sb.object_id)
    assert all(g.is_dir() for g in groups)
    if not sandbox_bwrap._cgroup_v2():
        mem, pids, cpu, _ = groups
        assert int((mem / "memory.limit_in_bytes").read_text()) == 256 * 2**20
        assert (pids / "pids.max").read_text().strip() == "100"
        assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "50000"
    assert sandbox_bwrap.sandbox_pids(sb.object_id)
    run_dir = sb._record["run_dir"]
    sb.terminate()
    assert not any(g.exists() for g in groups)
    assert not os.path.exists(run_dir)


def test_the_control_planes_environment_stays_out(app, monkeypatch):
    monkeypatch.setenv("MCTL_BWRAP_TEST_SECRET", "do-not-leak")
    sb = mctl.Sandbox.create(app=app, isolation="bwrap", env={"MINE": "1"})
    env = dict(line.split("=", 1) for line in run(sb, "env")[1].splitlines())
    assert env.get("MINE") == "1" and "MCTL_BWRAP_TEST_SECRET" not in env, env
    assert not [k for k in env if k.startswith("MCTL")], env
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "MINE=1" not in ps  # values never in an argv
    sb.terminate()


def test_idle_timeout_sees_the_agents_execs(app):
    sb = mctl.Sandbox.create(app=app, isolation="bwrap", idle_timeout=2)
    p = sb.exec("sleep", "3")
    assert p.wait() == 0  # 3 s of exec: longer than the idle timeout, still running
    assert sb.poll() is None
    with pytest.raises(mctl.exception.SandboxTimeoutError, match="idle"):
        sb.wait()


def test_bwrap_is_chosen_where_podman_is_missing(app, monkeypatch):
    real = sandbox_runtime._have
    monkeypatch.setattr(sandbox_runtime, "_have",
                        lambda name: False if name == "podman" else real(name))
    assert sandbox_runtime.available() == ["bwrap"]
    sb = mctl.Sandbox.create(app=app)
    assert sb.isolation == "bwrap"
    assert run(sb, "python3", "-c", "print(1)")[1] == "1\n"
    sb.terminate()
    with pytest.raises(InvalidError, match="Only bubblewrap can isolate"):
        mctl.Sandbox.create(app=app, block_network=False)
    with pytest.raises(InvalidError, match="bwrap sandboxes are image-less|Only bubblewrap"):
        mctl.Sandbox.create(app=app, isolation="bwrap", image=mctl.Image.debian_slim())


def test_a_bwrap_sandbox_dies_with_its_control_plane(server_process):
    """bwrap sandboxes are the control plane's children (--die-with-parent): a crash takes
    them along, and the restarted control plane records them as lost and removes what is
    left of them (cgroups, the run directory)."""
    app = mctl.App.lookup("sandbox-bwrap-restart", create_if_missing=True)
    sb = mctl.Sandbox.create("sleep", "300", app=app, isolation="bwrap", timeout=120)
    run_dir = sb._record["run_dir"]
    assert sandbox_bwrap.sandbox_pids(sb.object_id)
    server_process.kill()
    assert wait_until(lambda: not sandbox_bwrap.sandbox_pids(sb.object_id), 10)
    server_process.start()
    again = mctl.Sandbox.from_id(sb.object_id)
    assert again._record["state"] == "lost"
    assert not any(g.exists() for g in sandbox_bwrap.cgroups(sb.object_id))
    assert not os.path.exists(run_dir)
