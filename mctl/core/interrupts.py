"""SIGTERM, SIGHUP and a closed stdout end a run as Ctrl-C does: the app and its workers,
sandboxes and warm containers are stopped before the process exits.

While an app runs in this process (`mctl run`, a script's `with app.run():`), SIGTERM and SIGHUP
raise `Terminated` in the main thread; it is a KeyboardInterrupt, so every Ctrl-C path (the
short drain, the stop of the app, the embedded control plane's shutdown) runs for it too. At the
end of the run it becomes `SystemExit(128 + signal)` (143, 129: what a shell shows for a process
that such a signal ended) after one line on stderr. A second signal while that cleanup runs is
ignored (a closed terminal, `timeout` and CI runners often send more than one).

When what mctl prints of the functions' output cannot be written because the reader of stdout went
away (`mctl run app.py | head`), the run ends the same way, quietly, with status 141 (SIGPIPE's),
as `yes | head` does."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, Iterator

# The signals that end a run as Ctrl-C does (SIGINT is Python's own KeyboardInterrupt).
SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """A run ended by `signum` (SIGTERM, SIGHUP; SIGPIPE: its stdout went away)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


_depth = 0
_previous: dict[int, Any] = {}
_fired: int | None = None  # the signal that ended the run, once one did
output_gone = False  # stdout's reader went away: mctl prints no more function output


def _handler(signum: int, frame: Any) -> None:
    global _fired
    if _fired is not None:  # cleanup for the first one is running: let it finish
        return
    _fired = signal.SIGPIPE if output_gone and signum == signal.SIGTERM else signum
    raise Terminated(_fired)


@contextlib.contextmanager
def ending_like_ctrl_c() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise `Terminated` in the main thread (a signal
    whose handler someone else set is left alone). Nested blocks share one installation."""
    global _depth, _fired
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread can set handlers; Ctrl-C there is its business too
        return
    if _depth == 0:
        _fired = None
        for sig in SIGNALS:
            current = signal.getsignal(sig)
            if current in (signal.SIG_DFL, None):
                _previous[sig] = current
                signal.signal(sig, _handler)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            for sig, previous in _previous.items():
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
            _previous.clear()


def stdout_gone() -> None:
    """Called (from any thread) when printing a function's output failed with a broken pipe:
    later output goes nowhere, and a run in this process ends as after SIGPIPE."""
    global output_gone
    if output_gone:
        return
    output_gone = True
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing more fails there, at exit neither
        os.close(devnull)
    if signal.SIGTERM in _previous and _fired is None:  # a run is going: end it
        import _thread

        _thread.interrupt_main(signal.SIGTERM)  # our handler, in the main thread


def exit_status(exc: BaseException) -> int:
    """The status a run ended by `exc` exits with: 128 + its signal (130 for Ctrl-C)."""
    return 128 + (exc.signum if isinstance(exc, Terminated) else signal.SIGINT)


def say(line: str) -> None:
    """One line on stderr, if there is still somewhere to write it (a closed terminal is not)."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)
