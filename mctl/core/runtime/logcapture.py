"""Everything a worker process writes to its stdout and stderr, as lines for its connection.

File descriptors 1 and 2 are redirected into a pipe, so output of C extensions and child processes
is caught too. What is read is also copied to the original stdout (a Slurm job's output file, or
the local backend's pipe, which keeps a tail for a worker that dies before it connects).
"""

from __future__ import annotations

import os
import select
import sys
import threading
from typing import Callable

MAX_LINES = 10_000   # kept while disconnected; older lines are dropped first


class LogCapture:
    def __init__(self, on_lines: Callable[[], None]) -> None:
        self.on_lines = on_lines
        self.lock = threading.Lock()
        self.lines: list[str] = []
        self.dropped = 0
        self._partial = b""
        sys.stdout.flush()
        sys.stderr.flush()
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
                got = got or bool(complete)
            if len(self.lines) > MAX_LINES:
                extra = len(self.lines) - MAX_LINES
                del self.lines[:extra]
                self.dropped += extra
        if got:
            self.on_lines()
        return True

    def take(self) -> list[str]:
        with self.lock:
            lines, self.lines = self.lines, []
            if self.dropped:
                lines.insert(0, f"mctl: {self.dropped} log lines were dropped while the control "
                                "plane was unreachable")
                self.dropped = 0
        return lines
