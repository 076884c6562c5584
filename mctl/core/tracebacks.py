"""Tracebacks that show the user's code: mctl's own frames (and the import machinery's) are left
out, so an error in a user's function or file reads as if mctl were not there."""

from __future__ import annotations

import os
import traceback
from typing import Iterable

# The `mctl` package directory; its frames are never the user's.
MCTL_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Thread hand-off plumbing between mctl's frames (the worker imports user code via to_thread).
_PLUMBING = tuple(os.path.join(os.path.dirname(os.__file__), p)
                  for p in ("asyncio/threads.py", "concurrent/futures/thread.py"))


def _hidden(filename: str, dirs: tuple[str, ...]) -> bool:
    if filename.startswith("<frozen importlib") or filename in _PLUMBING:
        return True
    path = os.path.abspath(filename)
    return any(path == d or path.startswith(d + os.sep) for d in dirs)


# Directory prefixes to show as others: a worker's bundle directory -> the user's source dir.
PATH_MAP: dict[str, str] = {}


def _shown(filename: str) -> str:
    for local, original in PATH_MAP.items():
        if filename.startswith(local + os.sep):
            return original + filename[len(local):]
    return filename


def format_user_traceback(exc: BaseException, hide_dirs: Iterable[str] = ()) -> str:
    """`exc` formatted like Python does, without frames from mctl or from `hide_dirs`; chained
    exceptions (`__cause__`, `__context__`) are filtered the same way."""
    dirs = (MCTL_DIR, *(os.path.abspath(d) for d in hide_dirs))
    top = traceback.TracebackException.from_exception(exc)
    pending, seen = [top], set()
    while pending:
        te = pending.pop()
        if id(te) in seen:
            continue
        seen.add(id(te))
        frames = [frame for frame in te.stack if not _hidden(frame.filename, dirs)]
        for frame in frames:
            frame.line  # read the source line before the file name changes
            frame.filename = _shown(frame.filename)
        te.stack = traceback.StackSummary.from_list(frames)
        pending += [c for c in (te.__cause__, te.__context__) if c is not None]
    return "".join(top.format())
