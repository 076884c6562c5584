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


@click.group(short_help="Nomad: render an app's jobs, run a schedule now, read logs.")
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


def _backend(option_pairs: tuple[str, ...]):
    """The nomad backend's client, with its settings from -o options, then NOMAD_*, then the
    active profile (`mctl profile nomad`)."""
    import os

    from mctl.core.config import NOMAD_SETTINGS, parse_options, profile_nomad
    from mctl.plugins.scheduler_nomad import NomadScheduler

    try:
        options = parse_options(option_pairs)
        for key, value in profile_nomad().items():
            if key not in options and not os.environ.get(NOMAD_SETTINGS[key]):
                options[key] = value
        return NomadScheduler(options)
    except Error as exc:
        raise click.ClickException(str(exc)) from None


def _run(work) -> None:
    """Run a coroutine against Nomad; its errors are one line (what failed, what to set)."""
    import asyncio

    try:
        asyncio.run(work)
    except Error as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass


connection_option = click.option(
    "-o", "--option", "options", multiple=True, metavar="KEY=VALUE",
    help="A nomad backend option (address, token_file, cacert, namespace, region); repeat. "
         "NOMAD_ADDR, NOMAD_TOKEN, NOMAD_NAMESPACE, NOMAD_REGION, NOMAD_CACERT are read as by "
         "Nomad's CLI, then the active profile's (`mctl profile nomad`).")


@nomad.command("force")
@click.argument("app_name")
@click.argument("function")
@connection_option
def force(app_name: str, function: str, options: tuple[str, ...]) -> None:
    """Run FUNCTION's schedule now: Nomad launches its periodic job (`nomad job periodic force`),
    which spawns one call."""
    from mctl.plugins.nomad_render import job_id

    backend = _backend(options)
    jid = job_id(app_name, function) + "-schedule"
    ns = backend.render.for_function(function).namespace  # function.<tag>.namespace=...

    async def work() -> None:
        try:
            answer = await backend.api.force(jid, ns)
        finally:
            await backend.shutdown()
        if answer is None:
            raise click.ClickException(
                f"Nomad has no periodic job {jid} in namespace {ns}. Check "
                f"that {app_name} is deployed on the nomad backend and that {function} has a "
                "schedule.")
        click.echo(f"Forced {jid}: evaluation {answer.get('EvalID', '?')}")

    _run(work())


@nomad.command("logs")
@click.argument("app_name")
@click.argument("function")
@click.option("-f", "--follow", is_flag=True, help="Keep printing what the workers write.")
@click.option("--stderr", "kind", flag_value="stderr", default="stdout",
              help="The workers' stderr instead of stdout.")
@click.option("--tail", "tail_bytes", default=8192, show_default=True,
              help="Start this many bytes before the end of each log.")
@connection_option
def logs(app_name: str, function: str, follow: bool, kind: str, tail_bytes: int,
         options: tuple[str, ...]) -> None:
    """Print the Nomad allocation logs of FUNCTION's running workers, as Nomad's client keeps
    them (what a worker wrote before it reached the control plane included; `mctl app logs`
    shows what workers send to the control plane)."""
    import asyncio

    from mctl.plugins.nomad_render import job_id

    backend = _backend(options)
    jid = job_id(app_name, function)
    ns = backend.render.for_function(function).namespace  # function.<tag>.namespace=...

    async def one(alloc: dict) -> None:
        prefix = f"{alloc['ID'][:8]} "
        pending = b""
        async for data in backend.stream_logs(alloc["ID"], kind=kind, follow=follow,
                                              tail_bytes=tail_bytes, ns=ns):
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                click.echo(prefix + line.decode(errors="replace"))
        if pending:
            click.echo(prefix + pending.decode(errors="replace"))

    async def work() -> None:
        try:
            allocs = await backend.api.allocations(jid, ns)
            running = [a for a in allocs or [] if a.get("ClientStatus") == "running"]
            if allocs is None:
                raise click.ClickException(
                    f"Nomad has no job {jid} in namespace {ns}. Check that "
                    f"{app_name} is deployed on the nomad backend.")
            if not running:
                click.echo(f"{jid} has no running allocation.", err=True)
                return
            await asyncio.gather(*(one(alloc) for alloc in running))
        finally:
            await backend.shutdown()

    _run(work())
