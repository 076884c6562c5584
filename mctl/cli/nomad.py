"""`mctl nomad render APP_FILE`: the Nomad jobs of an app, printed without contacting anything
(also what `mctl deploy --scheduler nomad --dry-run` prints)."""

from __future__ import annotations

import json

import click

from mctl.exception import Error


def render_jobs(app_ref: str, name: str | None, option_pairs: tuple[str, ...]) -> list[dict]:
    """Import the app file, compile it and render every job (no server, no builder)."""
    from mctl.cli.main import import_app_file
    from mctl.core.compile import compile_app
    from mctl.core.config import parse_options
    from mctl.core.server.control import deployed_app_id
    from mctl.plugins.nomad_render import NomadOptions, render_app

    _, app, _ = import_app_file(app_ref)
    app_name = name or app.name
    if not app_name:
        raise click.UsageError("A deployed app needs a name: mctl.App('my-app') or --name my-app.")
    try:
        options = NomadOptions.parse(parse_options(option_pairs))
        spec, _ = compile_app(app, deployed_app_id(app_name), app_name)
        return render_app(spec, deployed_app_id(app_name), options)
    except Error as exc:
        raise click.ClickException(str(exc)) from None


def print_jobs(jobs: list[dict], hcl: bool) -> None:
    if hcl:
        from mctl.plugins.nomad_hcl import to_hcl

        click.echo("\n".join(to_hcl(job) for job in jobs), nl=False)
    else:  # one JSON document per job: what `PUT /v1/jobs` receives
        for job in jobs:
            click.echo(json.dumps(job, indent=2))


@click.group()
def nomad() -> None:
    """Nomad: render an app's jobs (the `nomad` scheduler submits the same ones)."""


@nomad.command("render")
@click.argument("app_file")
@click.option("--name", help="Render under this app name instead of the App's own.")
@click.option("-o", "--option", "options", multiple=True, metavar="KEY=VALUE",
              help="A nomad plugin option (datacenters, namespace, driver, ...); repeat.")
@click.option("--hcl", is_flag=True, help="Print HCL jobspecs instead of JSON.")
def render(app_file: str, name: str | None, options: tuple[str, ...], hcl: bool) -> None:
    """Print the Nomad jobs of APP_FILE: a service job per function, a periodic job per schedule.

    Nothing is contacted; the jobs carry no secret values and no token (the backend writes each
    worker's task token to its job's Nomad Variable)."""
    print_jobs(render_jobs(app_file, name, options), hcl)
