"""`mctl environment list|create`, for scripts written for Modal's `modal environment`.

mctl has one environment per control plane: `list` shows it; another environment is another
`mctl server` (with its own `MCTL_ENVIRONMENT`), reached through a profile."""

from __future__ import annotations

import json

import click


@click.group(short_help="The environment of this control plane (one per control plane).")
def environment() -> None:
    """Modal's environments: in mctl, each control plane is one environment."""


@environment.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def environment_list(as_json: bool) -> None:
    """The control plane's environment (there is exactly one)."""
    from mctl.cli.main import _admin
    from mctl.core.config import configured_server_url

    env = _admin("GET", "/api/environment")
    rows = [{"name": env["name"], "default": env["default"], "server": configured_server_url()}]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'NAME':<16} {'DEFAULT':<8} SERVER")
    for r in rows:
        click.echo(f"{r['name']:<16} {'yes' if r['default'] else 'no':<8} {r['server']}")


@environment.command("create")
@click.argument("name")
def environment_create(name: str) -> None:
    """Refused, with what to do instead: environments are control planes in mctl."""
    raise click.ClickException(
        f"mctl has one environment per control plane, so it cannot create {name!r} here. Start "
        f"another control plane with `MCTL_ENVIRONMENT={name} mctl server --state-dir DIR "
        "--port PORT`, then save it as a profile with `mctl token set TOKEN --server URL "
        f"--profile {name}` and switch with `mctl profile activate {name}`.")
