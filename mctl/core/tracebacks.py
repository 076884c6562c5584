"""Tracebacks that show the user's code: mctl's own frames (and the import machinery's) are left
out, so an error in a user's function or file reads as if mctl were not there."""

from __future__ import annotations

import os
import traceback
from typing import Iterable

# The `mctl` package directory; its frames are never the user's.
MCTL_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hidden(filename: str, dirs: tuple[str, ...]) -> bool:
    if filename.startswith("<frozen importlib"):
        return True
    path = os.path.abspath(filename)
    return any(path == d or path.startswith(d + os.sep) for d in dirs)


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
        te.stack = traceback.StackSummary.from_list(
            [frame for frame in te.stack if not _hidden(frame.filename, dirs)])
        pending += [c for c in (te.__cause__, te.__context__) if c is not None]
    return "".join(top.format())
