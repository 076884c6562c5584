"""The agent inside a bubblewrap sandbox, and its host-side client. Standard library only: the
agent runs on the host's own Python inside the sandbox (`python3 -I`, the file bound read-only).

bwrap has no "exec into": a command can only be started inside when the sandbox starts. So the
sandbox's first process is this agent. It starts the main command, then accepts exec requests on
a Unix socket that the control plane created, bound and listened on *outside* the sandbox (in a
root-only directory the sandbox never sees) and handed down as an inherited file descriptor, so
code in the sandbox can neither replace the socket nor reach its path.

One request per connection: a JSON line with `argv`, `workdir`, `env`, sent with the client's
stdin, stdout and stderr as SCM_RIGHTS file descriptors. The agent spawns the command inside
(same namespaces, cgroups, user and rlimits as everything in the sandbox) with those three as its
stdio, answers `{"pid": n}`, and `{"exit": code}` (128+n after signal n) when it ends. A client
that goes away first (closed connection: killed, timed out) takes the command's whole process
group with it. `{"activity": true}` answers how many exec'd commands run, for `idle_timeout`.

    python3 -m mctl.core.bwrap_agent exec SOCKET [--workdir DIR] [--env NAME]... -- CMD...
    python3 -m mctl.core.bwrap_agent activity SOCKET
    python3 -m mctl.core.bwrap_agent follow OUT_FILE ERR_FILE DONE_FILE
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

MAX_REQUEST = 1 << 20


# --- inside the sandbox ------------------------------------------------------------------------
def _code(status: int) -> int:
    return 128 + -status if status < 0 else status


def _undumpable() -> None:
    """No ptrace, no /proc/<pid>/fd access, no pidfd_getfd on the agent from the sandbox's code
    (same uid, no capabilities): its listening socket stays its own."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    except Exception:  # noqa: BLE001 - best effort; the socket is close-on-exec anyway
        pass


class Agent:
    def __init__(self, listen_fd: int, workdir: str, env: dict[str, str]) -> None:
        self.listener = socket.socket(fileno=listen_fd)
        self.listener.set_inheritable(False)
        self.workdir = workdir
        self.env = env
        self.running: set[int] = set()
        self.lock = threading.Lock()
        self.answered = threading.Event()  # the control plane's readiness check got its answer

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            data = b""
            while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
                msg, anc, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(3 * 4))
                if not msg:
                    return
                data += msg
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        got = array.array("i")
                        got.frombytes(payload[:len(payload) - len(payload) % 4])
                        fds += list(got)
            req = json.loads(data)
            if req.get("activity"):
                with self.lock:
                    conn.sendall(json.dumps({"running": len(self.running)}).encode() + b"\n")
                self.answered.set()
                return
            self._exec(conn, req, fds)
        except Exception as exc:  # noqa: BLE001 - one bad request must not end the sandbox
            try:
                conn.sendall(json.dumps({"error": str(exc)}).encode() + b"\n")
            except OSError:
                pass
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            conn.close()

    def _exec(self, conn: socket.socket, req: dict[str, Any], fds: list[int]) -> None:
        argv = req.get("argv")
        if (not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv)
                or len(fds) != 3):
            raise ValueError("an exec request needs argv (a list of str) and three descriptors")
        env = dict(self.env)
        env.update({str(k): str(v) for k, v in (req.get("env") or {}).items()})
        try:
            proc = subprocess.Popen(argv, stdin=fds[0], stdout=fds[1], stderr=fds[2],
                                    cwd=req.get("workdir") or self.workdir, env=env,
                                    start_new_session=True, close_fds=True)
        except OSError as exc:
            cwd = req.get("workdir") or self.workdir
            what = argv[0] if os.path.isdir(cwd) else f"workdir {cwd}"
            os.write(fds[2], f"mctl: {what}: {exc.strerror}\n".encode())
            conn.sendall(json.dumps({"exit": 127 if isinstance(exc, FileNotFoundError)
                                     else 126}).encode() + b"\n")
            return
        for fd in fds:
            os.close(fd)
        fds.clear()
        with self.lock:
            self.running.add(proc.pid)
        try:
            conn.sendall(json.dumps({"pid": proc.pid}).encode() + b"\n")

            def watch_client() -> None:  # the client went away: so does the command
                try:
                    while conn.recv(4096):
                        pass
                except OSError:
                    pass
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except OSError:
                        pass
            threading.Thread(target=watch_client, daemon=True).start()
            code = _code(proc.wait())
            try:
                conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
            except OSError:
                pass
        finally:
            with self.lock:
                self.running.discard(proc.pid)


