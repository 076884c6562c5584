"""Everything a worker process writes to its stdout and stderr, as lines for its connection.

File descriptors 1 and 2 are redirected into a pipe, so output of C extensions and child processes
is caught too. What is read is also copied to the original stdout: the output the backend keeps (the
local backend's pipe, a container's log, a Slurm job's output file).

A process killed by a signal (SIGKILL from the kernel's OOM killer, a segfault) takes with it what
it had printed but not yet read from that pipe, and what it had read but not yet sent. So the process
the backend starts is a small *keeper* (`start_keeper`): it forks the worker, holds the pipe's read
end too, and when the worker ends it copies what is left in the pipe to the original stdout and ends
the same way. Lines are numbered from the keeper's marker line (`marker`); log frames carry the
number of their first line, so the control plane adds from the backend's tail exactly the lines it
did not get (`mctl.core.worker_output`).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
from typing import Any, Callable

MAX_LINES = 10_000   # kept while disconnected; older lines are dropped first
OOM_NOTE = "mctl: the kernel's OOM killer ended this worker (out of memory)"
FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
FROM_A_TERMINAL = (signal.SIGINT, signal.SIGQUIT)  # to the process group: the worker has its own


def marker(task_id: str) -> str:
    """The line the keeper writes before the worker's own output; numbering starts after it."""
    return f"mctl: worker {task_id} output follows"


_kept: tuple[int, int] | None = None  # (pipe's read end, original stdout) in a kept worker


def start_keeper(task_id: str) -> None:
    """Fork: the parent keeps (never returns), the child goes on as the worker with fds 1 and 2
    in a pipe both hold. Call it before any thread starts. Without fork, nothing happens."""
    global _kept
    if not hasattr(os, "fork") or os.environ.get("MCTL_WORKER_KEEPER", "1") == "0":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.write(1, (marker(task_id) + "\n").encode())
    except OSError:
        pass
    rfd, wfd = os.pipe()
    try:
        child = os.fork()
    except OSError:
        os.close(rfd)
        os.close(wfd)
        return
    if child:
        os.close(wfd)
        _keep(child, rfd)  # does not return
    keeper = os.getppid()
    _die_with(keeper)
    if os.environ.get("MCTL_PARENT_PID"):  # the worker's watchdog watches the keeper now
        os.environ["MCTL_PARENT_PID"] = str(keeper)
    orig = os.dup(1)
    os.set_inheritable(orig, False)
    os.dup2(wfd, 1)
    os.dup2(wfd, 2)
    os.close(wfd)
    _kept = (rfd, orig)


