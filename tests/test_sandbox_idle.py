"""`Sandbox.create(idle_timeout=)` for real (podman with gVisor and runc): an idle sandbox ends
after its idle_timeout; one with an exec running does not, and its idle time counts from the
exec's end. Needs what tests/test_sandbox.py needs; skips (or fails under
MCTL_REQUIRE_SERVERS=1) the same way."""

from __future__ import annotations

import time

import pytest

import mctl
from mctl.exception import InvalidError, SandboxTimeoutError
from test_sandbox import _needs_podman, app  # noqa: F401 - its fixtures


def _ends_within(sb, seconds: float) -> float:
    """Seconds until the sandbox ended (polled, so a sandbox that never ends fails the test)."""
    start = time.monotonic()
    while sb.poll() is None:
        assert time.monotonic() - start < seconds, f"still running after {seconds}s"
        time.sleep(0.2)
    return time.monotonic() - start


def test_an_idle_sandbox_ends_after_its_idle_timeout(app):  # noqa: F811
    sb = mctl.Sandbox.create(app=app, idle_timeout=2, timeout=120)
    assert sb.poll() is None
    took = _ends_within(sb, 15)
    assert took >= 1.5, took  # 2 s from its start, less the time create took to answer
    with pytest.raises(SandboxTimeoutError, match="idle"):
        sb.wait()
    assert sb.returncode == -1 and sb.poll() == -1
    assert sb._record["state"] == "timeout" and sb._record["ended_by"] == "idle_timeout"
    with pytest.raises(InvalidError, match="exec and open need a running sandbox"):
        sb.exec("true")


@pytest.mark.parametrize("isolation", ["gvisor", "runc"])
def test_a_running_exec_keeps_it_alive_and_idle_counts_from_its_end(app, isolation):  # noqa: F811
    sb = mctl.Sandbox.create(app=app, idle_timeout=2, timeout=120, isolation=isolation)
    try:
        p = sb.exec("sleep", "5")  # run by this client with the runtime's own exec
        assert p.wait() == 0
        assert sb.poll() is None, "ended while an exec ran"
        assert _ends_within(sb, 15) >= 1.5  # 2 s from the exec's end (less one poll's time)
        with pytest.raises(SandboxTimeoutError, match="idle"):
            sb.wait()
    finally:
        sb.terminate()


def test_bad_idle_timeout_is_refused(app):  # noqa: F811
    with pytest.raises(InvalidError, match="idle_timeout"):
        mctl.Sandbox.create(app=app, idle_timeout=0)


def test_an_open_tunnel_connection_keeps_it_alive(app):  # noqa: F811
    import socket

    sb = mctl.Sandbox.create("python3", "-m", "http.server", "8000", app=app, idle_timeout=3,
                             timeout=120, unencrypted_ports=[8000], block_network=False)
    try:
        host, port = sb.tunnels()[8000].tcp_socket
        deadline = time.monotonic() + 2.5
        while True:  # the server inside listens (a refused or reset connection: not yet)
            try:
                conn = socket.create_connection((host, port), timeout=5)
                conn.sendall(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
                if conn.recv(12).startswith(b"HTTP/"):
                    break
                conn.close()
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server in the sandbox did not answer"
            time.sleep(0.1)
        conn.close()  # http.server answers HTTP/1.0 and closes: hold a connection of our own
        conn = socket.create_connection((host, port), timeout=5)
        time.sleep(5)  # open, and quiet on the wire: still activity, as Modal counts it
        assert sb.poll() is None, "ended while a tunnel connection was open"
        conn.close()
        assert _ends_within(sb, 20) >= 2.5
    finally:
        sb.terminate()
