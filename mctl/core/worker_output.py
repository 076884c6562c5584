"""The end of what a worker process wrote to its own stdout and stderr, as its backend reads it
(the local backend's pipe, a Slurm job's output file).

The worker sends its output over its connection, but a process killed by a signal takes with it
what it had not sent yet; its keeper (`runtime.logcapture.start_keeper`) copies all of it to the
process's own output. Lines there are numbered from the keeper's marker line, the same numbers the
worker's log frames carry, so the control plane adds exactly the lines it never got
(`ControlPlane.worker_gone`). A stderr line there starts with `STDERR_TAG`: it goes back to stderr.
A backend feeds each line to an `OutputTail` and passes it with
`PoolEvents.worker_exited(..., output=tail)`.
"""

from __future__ import annotations

import collections
import os

from mctl.core.runtime.logcapture import OOM_NOTE, STDERR_TAG, marker

# Kept: more than a worker reads ahead of the control plane's acknowledgment
# (`logcapture.WINDOW` + `READ_SIZE`) plus two pipes' rest that its keeper copies at the end.
MAX_LINES = 200_000
MAX_BYTES = 16 << 20
TAIL_BYTES = MAX_BYTES  # of a file: the end read as lines (the rest is only counted)


class OutputTail:
    def __init__(self, task_id: str, max_lines: int = MAX_LINES) -> None:
        self.marker = marker(task_id)
        self.lines: collections.deque[str] = collections.deque(maxlen=max_lines)
        self.stderr: collections.deque[bool] = collections.deque(maxlen=max_lines)  # of each line
        self.count: int | None = None  # lines after the marker; None until it is seen
        self.bytes = 0  # of the kept lines
        self.oom: bool | None = None   # True: the kernel's OOM killer ended it (as far as known)

    def add(self, line: str) -> None:
        line = line.rstrip("\n").rstrip("\r")
        if line == self.marker:  # what came before is the wrappers' (podman's pull, ...)
            self.lines.clear()
            self.stderr.clear()
            self.bytes = 0
            self.count = 0
            return
        err = line.startswith(STDERR_TAG)
        if err:
            line = line[len(STDERR_TAG):]
        if line == OOM_NOTE:
            self.oom = True
        if len(self.lines) == self.lines.maxlen:
            self.bytes -= len(self.lines[0])
        self.lines.append(line)
        self.stderr.append(err)
        self.bytes += len(line)
        while self.bytes > MAX_BYTES and len(self.lines) > 1:
            self.bytes -= len(self.lines.popleft())
            self.stderr.popleft()
        if self.count is not None:
            self.count += 1

    def add_text(self, text: str) -> None:
        for line in text.splitlines():
            self.add(line)

    def add_file(self, path: str | os.PathLike[str]) -> None:
        """A job's output file: its lines after the marker are counted, the last ones kept.
        Raises OSError when it cannot be read."""
        mark = (self.marker + "\n").encode()
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(1 << 20)  # the marker comes first; before it only wrappers write
            found = head.find(mark)
            if found < 0:
                f.seek(max(0, size - TAIL_BYTES))
                self.add_text(f.read().decode(errors="replace"))
                return
            start = found + len(mark)
            tail_from = max(start, size - TAIL_BYTES)
            f.seek(start)
            counted, left = 0, tail_from - start
            while left > 0:  # whole lines before the tail: counted, not kept
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    break
                counted += chunk.count(b"\n")
                left -= len(chunk)
            f.seek(tail_from)
            rest = f.read().decode(errors="replace")
        lines = rest.split("\n")
        if tail_from > start:  # the first piece ends a line counted already
            lines, counted = lines[1:], counted + 1
        if lines and lines[-1] == "":
            lines.pop()
        self.lines.clear()
        self.stderr.clear()
        self.bytes = 0
        self.count = counted
        for line in lines:
            self.add(line)

    def numbered(self) -> list[tuple[int, str]]:
        """The kept lines with their numbers; none when the marker was never seen."""
        if self.count is None:
            return []
        first = self.count - len(self.lines)
        return list(enumerate(self.lines, first))

    def numbered_streams(self) -> list[tuple[int, str, str]]:
        """(number, line, "stdout" or "stderr") of the kept lines; none without the marker."""
        return [(n, line, "stderr" if err else "stdout")
                for (n, line), err in zip(self.numbered(), self.stderr)]

    def text(self, lines: int = 20) -> str:
        """The last `lines` lines, for a report of a worker that died before it connected."""
        return "\n".join(list(self.lines)[-lines:])
