"""`mctl profile nomad NAME`: the Nomad cluster that goes with a profile, for the commands that
talk to Nomad from this machine (`mctl nomad force|logs`).

A profile points this client at an mctl control plane; when that control plane places its
workers on Nomad, `mctl nomad logs` and `mctl nomad force` talk to the same cluster, and switching
profiles should switch clusters too. Each setting sits below the variable Nomad's own CLI reads
(a `-o` option, then NOMAD_ADDR, NOMAD_TOKEN, NOMAD_NAMESPACE, NOMAD_REGION, NOMAD_CACERT, then the
profile), so a shell set up for the nomad CLI keeps working as it did. The token is not copied
into mctl's files: the profile names the file that holds it (`--token-file`).

`mctl server --scheduler nomad` does not read profiles: a profile is this client's choice of
control plane, and a server that followed `mctl profile activate` would move its state to another
cluster on its next restart. The server's Nomad settings are its own: `[scheduler.options]` in
server.toml, `--scheduler-option`, or NOMAD_* in its environment.
"""

from __future__ import annotations

import click


@click.command("nomad")
@click.argument("name")
@click.option("--address", help="Nomad's HTTP API, e.g. https://nomad.example.org:4646 "
                                "(as NOMAD_ADDR).")
@click.option("--namespace", help="The Nomad namespace of the apps' jobs (as NOMAD_NAMESPACE).")
@click.option("--region", help="The Nomad region (as NOMAD_REGION).")
@click.option("--cacert", type=click.Path(dir_okay=False),
              help="CA certificate (PEM) that Nomad's TLS certificate is checked with "
                   "(as NOMAD_CACERT).")
@click.option("--token-file", type=click.Path(dir_okay=False),
              help="A file holding the Nomad ACL token (read at each use; the token itself is "
                   "never stored by mctl).")
@click.option("--clear", is_flag=True, help="Forget the settings not given here.")
def profile_nomad(name: str, address: str | None, namespace: str | None, region: str | None,
                  cacert: str | None, token_file: str | None, clear: bool) -> None:
    """Save (or show, with no option) profile NAME's Nomad settings, used by `mctl nomad force`
    and `mctl nomad logs` while NAME is active. NOMAD_* variables and `-o` options win over
    them; `mctl server --scheduler nomad` reads its own settings, not profiles."""
    from mctl.cli.containers import _or_exit
    from mctl.core.config import list_profiles, set_profile_nomad

    given = {"address": address, "namespace": namespace, "region": region, "cacert": cacert,
             "token_file": token_file}
    if not any(given.values()) and not clear:
        rows = {r["name"]: r for r in _or_exit(list_profiles)}
        if name not in rows:
            raise click.ClickException(f"No profile named {name!r}; `mctl profile list` shows "
                                       "them.")
        _show(name, rows[name]["nomad"] or {})  # type: ignore[arg-type]
        return
    nomad = _or_exit(set_profile_nomad, name, {k: v for k, v in given.items() if v}, clear)
    _show(name, nomad)


def _show(name: str, nomad: dict[str, str]) -> None:
    if not nomad:
        click.echo(f"Profile {name} has no Nomad settings; `mctl nomad` commands use NOMAD_* and "
                   "Nomad's defaults.")
        return
    click.echo(f"Profile {name}'s Nomad settings (NOMAD_* variables win over them):")
    for key in ("address", "namespace", "region", "cacert", "token_file"):
        if nomad.get(key):
            click.echo(f"  {key:<10} {nomad[key]}")
