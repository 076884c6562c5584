"""Terminals and stdin in sandboxes, for real (podman with gVisor and runc, no fakes):
`exec(..., pty=True)` runs on a terminal in the sandbox (as Modal's: stdout and stderr together on
stdout), its size arrives and follows a resize; the main command's stdin (`sb.stdin`) round-trips
and write_eof ends it; `mctl sandbox exec --pty` gives an interactive shell. Directly with podman
(the SDK on the control plane's host) and through the control plane's relay. On Slurm nodes:
tests/test_sandbox_slurm.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import mctl
from mctl.exception import InvalidError
from test_sandbox import _needs_podman  # noqa: F401 - autouse: podman, runsc, the base image

ISOLATIONS = ["gvisor", "runc"]


@pytest.fixture
def app():
    a = mctl.App("sandbox-pty-tests")
    with a.run():
        yield a


def _until(p, text, timeout=30):
    """Read p's stdout (a terminal) until `text` appears; everything read so far."""
    seen = ""
    deadline = time.monotonic() + timeout
    buf = p.stdout._buffer()
    while time.monotonic() < deadline:
        with buf.cond:
            seen = bytes(buf.data).decode(errors="replace")
            if text in seen or buf.eof:
                break
            buf.cond.wait(0.2)
    assert text in seen, seen
    return seen


def _relayed(sb):
    """The same sandbox, reached as a client on another host reaches it: through the relay."""
    sb._relayed = lambda: True  # type: ignore[method-assign]
    return sb


@pytest.mark.parametrize("isolation", ISOLATIONS)
@pytest.mark.parametrize("via", ["podman", "relay"])
def test_a_pty_exec_runs_on_a_terminal_of_our_size(app, isolation, via):
    from mctl.core import terminal

    sb = mctl.Sandbox.create(app=app, isolation=isolation)
    try:
        if via == "relay":
            _relayed(sb)
        p = sb.exec("python3", "-c", "import os, sys, shutil; print(os.isatty(0), os.isatty(1), "
                    "os.isatty(2), os.get_terminal_size(0), os.environ['TERM']); "
                    "print('to-stderr', file=sys.stderr); sys.exit(5)",
                    pty_info={"winsz_rows": 33, "winsz_cols": 101, "env_term": "xterm-mctl"})
        assert p.wait() == 5
        out = p.stdout.read()
        assert "True True True" in out, out
        assert "os.terminal_size(columns=101, lines=33)" in out and "xterm-mctl" in out
        assert "to-stderr" in out and p.stderr.read() == ""  # a terminal: all on stdout
        assert "\r\n" in out  # the terminal's own newline
        # pty=True: this process's terminal's size and TERM (none here: 24x80), as Modal's;
        # it overrides pty_info
        p = sb.exec("python3", "-c", "import os; print(os.get_terminal_size(0), "
                    "os.environ['TERM'])", pty=True, pty_info={"winsz_rows": 5, "winsz_cols": 6})
        assert p.wait() == 0
        rows, cols = terminal.local_size()
        assert f"os.terminal_size(columns={cols}, lines={rows})" in p.stdout.read()
        # a timeout ends it as without a terminal: -1
        p = sb.exec("sleep", "30", pty=True, timeout=1)
        assert p.wait() == -1
        # without pty: pipes, as before
        p = sb.exec("python3", "-c", "import os; print(os.isatty(0), os.isatty(1))")
        assert p.stdout.read() == "False False\n"
        with pytest.raises(InvalidError):
            p.resize(10, 10)
    finally:
        sb.terminate()


@pytest.mark.parametrize("via", ["podman", "relay"])
def test_an_interactive_shell_round_trips_and_follows_a_resize(app, via):
    sb = mctl.Sandbox.create(app=app)
    try:
        if via == "relay":
            _relayed(sb)
        p = sb.exec("sh", "-i", pty_info={"winsz_rows": 20, "winsz_cols": 70})
        p.stdin.write(b"echo $((6 * 7)) marker\n")
        _until(p, "42 marker")
        p.resize(44, 132)
        time.sleep(0.5)
        p.stdin.write(b"python3 -c \"import os; print('SIZE', os.get_terminal_size(0))\"\n")
        _until(p, "SIZE os.terminal_size(columns=132, lines=44)")
        # Python's interactive interpreter thinks it is at a terminal
        p.stdin.write(b"python3 -i -q\n")
        _until(p, ">>> ")
        p.stdin.write(b"print(7 * 6, 'py')\n")
        _until(p, "42 py")
        # ^D: Python exits and the shell prompts again. A ^D typed in the instant before
        # readline takes the terminal can be lost (as at a real terminal): type it again then.
        buf = p.stdout._buffer()
        for _ in range(20):
            p.stdin.write(b"\x04")
            time.sleep(0.5)
            with buf.cond:
                seen = bytes(buf.data).decode(errors="replace")
            if seen.rfind("$ ") > seen.rfind(">>> "):
                break
        p.stdin.write(b"echo back$((1 + 1))\n")
        _until(p, "back2")
        p.stdin.write(b"exit 3\n")
        assert p.wait() == 3
        # write_eof() on a terminal is its end-of-file character: `cat` reads an end
        p = sb.exec("cat", pty=True)
        p.stdin.write(b"abc\n")
        _until(p, "abc\r\nabc\r\n")  # the terminal's echo, then cat's copy
        p.stdin.write_eof()
        assert p.wait() == 0
    finally:
        sb.terminate()


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_the_main_commands_stdin_round_trips_and_write_eof_ends_it(app, isolation):
    sb = mctl.Sandbox.create("python3", "-c", "import sys\nfor line in sys.stdin: "
                             "print('got', line.strip(), flush=True)\nprint('end')",
                             app=app, isolation=isolation)
    try:
        sb.stdin.write(b"one\n")
        sb.stdin.write("two\n")
        sb.stdin.drain()
        lines = iter(sb.stdout)
        assert next(lines) == "got one\n" and next(lines) == "got two\n"
        # a second handle (another client) writes to the same stdin; the first stays usable
        other = mctl.Sandbox.from_id(sb.object_id)
        other.stdin.write(b"three\n")
        other.stdin.drain()
        assert next(lines) == "got three\n"
        sb.stdin.write(b"four\n")
        sb.stdin.write_eof()
        assert sb.wait() == 0
        assert sb.stdout.read() == "got four\nend\n"
        late = mctl.Sandbox.from_id(sb.object_id)
        with pytest.raises(InvalidError, match="finished; its main command's stdin is closed"):
            late.stdin.write(b"late\n")
            late.stdin.drain()
        with pytest.raises(InvalidError, match="stdin is closed"):  # its own write_eof
            sb.stdin.write(b"late\n")
    finally:
        sb.terminate()


