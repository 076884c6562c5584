"""`mctl serve app.py`: run an app with its web endpoints live, and run it again when its files
change. Every run is on the same control plane (an embedded one unless MCTL_SERVER_URL or a
profile names a server) and an ephemeral app's URL names the app, not the run, so the URLs stay
the same."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any

import click


def _watched(app_ref: str) -> dict[str, float]:
    """Modification times of the .py files in the app file's directory tree."""
    from mctl.core.runtime.loader import cache_dir

    root = os.path.dirname(os.path.abspath(app_ref.partition("::")[0]))
    # Workers unpack the app's bundle into mctl's cache: when that lies inside the app's
    # directory (MCTL_CACHE_DIR), its copies of the app's files are not edits to reload on.
    cache = os.path.realpath(cache_dir())
    times = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "venv")
                   and os.path.realpath(os.path.join(folder, d)) != cache]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with contextlib.suppress(OSError):
                    times[path] = os.stat(path).st_mtime
    return times


def _wait_for_change(app_ref: str, before: dict[str, float], deadline: float | None) -> bool:
    """True when a file changed; False when the deadline passed."""
    while deadline is None or time.monotonic() < deadline:
        time.sleep(0.3)
        if _watched(app_ref) != before:
            return True
    return False


@click.command(short_help="Run an app with its web endpoints live; reload on file change.")
@click.argument("app_ref")
@click.option("--timeout", type=float, help="Stop after this many seconds (default: Ctrl-C).")
def serve(app_ref: str, timeout: float | None) -> None:
    """Run APP_REF's functions and web endpoints until Ctrl-C; edits to the app's .py files run
    it again with the new code (the endpoint URLs stay the same)."""
    from mctl.cli.main import import_app_file
    from mctl.core.config import named_server_url
    from mctl.core.runner import embedded_server
    from mctl.exception import Error

    deadline = time.monotonic() + timeout if timeout else None

    def message(exc: Exception) -> Any:
        return exc.format_message() if isinstance(exc, click.ClickException) else str(exc)

    with contextlib.ExitStack() as stack:
        if not named_server_url():
            os.environ["MCTL_SERVER_URL"] = stack.enter_context(embedded_server())
            stack.callback(os.environ.pop, "MCTL_SERVER_URL", None)
        running = contextlib.ExitStack()  # the app as last loaded, live until a good edit
        stack.enter_context(running)
        try:
            while True:
                before = _watched(app_ref)
                try:
                    # Import the edited files before stopping what runs: an edit that does not
                    # load (a syntax error) leaves the previous version serving.
                    _, app, _ = import_app_file(app_ref)
                except (click.ClickException, Error) as exc:
                    note = "; the previous version keeps serving" if _has_run(running) else ""
                    click.echo(f"mctl serve: {message(exc)}{note}", err=True)
                else:
                    running.close()
                    try:
                        running.enter_context(app.run())
                        click.echo(f"Serving {app.name}; edit its files to reload, Ctrl-C to "
                                   "stop.", err=True)
                    except (click.ClickException, Error) as exc:  # wait for the fix
                        running.close()
                        click.echo(f"mctl serve: {message(exc)}", err=True)
                if not _wait_for_change(app_ref, before, deadline):
                    return
                click.echo("mctl serve: files changed; reloading.", err=True)
        except KeyboardInterrupt:
            sys.exit(130)


def _has_run(running: contextlib.ExitStack) -> bool:
    return bool(running._exit_callbacks)  # type: ignore[attr-defined]
