"""`block_network=True` for a worker process: run it in a network namespace of its own
(`unshare --net`), whose only way out is the control plane.

The backend starts `unshare --net -- python -m mctl.core.runtime.netjail SOCKET PORT -- ARGV`.
Inside the new namespace there is only a loopback interface; this program brings it up, listens
on 127.0.0.1:PORT (the control plane's port, so MCTL_SERVER_URL works unchanged) and carries each
connection to the Unix socket SOCKET, which the backend opened outside and connects on to the
control plane. Unix sockets are files: they cross network namespaces, nothing else does. Then it
runs ARGV (the worker) as its child, passes SIGTERM/SIGINT on, and ends as the worker ends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading


def _loopback_up() -> None:
    """`ip link set lo up`, without needing the `ip` tool: SIOCSIFFLAGS with IFF_UP."""
    import fcntl
    import struct

    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(s, SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", flags | IFF_UP, b""))


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass


def _relay(listener: socket.socket, path: str) -> None:
    while True:
        conn, _ = listener.accept()
        out = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            out.connect(path)
        except OSError:
            conn.close()
            out.close()
            continue
        for a, b in ((conn, out), (out, conn)):
            threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def main(argv: list[str]) -> int:
    path, port, sep, *command = argv
    if sep != "--" or not command:
        print("usage: netjail SOCKET PORT -- ARGV", file=sys.stderr)
        return 2
    try:  # end with the backend that started us, as the worker would
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    except Exception:
        pass
    _loopback_up()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", int(port)))
    listener.listen(64)
    threading.Thread(target=_relay, args=(listener, path), daemon=True).start()
    env = dict(os.environ)
    if "MCTL_PARENT_PID" in env:  # the worker watches this process now
        env["MCTL_PARENT_PID"] = str(os.getpid())
    child = subprocess.Popen(command, env=env)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    code = child.wait()
    if code < 0:  # killed by a signal: end the same way, so the backend reports it
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
