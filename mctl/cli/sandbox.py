"""`mctl sandbox list|exec|logs|terminate`: the sandboxes the control plane knows (Modal's
`modal sandbox ...`)."""

from __future__ import annotations

import json
import sys
import threading

import click


@click.group(short_help="List sandboxes, run a command in one, read its logs, terminate it.")
def sandbox() -> None:
    """Sandboxes (mctl.Sandbox): isolated containers for untrusted code."""


@sandbox.command("list", short_help="Sandboxes: id, app, name, isolation, state, tags.")
@click.option("--app", "app_id", metavar="APP", help="Only this app's (its name or id).")
@click.option("--all", "show_all", is_flag=True, help="Include finished sandboxes.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def sandbox_list(app_id: str | None, show_all: bool, as_json: bool) -> None:
    """List the running sandboxes (with --all, finished ones too): id, app, name, isolation,
    state, return code, creation time, tags."""
    from mctl.cli.main import _admin, _when, embedded_note, running_server

    if running_server() is None:
        click.echo("[]" if as_json else "No sandboxes are running (no mctl server is running)."
                   + embedded_note())
        return
    params = {"all": "1"} if show_all else {}
    if app_id:  # a name (App.lookup's, a deployed app's) or an id, as `mctl app` takes them
        params["app_id"] = _admin("GET", f"/api/apps/{app_id}")["app_id"]
    rows = _admin("GET", "/api/sandboxes", params=params)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(("No sandboxes are running." if not show_all else "No sandboxes.")
                   + embedded_note())
        return
    click.echo(f"{'SANDBOX':<27} {'APP':<27} {'NAME':<14} {'ISOLATION':<9} {'STATE':<10} "
               f"{'RC':>4}  {'CREATED':<19}  TAGS")
    for r in rows:
        rc = "-" if r["returncode"] is None else str(r["returncode"])
        tags = ",".join(f"{k}={v}" for k, v in sorted(r["tags"].items())) or "-"
        click.echo(f"{r['sandbox_id']:<27} {r['app_id']:<27} {(r['name'] or '-'):<14} "
                   f"{r['isolation']:<9} {r['state']:<10} {rc:>4}  {_when(r['created']):<19}  "
                   f"{tags}")


@sandbox.command("exec", short_help="Run a command in a sandbox, with this terminal's stdio.",
                 context_settings={"ignore_unknown_options": True})
@click.option("--pty/--no-pty", default=None,
              help="Run the command on a terminal (default: when this one is a terminal).")
@click.option("--workdir", help="Run the command in this directory of the sandbox.")
@click.option("--timeout", type=int,
              help="Stop the command after this many seconds (exit code 124, as timeout(1)).")
@click.argument("sandbox_id")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def sandbox_exec(pty: bool | None, workdir: str | None, timeout: int | None, sandbox_id: str,
                 command: tuple[str, ...]) -> None:
    """Run COMMAND in a running sandbox, with this terminal's stdin, stdout and stderr; exits
    with the command's code. `mctl sandbox exec sb-... -- python3 -c 'print(1)'`;
    `mctl sandbox exec sb-... -- bash` is an interactive shell (on a terminal in the sandbox,
    of this one's size, raw, following its resizes)."""
    from mctl.cli.main import NO_SERVER, embedded_note, running_server
    from mctl.exception import Error, NotFoundError
    from mctl.sdk.sandbox import Sandbox

    if running_server() is None:  # nothing runs: no server is started to say so
        raise click.ClickException(NO_SERVER + embedded_note())
    argv = list(command[1:] if command and command[0] == "--" else command)
    if not argv:
        raise click.ClickException("Name the command to run: mctl sandbox exec SB -- CMD.")
    if pty is None:
        pty = sys.stdin.isatty() and sys.stdout.isatty()
    try:
        sb = Sandbox.from_id(sandbox_id)
        p = sb.exec(*argv, workdir=workdir, timeout=timeout, text=False, pty=pty)
    except NotFoundError as exc:
        raise click.ClickException(str(exc) + embedded_note()) from None
    except Error as exc:
        raise click.ClickException(str(exc)) from None
    try:
        with _raw_terminal(p if pty else None):  # raw: Ctrl-C is a key for the sandbox's terminal
            rc = _copy_stdio(p, interactive=bool(pty))
    except KeyboardInterrupt:  # Ctrl-C: the command in the sandbox stops too, as a shell's would
        terminate = getattr(p, "_terminate", None)
        if terminate is not None:
            terminate()
        click.echo(f"mctl: interrupted (Ctrl-C); the command in sandbox {sandbox_id} was "
                   "stopped.", err=True)
        sys.exit(130)
    sys.exit(124 if rc < 0 else rc)  # -1 (its timeout) as timeout(1) says it


def _copy_stdio(p, interactive: bool) -> int:  # type: ignore[no-untyped-def]
    """This process's stdin to the command, its stdout and stderr here; its exit code."""
    import os

    def feed() -> None:
        if sys.stdin is None or (sys.stdin.isatty() and not interactive):
            p.stdin.write_eof()
            return
        fd = sys.stdin.fileno()
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            try:
                p.stdin.write(chunk)
                p.stdin.drain()
            except Exception:  # noqa: BLE001 - the command ended: its exit code says the rest
                return
        try:
            p.stdin.write_eof()
        except Exception:  # noqa: BLE001
            pass

    def copy(reader, out) -> None:  # type: ignore[no-untyped-def]
        buf = reader._buffer()  # as it comes: a prompt has no newline
        while True:
            with buf.cond:
                while len(buf.data) == reader._pos and not buf.eof:
                    buf.cond.wait()
                data = bytes(buf.data[reader._pos:])
                reader._pos = len(buf.data)
                ended = buf.eof
            if data:
                out.write(data)
                out.flush()
            if ended:
                return

    threading.Thread(target=feed, daemon=True).start()
    err = threading.Thread(target=copy, args=(p.stderr, sys.stderr.buffer), daemon=True)
    err.start()
    copy(p.stdout, sys.stdout.buffer)
    err.join()
    return p.wait()


class _raw_terminal:
    """With a command on a terminal and this process at one: this terminal raw (every key goes
    to the sandbox's terminal, which does the echo and the line editing), restored at the end;
    its window's size changes (SIGWINCH) go to the sandbox's terminal. As `mctl container
    exec --pty`."""

    def __init__(self, p) -> None:  # type: ignore[no-untyped-def]
        self._p = p
        self._saved = None
        self._old_handler = None

    def __enter__(self) -> None:
        import signal

        if self._p is None or not sys.stdin.isatty():
            return
        import termios
        import tty

        fd = sys.stdin.fileno()
        self._saved = termios.tcgetattr(fd)
        tty.setraw(fd)

        def resized(signum, frame) -> None:  # type: ignore[no-untyped-def]
            from mctl.core import terminal

            rows, cols = terminal.local_size()
            try:
                self._p.resize(rows, cols)
            except Exception:  # noqa: BLE001 - it ended
                pass

        self._old_handler = signal.signal(signal.SIGWINCH, resized)

    def __exit__(self, *exc) -> None:  # type: ignore[no-untyped-def]
        import signal

        if self._saved is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._saved)
            signal.signal(signal.SIGWINCH, self._old_handler or signal.SIG_DFL)


@sandbox.command("logs", short_help="Print what the sandbox's main command wrote.")
@click.argument("sandbox_id")
def sandbox_logs(sandbox_id: str) -> None:
    """Print what the sandbox's main command wrote (stdout, then stderr)."""
    from mctl.cli.main import _admin

    logs = _admin("GET", f"/api/sandboxes/{sandbox_id}/logs")
    click.echo(logs["stdout"], nl=False)
    click.echo(logs["stderr"], nl=False, err=True)


@sandbox.command("terminate")
@click.argument("sandbox_id")
def sandbox_terminate(sandbox_id: str) -> None:
    """Kill the sandbox and every process in it."""
    from mctl.cli.main import _admin

    rec = _admin("POST", f"/api/sandboxes/{sandbox_id}/terminate")
    click.echo(f"Sandbox {sandbox_id} is {rec['state']}.")
