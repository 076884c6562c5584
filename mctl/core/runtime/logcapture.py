"""Everything a worker process writes to its stdout and stderr, as lines for its connection.

File descriptors 1 and 2 are redirected into two pipes, so output of C extensions and child
processes is caught too, and each line keeps its stream (log frames list the stderr ones). What is
read is also copied, as whole lines, to the original stdout: the output the backend keeps (the
local backend's pipe, a container's log, a Slurm job's output file); a stderr line there starts
with `STDERR_TAG`, so the backend's tail knows its stream too.

A process killed by a signal (SIGKILL from the kernel's OOM killer, a segfault) takes with it what
it had printed but not yet read from that pipe, and what it had read but not yet sent. So the process
the backend starts is a small *keeper* (`start_keeper`): it forks the worker, holds the pipe's read
ends too, and when the worker ends it copies what is left in the pipes to the original stdout
(stdout's first, then stderr's, tagged) and ends the same way. Lines are numbered from the keeper's marker line (`marker`); log frames carry the
number of their first line, so the control plane adds from the backend's tail exactly the lines it
did not get (`mctl.core.worker_output`).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from typing import Any, Callable

MAX_LINES = 10_000   # kept while disconnected; older lines are dropped first
# While connected, the capture thread reads on only while fewer lines than this are read but not
# yet acknowledged by the control plane (`log_ack`); a print waits meanwhile, as on a slow
# terminal. A killed worker's unacknowledged lines are in its own output (copied when read), and
# the backend's tail (`worker_output.MAX_LINES`) holds many more than this plus two pipes' worth.
WINDOW = 4000
STALL_S = 2.0        # no ack for this long: read on anyway (a stuck loop must not hang prints)
READ_SIZE = 16384    # one read of the capture thread (at most this many lines past the window)
OOM_NOTE = "mctl: the kernel's OOM killer ended this worker (out of memory)"
FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
FROM_A_TERMINAL = (signal.SIGINT, signal.SIGQUIT)  # to the process group: the worker has its own
STDERR_TAG = "[stderr] "  # starts a stderr line in the backend's copy of the output


def marker(task_id: str) -> str:
    """The line the keeper writes before the worker's own output; numbering starts after it."""
    return f"mctl: worker {task_id} output follows"


# (stdout pipe's read end, stderr pipe's read end, original stdout, shared state) in a kept worker
_kept: tuple[int, int, int, Any] | None = None
# The shared state's one byte: which stream's line the original stdout leaves open (unended), so
# the keeper ends it before it copies the other stream's rest.
OPEN_NONE, OPEN_STDOUT, OPEN_STDERR = 0, 1, 2


def start_keeper(task_id: str) -> None:
    """Fork: the parent keeps (never returns), the child goes on as the worker with fds 1 and 2
    in two pipes both hold. Call it before any thread starts. Without fork, nothing happens."""
    global _kept
    if not hasattr(os, "fork") or os.environ.get("MCTL_WORKER_KEEPER", "1") == "0":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.write(1, (marker(task_id) + "\n").encode())
    except OSError:
        pass
    import mmap

    shared = mmap.mmap(-1, 1)  # MAP_SHARED: the keeper reads what the worker writes
    rout, wout = os.pipe()
    rerr, werr = os.pipe()
    try:
        child = os.fork()
    except OSError:
        for fd in (rout, wout, rerr, werr):
            os.close(fd)
        return
    if child:
        os.close(wout)
        os.close(werr)
        _keep(child, rout, rerr, shared)  # does not return
    keeper = os.getppid()
    _die_with(keeper)
    if os.environ.get("MCTL_PARENT_PID"):  # the worker's watchdog watches the keeper now
        os.environ["MCTL_PARENT_PID"] = str(keeper)
    orig = os.dup(1)
    os.set_inheritable(orig, False)
    os.dup2(wout, 1)
    os.dup2(werr, 2)
    os.close(wout)
    os.close(werr)
    _kept = (rout, rerr, orig, shared)