def test_python_i_as_the_main_command(app):
    sb = mctl.Sandbox.create("python3", "-i", "-q", app=app)
    try:
        sb.stdin.write(b"print(6 * 7)\n")
        sb.stdin.write(b"import sys; print('err-line', file=sys.stderr)\n")
        sb.stdin.write_eof()
        assert sb.wait() == 0
        assert sb.stdout.read() == "42\n"
        assert "err-line" in sb.stderr.read()
    finally:
        sb.terminate()


def test_stdin_of_a_sandbox_without_a_command_says_so(app):
    sb = mctl.Sandbox.create(app=app)
    try:
        with pytest.raises(InvalidError, match="no open stdin"):
            sb.stdin.write(b"x\n")
            time.sleep(1)
            sb.stdin.drain()
    finally:
        sb.terminate()


def test_mctl_sandbox_exec_pty_gives_an_interactive_shell(server_process):
    """The CLI on a real terminal (a pty of this test): raw mode, the size, a shell."""
    import pty
    import select

    from mctl.core import terminal

    app = mctl.App.lookup("sandbox-pty-cli", create_if_missing=True)
    sb = mctl.Sandbox.create(app=app)
    try:
        master, slave = pty.openpty()
        terminal.set_size(slave, 30, 90)
        proc = subprocess.Popen([sys.executable, "-m", "mctl", "sandbox", "exec", sb.object_id,
                                 "--", "sh", "-i"], stdin=slave, stdout=slave, stderr=slave,
                                preexec_fn=terminal.controlling_tty, env=dict(os.environ))
        os.close(slave)
        seen = b""

        def until(text, timeout=60):
            nonlocal seen
            deadline = time.monotonic() + timeout
            while text not in seen and time.monotonic() < deadline:
                if select.select([master], [], [], 0.5)[0]:
                    try:
                        seen += os.read(master, 65536)
                    except OSError:
                        break
            assert text in seen, seen

        time.sleep(2)
        os.write(master, b"stty size; echo $((40 + 2))x\r")
        until(b"30 90")
        until(b"42x")
        terminal.set_size(master, 50, 120)  # the window changes: SIGWINCH to the CLI
        time.sleep(1)
        os.write(master, b"stty size\r")
        until(b"50 120")
        os.write(master, b"exit 4\r")
        assert proc.wait(timeout=60) == 4
        os.close(master)
    finally:
        sb.terminate()


def test_the_main_commands_stdin_outlives_a_control_plane_restart(server_process):
    """The FIFO's holder is its own process: SIGKILL the control plane between two writes."""
    app = mctl.App.lookup("sandbox-pty-restart", create_if_missing=True)
    sb = mctl.Sandbox.create("python3", "-c", "import sys\nfor line in sys.stdin: "
                             "print('got', line.strip(), flush=True)\nprint('end')", app=app)
    try:
        sb.stdin.write(b"one\n")
        sb.stdin.drain()
        assert next(iter(sb.stdout)) == "got one\n"
        server_process.kill()
        server_process.start()
        again = mctl.Sandbox.from_id(sb.object_id)
        assert again.poll() is None
        again.stdin.write(b"two\n")
        again.stdin.write_eof()
        assert again.wait() == 0
        assert again.stdout.read() == "got one\ngot two\nend\n"
    finally:
        mctl.Sandbox.from_id(sb.object_id).terminate()


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_the_main_command_on_a_terminal(app, isolation):
    """Sandbox.create(..., pty=True): the main command's stdin, stdout and stderr are a
    terminal of our size; its output is all on stdout; write_eof() is ^D."""
    sb = mctl.Sandbox.create(
        "python3", "-c", "import os, sys\nprint(os.isatty(0), os.isatty(1), "
        "os.get_terminal_size(0), os.environ['TERM'], flush=True)\n"
        "print('err-line', file=sys.stderr, flush=True)\n"
        "for line in sys.stdin: print('got', line.strip(), flush=True)\nprint('end')",
        app=app, isolation=isolation,
        pty_info={"winsz_rows": 33, "winsz_cols": 101, "env_term": "xterm-mctl"})
    try:
        sb.stdin.write(b"one\n")
        sb.stdin.write_eof()
        assert sb.wait() == 0
        out = sb.stdout.read()
        assert "True True os.terminal_size(columns=101, lines=33) xterm-mctl\r\n" in out, out
        assert "err-line\r\n" in out and "got one\r\n" in out and out.endswith("end\r\n")
        assert sb.stderr.read() == ""
    finally:
        sb.terminate()
    with pytest.raises(InvalidError, match="needs a command"):
        mctl.Sandbox.create(app=app, pty=True)