def _die_with(parent: int) -> None:
    """SIGKILL this process when `parent` (the keeper) dies: it was SIGKILLed itself."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    if os.getppid() != parent:  # it died before prctl
        os._exit(1)


def _keep(child: int, rfd: int) -> None:
    """The keeper: forward signals to the worker, wait for it, copy what it left in the pipe to
    the original stdout, then end the way it ended."""
    def forward(signum: int, _frame: Any) -> None:
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    for sig in FROM_A_TERMINAL:  # Ctrl-C reaches both; only a container's PID 1 must pass it on
        signal.signal(sig, forward if os.getpid() == 1 else signal.SIG_IGN)
    parent = int(os.environ.get("MCTL_PARENT_PID", "0") or 0)
    ooms = _oom_kills()
    try:
        pidfd: int | None = os.pidfd_open(child)
    except (AttributeError, OSError):
        pidfd = None
    while True:
        if pidfd is not None:
            select.select([pidfd], [], [], 0.5 if parent else None)
        else:
            select.select([], [], [], 0.1)
        try:
            pid, status = os.waitpid(child, os.WNOHANG)
        except ChildProcessError:
            pid, status = child, 0
        if pid:
            break
        if parent and os.getppid() != parent:  # the local control plane died: so do we
            os._exit(0)  # the worker gets SIGKILL (PR_SET_PDEATHSIG)
    for sig in (*FORWARDED, *FROM_A_TERMINAL):
        signal.signal(sig, signal.SIG_DFL)
    last = _copy_rest(rfd)
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
    if sig == signal.SIGKILL and ooms is not None and (_oom_kills() or 0) > ooms:
        note = ("" if last in (b"", b"\n") else "\n") + OOM_NOTE + "\n"
        try:
            os.write(1, note.encode())
        except OSError:
            pass
    if sig:
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # PID 1 of a container cannot signal itself
    os._exit(os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode")
             else os.WEXITSTATUS(status))


def _copy_rest(rfd: int) -> bytes:
    """What the worker printed and never read, to the original stdout; the last byte copied."""
    os.set_blocking(rfd, False)
    last = b""
    while True:
        try:
            data = os.read(rfd, 65536)
        except (BlockingIOError, OSError):
            return last
        if not data:
            return last
        last = data[-1:]
        while data:
            try:
                data = data[os.write(1, data):]
            except OSError:
                return last


def _oom_kills() -> int | None:
    """The OOM kills counted in this process's memory cgroup (v2 `memory.events`, v1
    `memory.oom_control`), or None where there is none to read."""
    try:
        with open("/proc/self/cgroup") as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    candidates = []
    for _, controllers, path in (e for e in entries if len(e) == 3):
        if controllers == "":  # v2; a container sees its own cgroup at the root
            candidates += [f"/sys/fs/cgroup{path}/memory.events", "/sys/fs/cgroup/memory.events"]
        elif "memory" in controllers.split(","):
            candidates += [f"/sys/fs/cgroup/memory{path}/memory.oom_control",
                           "/sys/fs/cgroup/memory/memory.oom_control"]
    for name in candidates:
        try:
            with open(name.replace("//", "/")) as f:
                for line in f:
                    if line.startswith("oom_kill "):
                        return int(line.split()[1])
        except (OSError, ValueError):
            continue
    return None


class LogCapture:
    def __init__(self, on_lines: Callable[[], None]) -> None:
        self.on_lines = on_lines
        self.lock = threading.Lock()
        self.lines: list[str] = []
        self.dropped = 0
        self.count = 0  # lines read so far; the next line's number
        self._partial = b""
        sys.stdout.flush()
        sys.stderr.flush()
        if _kept is not None:  # start_keeper redirected fds 1 and 2 already
            self._rfd, self._orig = _kept
        else:
            self._orig = os.dup(1)
            self._rfd, wfd = os.pipe()
            os.dup2(wfd, 1)
            os.dup2(wfd, 2)
            os.close(wfd)
        os.set_blocking(self._rfd, False)
        threading.Thread(target=self._reader, name="mctl-logs", daemon=True).start()

    def _reader(self) -> None:
        while True:
            select.select([self._rfd], [], [])
            # No flush here: a thread blocked printing into a full pipe holds the stream's lock,
            # and only this thread's reading can free it.
            if not self.drain(flush=False):
                return

    def drain(self, flush: bool = True) -> bool:
        """Read what is in the pipe now; False at end of file."""
        if flush:
            sys.stdout.flush()
            sys.stderr.flush()
        got = False
        with self.lock:
            while True:
                try:
                    data = os.read(self._rfd, 65536)
                except BlockingIOError:
                    break
                if not data:
                    return False
                try:
                    os.write(self._orig, data)
                except OSError:
                    pass
                *complete, self._partial = (self._partial + data).split(b"\n")
                self.lines.extend(line.decode(errors="replace") for line in complete)
                self.count += len(complete)
                got = got or bool(complete)
            if len(self.lines) > MAX_LINES:
                extra = len(self.lines) - MAX_LINES
                del self.lines[:extra]
                self.dropped += extra
        if got:
            self.on_lines()
        return True

    def frame(self) -> dict[str, Any] | None:
        """The lines not yet taken as a `log` frame: `seq` numbers the first one, `dropped` says
        how many older ones were lost while the control plane was unreachable."""
        with self.lock:
            lines, self.lines = self.lines, []
            dropped, self.dropped = self.dropped, 0
            seq = self.count - len(lines)
        if not lines and not dropped:
            return None
        header: dict[str, Any] = {"type": "log", "lines": lines, "seq": seq}
        if dropped:
            header["dropped"] = dropped
        return header
