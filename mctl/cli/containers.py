"""`mctl container list|logs|exec|stop`, `mctl config show` and `mctl profile`, as in Modal's CLI."""

from __future__ import annotations

import json
import os

import click


@click.group(short_help="List running containers (workers), read their logs, stop one.")
def container() -> None:
    """The workers of running apps: Modal calls them containers."""


@container.command("list", short_help="The running containers: app, function, host, state.")
@click.option("--app", "app_name", help="Only this app's (name or id).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def container_list(app_name: str | None, as_json: bool) -> None:
    from mctl.cli.main import _admin_list, _when, embedded_note

    rows = _admin_list("/api/containers", params={"app": app_name} if app_name else None)
    if rows is None:
        click.echo("[]" if as_json else "No containers are running (no mctl server is running)."
                   + embedded_note())
        return
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("No containers are running." + embedded_note())
        return
    click.echo(f"{'CONTAINER':<27} {'APP':<16} {'FUNCTION':<20} {'HOST':<14} {'STATE':<9} "
               f"{'INPUTS':>6}  SINCE")
    for r in rows:
        click.echo(f"{r['container_id']:<27} {r['app']:<16} {r['function']:<20} "
                   f"{(r['host'] or '-'):<14} {r['state']:<9} {r['inputs']:>6}  "
                   f"{_when(r['connected_at'])}")


@container.command("logs")
@click.argument("container_id")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
def container_logs(container_id: str, follow: bool) -> None:
    """Print what one container's function printed."""
    from mctl.cli.main import print_logs

    print_logs(f"/api/containers/{container_id}/logs", follow,
               lambda row: f"{row['function']}  {row['line']}")


@container.command("stop")
@click.argument("container_id")
def container_stop(container_id: str) -> None:
    """Stop a container: it finishes the inputs it holds, then exits; its function gets a new
    one if it still needs one."""
    from mctl.cli.main import _admin

    result = _admin("POST", f"/api/containers/{container_id}/stop")
    click.echo(f"Stopping {container_id}: it finishes its {result['inputs']} running input(s) "
               "and exits.")


@container.command("exec", context_settings={"ignore_unknown_options": True,
                                              "allow_interspersed_args": False})
@click.option("--pty/--no-pty", default=None,
              help="Run the command on a terminal (default: when this one is a terminal).")
@click.argument("container_id")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def container_exec(pty: bool | None, container_id: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside a running container: `mctl container exec ta-... -- ls /data`.

    It runs beside the function, with its environment, files and secrets; its output is
    printed here and its exit status is this command's. Needs a token with the deploy scope."""
    import sys

    from mctl.cli.main import NO_SERVER, running_server
    from mctl.core.client import run_sync

    url = running_server()
    if url is None:
        raise click.ClickException(NO_SERVER)
    argv = list(command[1:] if command and command[0] == "--" else command)
    if not argv:
        raise click.ClickException("Name the command to run: mctl container exec ID -- CMD.")
    if pty is None:
        pty = sys.stdin.isatty() and sys.stdout.isatty()
    try:
        code = run_sync(_exec(url, container_id, argv, pty), timeout=None)
    except KeyboardInterrupt:  # the connection closes with this process: the server kills it
        click.echo(f"mctl: interrupted (Ctrl-C); the command in container {container_id} was "
                   "stopped.", err=True)
        sys.exit(130)
    sys.exit(code)


async def _exec(url: str, container_id: str, argv: list[str], pty: bool) -> int:
    """The client side of `GET /api/containers/ID/exec` (server/containers.exec_route)."""
    import asyncio
    import os
    import shutil
    import sys
    import threading

    import aiohttp

    from mctl.core import transport

    raw_mode = None
    if pty and sys.stdin.isatty():
        import termios
        import tty

        raw_mode = termios.tcgetattr(sys.stdin.fileno())
    size = shutil.get_terminal_size()
    loop = asyncio.get_running_loop()
    ws_url = url.replace("http", "ws", 1) + f"/api/containers/{container_id}/exec"
    try:
        async with aiohttp.ClientSession(headers=transport.auth_headers(url)) as session:
            async with session.ws_connect(ws_url, ssl=transport.aiohttp_ssl(url),
                                          heartbeat=30) as ws:
                await ws.send_json({"argv": argv, "pty": pty, "rows": size.lines,
                                    "cols": size.columns, "term": os.environ.get("TERM")})
                if raw_mode is not None:
                    tty.setraw(sys.stdin.fileno())

                def stdin_pump() -> None:  # a thread: reading a terminal blocks
                    while True:
                        try:
                            data = os.read(sys.stdin.fileno(), 65536)
                        except OSError:
                            data = b""
                        if not data:
                            asyncio.run_coroutine_threadsafe(ws.send_json({"eof": True}), loop)
                            return
                        asyncio.run_coroutine_threadsafe(ws.send_bytes(data), loop)

                if not sys.stdin.closed:
                    threading.Thread(target=stdin_pump, daemon=True).start()
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        out = sys.stdout if msg.data[:1] != b"\x02" else sys.stderr
                        out.buffer.write(msg.data[1:])
                        out.buffer.flush()
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        end = msg.json()
                        if "error" in end:
                            click.echo(f"Error: {end['error']}", err=True)
                            return 1
                        return int(end["exit"])
                click.echo("Error: the control plane closed the connection.", err=True)
                return 1
    except aiohttp.WSServerHandshakeError as exc:
        if exc.status in (401, 403):
            raise click.ClickException(
                "The control plane refused: running a command in a container needs a token "
                "with the deploy scope (`mctl token create --scope deploy`).") from None
        if exc.status == 404:
            raise click.ClickException(f"No container {container_id!r}; `mctl container list` "
                                       "shows the running ones.") from None
        raise click.ClickException(f"The control plane refused the exec ({exc.status}).") from None
    finally:
        if raw_mode is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, raw_mode)


@click.group(short_help="Show mctl's configuration.")
def config() -> None:
    """Where this client looks for its control plane, token and state."""


@config.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def config_show(as_json: bool) -> None:
    """The settings in effect and where each comes from (token values are never shown)."""
    from mctl.core import config as cfg

    try:
        choice = cfg.server_choice()
        server, server_from = choice.url, choice.where
    except Exception as exc:  # noqa: BLE001 - a malformed URL: show what is wrong
        server, server_from = f"invalid: {exc}", None
    token, source = cfg.token_choice()
    data = {
        "server": server,
        "server_from": server_from,
        "token": "set" if token else None, "token_from": source,
        "home": str(cfg.home()), "environment": cfg.environment_name(),
        "server_config": str(cfg.server_config_file()),
        "server_config_present": cfg.server_config_file().is_file(),
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    present = data.pop("server_config_present")
    if not present:  # the default path is listed so that one knows where to create it
        data["server_config"] = f"{data['server_config']} (not present)"
    for key, value in data.items():
        click.echo(f"{key:<14} {value if value is not None else '-'}")


@click.group(short_help="Switch between saved tokens and servers (profiles).")
def profile() -> None:
    """Profiles: a token and a server each, saved by `mctl token set TOKEN --profile NAME`;
    `MCTL_PROFILE` picks one for a single command. With no active profile, commands use the
    local background server and the admin token it wrote to $MCTL_HOME/token."""


@profile.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def profile_list(as_json: bool) -> None:
    """The saved profiles and their servers; `*` marks the active one (never the tokens)."""
    from mctl.core.config import list_profiles

    rows = _or_exit(list_profiles)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("No profiles yet; `mctl token set TOKEN --server URL --profile NAME` saves one.")
    for r in rows:
        nomad = r["nomad"] or {}
        extra = f"  nomad {nomad['address']}" if nomad.get("address") else ""  # type: ignore[index]
        click.echo(f"{'*' if r['active'] else ' '} {r['name']:<16} {r['server'] or '-'}{extra}")


@profile.command("activate")
@click.argument("name")
def profile_activate(name: str) -> None:
    """Use profile NAME's token and server from now on."""
    from mctl.core.config import activate_profile

    _or_exit(activate_profile, name)
    click.echo(f"Profile {name} is active.")


@profile.command("current")
def profile_current() -> None:
    """The active profile's name, or `none` (the local server and its admin token)."""
    from mctl.core.config import active_profile_name

    click.echo(_or_exit(active_profile_name) or "none")


@profile.command("deactivate")
def profile_deactivate() -> None:
    """Use no profile: back to the local background server and its admin token."""
    from mctl.core.config import deactivate_profile

    was = _or_exit(deactivate_profile)
    click.echo(f"Profile {was} is no longer active; commands use the local server and its admin "
               "token." if was else "No profile was active; commands use the local server.")


@profile.command("delete")
@click.argument("name")
def profile_delete(name: str) -> None:
    """Forget profile NAME and its token."""
    from mctl.core.config import delete_profile

    was_active = _or_exit(delete_profile, name)
    click.echo(f"Deleted profile {name}" + ("; no profile is active now (the local server and "
                                            "its admin token)." if was_active else "."))


def _or_exit(fn, *args):  # type: ignore[no-untyped-def]
    from mctl.exception import Error

    try:
        return fn(*args)
    except Error as exc:
        raise click.ClickException(str(exc)) from None
