"""Pseudo-terminals for commands in sandboxes (`Sandbox.exec(..., pty=True)`) and the terminal
of `mctl sandbox exec --pty`: the size and the TERM a terminal carries, and a local pty to hand
`podman exec -t` (or `srun --pty`) as its own terminal, so that it sets the sandbox's terminal to
our size and follows a resize (SIGWINCH) as it would for a person at a terminal."""

from __future__ import annotations

import os
from typing import Any

DEFAULT_ROWS, DEFAULT_COLS = 24, 80
TERM_VARS = (("term", "TERM"), ("colorterm", "COLORTERM"), ("term_program", "TERM_PROGRAM"))


def local_size(fd: int | None = None) -> tuple[int, int]:
    """(rows, cols) of this process's terminal (stdin, else stdout), or 24x80."""
    import fcntl
    import struct
    import termios

    for f in ([fd] if fd is not None else [0, 1]):
        try:
            rows, cols = struct.unpack("hh", fcntl.ioctl(f, termios.TIOCGWINSZ, b"1234"))
            if rows > 0 and cols > 0:
                return rows, cols
        except (OSError, ValueError):
            continue
    return DEFAULT_ROWS, DEFAULT_COLS


def pty_spec(pty_info: Any = None) -> dict[str, Any]:
    """What the sandbox's terminal gets: rows, cols and the terminal's variables. From Modal's
    PTYInfo (`winsz_rows`, `winsz_cols`, `env_term`, `env_colorterm`, `env_term_program`; an
    object or a dict) where given, else from this process's terminal and environment, as
    Modal's exec(pty=True) does."""
    rows, cols = local_size()
    spec: dict[str, Any] = {"rows": rows, "cols": cols}
    for key, var in TERM_VARS:
        spec[key] = os.environ.get(var)

    def field(name: str) -> Any:
        if isinstance(pty_info, dict):
            return pty_info.get(name)
        return getattr(pty_info, name, None)

    if pty_info is not None and not isinstance(pty_info, bool):
        for key, name in (("rows", "winsz_rows"), ("cols", "winsz_cols")):
            if field(name):
                spec[key] = int(field(name))
        for key, _ in TERM_VARS:
            if field("env_" + key):
                spec[key] = str(field("env_" + key))
    spec["term"] = spec.get("term") or "xterm-256color"
    return spec


def pty_env(spec: dict[str, Any]) -> dict[str, str]:
    """The variables the command on the terminal gets (TERM always)."""
    return {var: str(spec[key]) for key, var in TERM_VARS if spec.get(key)}


def set_size(fd: int, rows: int, cols: int) -> None:
    import fcntl
    import struct
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", int(rows), int(cols), 0, 0))


def open_pty(rows: int, cols: int) -> tuple[int, int]:
    """A raw pty of this size: (master, slave). Raw, so that what is written reaches the
    program that reads the slave (podman, srun) unchanged; it puts its own terminal (the one in
    the sandbox) into the mode the command asks for."""
    import pty
    import tty

    master, slave = pty.openpty()
    tty.setraw(slave)
    set_size(slave, rows or DEFAULT_ROWS, cols or DEFAULT_COLS)
    return master, slave


def on_terminal(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """How to start `argv` with the pty's slave as stdin so that it is the program's
    controlling terminal (a resize then reaches it as SIGWINCH): util-linux `setsid -w -c` in
    front where there is one (no Python between fork and exec in a threaded process), else a
    preexec_fn."""
    import shutil

    setsid = shutil.which("setsid")
    if setsid:
        return [setsid, "-w", "-c", *argv], {}
    return list(argv), {"preexec_fn": controlling_tty}


def controlling_tty() -> None:
    """preexec_fn: a new session whose controlling terminal is stdin (the pty's slave), so that a
    resize of the pty reaches the program as SIGWINCH."""
    import fcntl
    import termios

    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