def _die_with(parent: int) -> None:
    """SIGKILL this process when `parent` (the keeper) dies: it was SIGKILLed itself."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    if os.getppid() != parent:  # it died before prctl
        os._exit(1)


def _keep(child: int, rout: int, rerr: int, shared: Any) -> None:
    """The keeper: forward signals to the worker, wait for it, copy what it left in the pipes to
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
    still_open = shared[0]
    if still_open == OPEN_STDERR:  # first the stream whose line is open: its rest goes on with it
        _copy_rest(rerr, STDERR_TAG.encode(), True)
        _copy_rest(rout, b"", False)
    else:
        _copy_rest(rout, b"", still_open == OPEN_STDOUT)
        _copy_rest(rerr, STDERR_TAG.encode(), False)
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
    if sig == signal.SIGKILL and ooms is not None and (_oom_kills() or 0) > ooms:
        note = STDERR_TAG + OOM_NOTE + "\n"
        try:
            os.write(1, note.encode())
        except OSError:
            pass
    if sig:
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # PID 1 of a container cannot signal itself
    os._exit(os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode")
             else os.WEXITSTATUS(status))


def _copy_rest(rfd: int, tag: bytes, is_open: bool) -> None:
    """What the worker printed into one pipe and never read, as whole lines (each starting with
    `tag`, the last one ended) to the original stdout. `is_open`: the worker left a line of this
    stream open there, which the rest goes on with (or is ended when there is none)."""
    os.set_blocking(rfd, False)
    chunks = []
    while True:
        try:
            data = os.read(rfd, 65536)
        except (BlockingIOError, OSError):
            break
        if not data:
            break
        chunks.append(data)
    rest = b"".join(chunks)
    if not rest:
        rest = b"\n" if is_open else b""
    if not rest:
        return
    if not rest.endswith(b"\n"):
        rest += b"\n"
    if tag:
        lines = rest[:-1].split(b"\n")
        rest = b"".join((b"" if i == 0 and is_open else tag) + line + b"\n"
                        for i, line in enumerate(lines))
    while rest:
        try:
            rest = rest[os.write(1, rest):]
        except OSError:
            return


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
    """Reads the worker's stdout and stderr pipes; `frame` takes the lines read so far."""

    def __init__(self, on_lines: Callable[[], None]) -> None:
        self.on_lines = on_lines
        self.lock = threading.Lock()
        self.lines: list[str] = []
        self.stderr: list[bool] = []  # of each line in `lines`: it came from stderr
        self.dropped = 0
        self.count = 0  # lines read so far, both streams; the next line's number
        self.cond = threading.Condition(self.lock)
        self.up = False  # connected
        self.connected = False  # to a control plane that acknowledges log frames
        self.acked = 0  # lines the control plane has (numbered from the marker)
        sys.stdout.flush()
        sys.stderr.flush()
        if _kept is not None:  # start_keeper redirected fds 1 and 2 already
            rout, rerr, self._orig, self._shared = _kept
        else:
            self._shared = bytearray(1)
            self._orig = os.dup(1)
            rout, wout = os.pipe()
            rerr, werr = os.pipe()
            os.dup2(wout, 1)
            os.dup2(werr, 2)
            os.close(wout)
            os.close(werr)
        self._partial = {rout: b"", rerr: b""}  # the open line of each (at most one has one)
        self._open_in_orig: int | None = None  # the pipe whose line the original stdout leaves open
        self._ended_early: set[int] = set()
        self._is_err = {rout: False, rerr: True}
        self._open = [rout, rerr]  # pipes not at end of file yet
        for fd in self._open:
            os.set_blocking(fd, False)
        threading.Thread(target=self._reader, name="mctl-logs", daemon=True).start()

    def _reader(self) -> None:
        while True:
            with self.cond:  # not too far ahead of what the control plane has
                since, acked = time.monotonic(), self.acked
                # Only while the loop takes the lines (it may be the one printing) and acks come.
                while (self.connected and self.count - self.acked >= WINDOW and not self.lines
                       and time.monotonic() - since < STALL_S):
                    self.cond.wait(0.25)
                    if self.acked != acked:
                        since, acked = time.monotonic(), self.acked
            ready, _, _ = select.select(list(self._open), [], [])
            # No flush here: a thread blocked printing into a full pipe holds the stream's lock,
            # and only this thread's reading can free it.
            if not self.drain(flush=False, only=ready, size=READ_SIZE):
                return

    def set_connected(self, connected: bool) -> None:
        """The worker's connection is up (or down: lines are kept, the oldest dropped past
        `MAX_LINES`). Lines taken as frames on an earlier connection count as acknowledged.
        The window holds only once the control plane's first `log_ack` came (an older one
        sends none)."""
        with self.cond:
            self.up = connected
            self.connected = False
            self.acked = self.count - len(self.lines)
            self.cond.notify_all()

    def ack(self, upto: int) -> None:
        """The control plane has the lines numbered below `upto`."""
        with self.cond:
            self.connected = self.up
            if upto > self.acked:
                self.acked = upto
                self.cond.notify_all()

    def drain(self, flush: bool = True, end_lines: bool = False,
              only: list[int] | None = None, size: int = 0) -> bool:
        """Read what is in the pipes now; False once both are at end of file. `end_lines`: a
        part of a line waiting for its end is taken as a line (before a result, at the end).
        `only`: the pipes to read (those select found ready). `size`: read once, at most this
        much, from each (0: until the pipe is empty)."""
        if flush:
            sys.stdout.flush()
            sys.stderr.flush()
        got = False
        with self.lock:
            for fd in [fd for fd in self._open if only is None or fd in only]:
                while True:
                    try:
                        data = os.read(fd, size or 65536)
                    except BlockingIOError:
                        break
                    if not data:
                        self._open.remove(fd)
                        break
                    got = self._add(fd, data) or got
                    if size:
                        break
            if end_lines and self._open_in_orig is not None:
                self._add(self._open_in_orig, b"\n")
                got = True
            # Connected, nothing is dropped: the window holds the reading back instead.
            if not self.up and len(self.lines) > MAX_LINES:
                extra = len(self.lines) - MAX_LINES
                del self.lines[:extra]
                del self.stderr[:extra]
                self.dropped += extra
        if got:
            self.on_lines()
        return bool(self._open)

    def _add(self, fd: int, data: bytes) -> bool:
        """Bytes of one pipe, copied at once to the original stdout (a killed worker loses no
        part of a line it had read): a stderr line there starts with the tag, and a line of one
        stream left open is ended before the other stream's bytes (it counts as a line then, in
        the frames too, so both number the lines alike)."""
        err = self._is_err[fd]
        if fd in self._ended_early:  # its line was ended for the other stream's bytes
            self._ended_early.discard(fd)
            if data.startswith(b"\n"):  # its own end came right after: already written
                data = data[1:]
                if not data:
                    return False
        if self._open_in_orig not in (None, fd):
            other = self._open_in_orig
            self._add(other, b"\n")
            self._ended_early.add(other)
        out = bytearray()
        at_start = self._open_in_orig is None
        pieces = data.split(b"\n")
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            if last and not piece:
                break
            if at_start and err:
                out += STDERR_TAG.encode()
            out += piece
            if not last:
                out += b"\n"
            at_start = not last
        ends_open = not data.endswith(b"\n")
        # Said before the write: a worker killed after it leaves the keeper the right state.
        self._shared[0] = (OPEN_STDERR if err else OPEN_STDOUT) if ends_open else OPEN_NONE
        self._open_in_orig = fd if ends_open else None
        view = memoryview(bytes(out))
        while view:
            try:
                view = view[os.write(self._orig, view):]
            except BlockingIOError:
                select.select([], [self._orig], [], 1.0)
            except OSError:
                break
        *complete, self._partial[fd] = (self._partial[fd] + data).split(b"\n")
        if not complete:
            return False
        self.lines.extend(line.decode(errors="replace") for line in complete)
        self.stderr.extend([err] * len(complete))
        self.count += len(complete)
        return True

    def frame(self) -> dict[str, Any] | None:
        """The lines not yet taken as a `log` frame: `seq` numbers the first one, `stderr` lists
        the indexes of the lines that came from stderr (absent when none did), `dropped` says how
        many older ones were lost while the worker was not connected."""
        with self.lock:
            lines, self.lines = self.lines, []
            stderr, self.stderr = self.stderr, []
            dropped, self.dropped = self.dropped, 0
            seq = self.count - len(lines)
        if not lines and not dropped:
            return None
        header: dict[str, Any] = {"type": "log", "lines": lines, "seq": seq}
        errs = [i for i, err in enumerate(stderr) if err]
        if errs:
            header["stderr"] = errs
        if dropped:
            header["dropped"] = dropped
        return header