def agent_main(args: list[str]) -> int:
    """`agent LISTEN_FD WORKDIR -- CMD...`: start CMD (the sandbox's main command) and serve execs
    until it ends; exit with its code (bwrap passes that on)."""
    _undumpable()
    listen_fd, workdir = int(args[0]), args[1]
    cmd = args[args.index("--") + 1:]
    env = {k: v for k, v in os.environ.items()}
    agent = Agent(listen_fd, workdir, env)
    threading.Thread(target=agent.serve, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: None)  # the main command decides, as pid 1 would
    try:
        main = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, cwd=workdir, env=env)
    except OSError as exc:
        print(f"mctl: {cmd[0]}: {exc.strerror}", file=sys.stderr, flush=True)
        return _started(agent, 127 if isinstance(exc, FileNotFoundError) else 126)
    signal.signal(signal.SIGTERM, lambda *_: main.terminate())
    return _started(agent, _code(main.wait()))


def _started(agent: Agent, code: int) -> int:
    """The sandbox did start, however soon its command ended (or could not start): the control
    plane's readiness check sees the agent first, so this is a sandbox that ended with `code`
    (as under podman), not a create that failed."""
    agent.answered.wait(10)
    return code


# --- on the host -------------------------------------------------------------------------------
def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def _lines(s: socket.socket) -> Any:
    buf = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield json.loads(line)


def exec_main(args: list[str]) -> int:
    """`exec SOCKET [--workdir DIR] [--env NAME]... -- CMD...`: run CMD in the sandbox with this
    process's stdin, stdout and stderr; exit with its code. The values of `--env` names come
    from this process's environment (never the argv)."""
    path, rest = args[0], args[1:]
    sep = rest.index("--")
    opts, cmd = rest[:sep], rest[sep + 1:]
    workdir, env = None, {}
    i = 0
    while i < len(opts):
        if opts[i] == "--workdir":
            workdir = opts[i + 1]
        elif opts[i] == "--env":
            env[opts[i + 1]] = os.environ.get(opts[i + 1], "")
        i += 2
    try:
        s = _connect(path)
    except OSError as exc:
        print(f"mctl: the sandbox does not answer ({exc.strerror}); is it still running?",
              file=sys.stderr)
        return 125
    req = json.dumps({"argv": cmd, "workdir": workdir, "env": env}).encode() + b"\n"
    s.sendmsg([req], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
    for reply in _lines(s):
        if "exit" in reply:
            return int(reply["exit"])
        if "error" in reply:
            print(f"mctl: {reply['error']}", file=sys.stderr)
            return 125
    print("mctl: the sandbox ended before the command did", file=sys.stderr)
    return 137


def activity_main(args: list[str]) -> int:
    """`activity SOCKET`: print "<running execs> 0" (a bwrap sandbox has no ports)."""
    s = _connect(args[0])
    s.sendall(b'{"activity": true}\n')
    for reply in _lines(s):
        print(f"{int(reply['running'])} 0")
        return 0
    return 1


def follow_main(args: list[str]) -> int:
    """`follow OUT_FILE ERR_FILE DONE_FILE`: copy the two files to stdout and stderr as they
    grow, until DONE_FILE exists and both were copied to their end (`podman logs -f` for a bwrap
    sandbox's main command)."""
    files = [(open(args[0], "rb"), sys.stdout.buffer), (open(args[1], "rb"), sys.stderr.buffer)]
    done = args[2]
    while True:
        # checked before the reads, so all written before it is copied; a directory that is
        # gone (terminate removed it) ends it too
        finished = os.path.exists(done) or not os.path.isdir(os.path.dirname(done) or ".")
        moved = False
        for src, dst in files:
            chunk = src.read(65536)
            if chunk:
                dst.write(chunk)
                dst.flush()
                moved = True
        if not moved:
            if finished:
                return 0
            time.sleep(0.05)


def main(argv: list[str]) -> int:
    verbs = {"agent": agent_main, "exec": exec_main, "activity": activity_main,
             "follow": follow_main}
    if not argv or argv[0] not in verbs:
        print(__doc__, file=sys.stderr)
        return 2
    return verbs[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
