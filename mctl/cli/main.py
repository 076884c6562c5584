"""`mctl`: run, deploy, app, secret, token, audit, plugins, server. Plugins add commands through a
hook."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import inspect
import json
import os
import sys
import time
import traceback
from typing import Any

import click

from mctl.exception import Error


def user_traceback(exc: BaseException) -> str:
    """The traceback of an error in the user's code, without mctl's or click's frames."""
    from mctl.core.tracebacks import format_user_traceback

    return format_user_traceback(exc, hide_dirs=[os.path.dirname(click.__file__)]).rstrip()


def _user_location(exc: BaseException) -> str:
    """`path:line: ` of the user's innermost frame in `exc`'s traceback, or ''."""
    from mctl.core.tracebacks import MCTL_DIR

    where = ""
    for frame, line in traceback.walk_tb(exc.__traceback__):
        filename = frame.f_code.co_filename
        if not filename.startswith(("<", MCTL_DIR + os.sep)):
            where = f"{filename}:{line}: "
    return where


def import_app_file(ref: str) -> tuple[Any, Any, str | None]:
    """`path/app.py[::name]` -> (module, App, object name).

    An error while importing the file is shown as the user's own: a syntax error as file, line
    and message; any other exception with the user's frames only.
    """
    from mctl.sdk.app import App

    path, _, obj_name = ref.partition("::")
    if not os.path.exists(path):
        raise click.UsageError(f"No such file {path!r}; pass the path of your app's .py file.")
    if os.path.isdir(path):
        raise click.UsageError(f"{path} is a directory; pass one app's .py file in it (e.g. "
                               f"{os.path.join(path.rstrip(os.sep), 'app.py')}), or -m "
                               "package.module with `mctl run`.")
    if not path.endswith(".py"):
        raise click.UsageError(f"{path} is not a Python file; pass your app's .py file "
                               "(path/to/app.py[::NAME]).")
    path = os.path.abspath(path)
    module_name = os.path.splitext(os.path.basename(path))[0]
    sys.path.insert(0, os.path.dirname(path))
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Error as exc:  # a declaration mctl refused: its message says what to do
        raise click.ClickException(f"{_user_location(exc)}{exc}") from None
    except Exception as exc:  # a syntax error, a failed import, a NameError, ...
        raise click.ClickException(f"Could not import {path}:\n{user_traceback(exc)}"
                                   f"{_modal_hint(exc)}") from None
    apps = [v for v in vars(module).values() if isinstance(v, App)]
    if not apps:
        raise click.UsageError(f"{path} defines no mctl.App; create one with app = mctl.App(...).")
    app = vars(module).get("app") if isinstance(vars(module).get("app"), App) else apps[0]
    return module, app, obj_name or None


def _parse_entrypoint_args(label: str, sig: inspect.Signature, args: list[str]) -> dict[str, Any]:
    """`--name value` (or `--name=value`) pairs converted by the parameters' annotations (int, float, bool, str).
    A required parameter left out is refused here, before anything runs remotely."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise click.UsageError(f"Unexpected argument {arg!r}; pass arguments as --name value "
                                   "or --name=value.")
        key, has_value, inline = arg[2:].partition("=")  # --name=value, as click takes it
        key = key.replace("-", "_")
        if key.startswith("no_") and key[3:] in sig.parameters and not has_value:
            out[key[3:]] = False
            i += 1
            continue
        if key not in sig.parameters:
            raise click.UsageError(f"{label} has no parameter {key!r}; it takes "
                                   f"{', '.join(sig.parameters) or 'none'}.")
        param = sig.parameters[key]
        annotation = param.annotation
        if annotation in (bool, "bool"):
            if has_value:
                flag = {"true": True, "1": True, "yes": True, "false": False, "0": False,
                        "no": False}.get(inline.lower())
                if flag is None:
                    raise click.UsageError(f"--{key} is a flag; pass --{key} or "
                                           f"--no-{key.replace('_', '-')} (or =true/=false).")
                out[key] = flag
            else:
                out[key] = True
            i += 1
            continue
        if has_value:
            value: Any = inline
            step = 1
        elif i + 1 >= len(args):
            raise click.UsageError(f"--{key} needs a value.")
        else:
            value = args[i + 1]
            step = 2
        converter = {int: int, "int": int, float: float, "float": float}.get(annotation)
        if converter:
            try:
                value = converter(value)
            except ValueError:
                article = "an" if converter is int else "a"
                raise click.UsageError(f"--{key} must be {article} {converter.__name__}, got "
                                       f"{value!r}.") from None
        out[key] = value
        i += step
    missing = [name for name, p in sig.parameters.items()
               if p.default is inspect.Parameter.empty and name not in out
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing:
        raise click.UsageError(f"Missing {', '.join('--' + m.replace('_', '-') for m in missing)}"
                               f" for {label}; `--help` after the app lists its parameters.")
    return out


def _modal_hint(exc: BaseException) -> str:
    """What to write when an app imports Modal's package, which mctl does not install."""
    name = getattr(exc, "name", None) or ""
    if not isinstance(exc, ModuleNotFoundError) or name.split(".")[0] != "modal":
        return ""
    return ("\nmctl runs Modal's code under its own name and installs no `modal` package: write "
            "`import mctl as modal` for `import modal`, and mctl for modal in `from modal... "
            "import ...` (`from mctl.dict import Dict`, `from mctl import Secret`).")


def import_app_module(ref: str) -> tuple[Any, Any, str | None]:
    """`package.module[::name]` (mctl run -m) -> (module, App, object name)."""
    import importlib

    from mctl.sdk.app import App

    module_name, _, obj_name = ref.partition("::")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise click.UsageError(f"No module named {module_name!r} importable from "
                                   f"{os.getcwd()}; run from the directory that holds it, or "
                                   "pass a file path instead of -m.") from None
        raise click.ClickException(f"Could not import {module_name}:\n{user_traceback(exc)}"
                                   f"{_modal_hint(exc)}") from None
    except Error as exc:
        raise click.ClickException(f"{_user_location(exc)}{exc}") from None
    except Exception as exc:
        raise click.ClickException(f"Could not import {module_name}:\n{user_traceback(exc)}"
                                   ) from None
    apps = [v for v in vars(module).values() if isinstance(v, App)]
    if not apps:
        raise click.UsageError(f"{module_name} defines no mctl.App; create one with "
                               "app = mctl.App(...).")
    app = vars(module).get("app") if isinstance(vars(module).get("app"), App) else apps[0]
    return module, app, obj_name or None


@click.group()
@click.version_option(package_name="mctl")
def cli() -> None:
    """mctl: serverless Python functions on your own machines with Modal's API: on this machine,
    a Slurm cluster or Nomad. `mctl run app.py` runs an app; `mctl COMMAND --help` says more."""


RUN_HELP = """Run APP_REF (path.py, path.py::NAME or path.py::Cls.method) on an ephemeral app.

Arguments after APP_REF go to what runs, as --name value or --name=value; `mctl run APP_REF
--help` lists them.
NAME is a local entrypoint or a function; without one, the app's only entrypoint (or function).
"""


@cli.command(help=RUN_HELP, short_help="Run an app's entrypoint or function on an ephemeral app.",
             add_help_option=False, context_settings={
    "ignore_unknown_options": True, "allow_extra_args": True, "allow_interspersed_args": False})
@click.argument("app_ref", required=False)
@click.option("-m", "module", metavar="PACKAGE.MODULE[::NAME]",
              help="Run an app from an importable module instead of a file.")
@click.option("--detach", is_flag=True, help="Keep the app running after this command exits (on "
              "the background server); stop it with `mctl app stop APP_ID`.")
@click.option("-e", "--env", "env_name", help="The environment to run in (MCTL_ENVIRONMENT).")
@click.option("-q", "--quiet", is_flag=True, help="Print only what the app prints.")
@click.option("-h", "--help", "show_help", is_flag=True, help="Show this message and exit.")
@click.pass_context
def run(ctx: click.Context, app_ref: str | None, module: str | None, detach: bool,
        env_name: str | None, quiet: bool, show_help: bool) -> None:
    if show_help or not (app_ref or module):
        click.echo(ctx.get_help())
        if not show_help:
            raise click.UsageError("Say what to run: mctl run app.py[::NAME] or mctl run -m "
                                   "package.module[::NAME].")
        return
    if app_ref and module:
        raise click.UsageError("Pass either APP_REF or -m PACKAGE.MODULE, not both.")
    if module and app_ref is None and ctx.args and not ctx.args[0].startswith("-"):
        raise click.UsageError(f"Unexpected argument {ctx.args[0]!r} after -m {module}.")
    if env_name:
        os.environ["MCTL_ENVIRONMENT"] = env_name
    if quiet:
        import logging

        logging.getLogger("mctl").setLevel(logging.ERROR)
    ref = app_ref or module
    assert ref is not None
    try:
        _, app, name = import_app_module(ref) if module else import_app_file(ref)
        label, params, target = _run_target(app, ref, name)
        if "--help" in ctx.args or "-h" in ctx.args:
            click.echo(_target_help(ref, label, params))
            return
        kwargs = _parse_entrypoint_args(label, params, ctx.args)
        with app.run(detach=detach):
            if detach and not quiet:
                click.echo(f"mctl: detached: app {app.app_id} keeps running after this command; "
                           f"stop it with `mctl app stop {app.app_id}`.", err=True)
            result = target(**kwargs)
            if inspect.iscoroutine(result):
                asyncio.run(result)
    except Error as exc:
        raise click.ClickException(str(exc)) from None
    except click.ClickException:
        raise
    except Exception as exc:  # the user's code failed, here or in a function it called
        click.echo(user_traceback(exc), err=True)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C: the app was stopped; one line and 130, as a script's
        from mctl.core.interrupts import say
        from mctl.core.runner import interrupt_line

        say(interrupt_line())
        sys.exit(130)
    except SystemExit as exc:
        name = getattr(exc, "_mctl_function", None)
        if name is None:  # the local entrypoint's own sys.exit: its business
            raise
        # a function called sys.exit(N): say so, and exit with its code as Python would
        code = exc.code
        shown = "" if code is None else repr(code)
        click.echo(f"mctl: function {name} called sys.exit({shown}); mctl run exits with "
                   f"{_exit_status(code)}.", err=True)
        sys.exit(_exit_status(code))


def _exit_status(code: object) -> int:
    """The status Python exits with for `sys.exit(code)`: None is 0, an int itself, else 1."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def _run_target(app: Any, ref: str, name: str | None
                ) -> tuple[str, inspect.Signature, Any]:
    """What `mctl run` calls: (its name, the parameters it takes, a callable)."""
    from mctl.sdk.cls import Cls
    from mctl.sdk.function import Function

    entrypoints = app.registered_entrypoints
    functions = app.registered_functions
    if name is None:
        if len(entrypoints) == 1:
            name = next(iter(entrypoints))
        elif not entrypoints and len(functions) == 1 and isinstance(
                next(iter(functions.values())), Function):
            name = next(iter(functions))
        else:
            choices = ", ".join([*entrypoints, *functions]) or "none"
            raise click.UsageError(f"Say what to run: {ref}::NAME, one of {choices}.")
    if name in entrypoints:
        target = entrypoints[name]
        return name, inspect.signature(target), target
    cls_name, _, method = name.partition(".")
    handle = functions.get(cls_name)
    if isinstance(handle, Function) and not method:
        def call_function(**kw: Any) -> None:
            if handle._is_generator:  # as Modal's CLI does: each item as it arrives
                for item in handle.remote_gen(**kw):
                    print(item, flush=True)
                return
            result = handle.remote(**kw)
            if result is not None:
                print(result)

        return name, inspect.signature(handle.raw_f), call_function
    if isinstance(handle, Cls) and method:
        if method not in handle._methods:
            raise click.UsageError(f"{cls_name} has no method {method!r}; it has "
                                   f"{', '.join(handle._methods) or 'none'}.")
        from mctl.sdk.cls import constructor_params, parameter_annotations

        raw = getattr(handle.user_cls, method)
        sig = inspect.signature(getattr(raw, "raw_f", raw))  # @method wraps the function
        method_params = list(sig.parameters.values())[1:]  # without self
        # The class's parameters are options too (`--size 2`), as in Modal's CLI.
        annotations = parameter_annotations(handle.user_cls)
        class_params = {
            n: inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY,
                                 default=p.default if p.has_default else inspect.Parameter.empty,
                                 annotation=annotations.get(n, inspect.Parameter.empty))
            for n, p in constructor_params(handle.user_cls).items()
            if n not in {m.name for m in method_params}}
        sig = sig.replace(parameters=sorted(
            [*method_params, *class_params.values()], key=lambda p: p.kind))

        def call_method(**kw: Any) -> None:
            init = {n: kw.pop(n) for n in list(kw) if n in class_params}
            bound = getattr(handle(**init), method)
            if handle._methods[method]:
                for item in bound.remote_gen(**kw):
                    print(item)
            else:
                result = bound.remote(**kw)
                if result is not None:
                    print(result)

        return name, sig, call_method
    if isinstance(handle, Cls):
        raise click.UsageError(f"{cls_name} is a class; run one of its methods: {ref.split('::')[0]}"
                               f"::{cls_name}.METHOD ({', '.join(handle._methods) or 'none'}).")
    choices = ", ".join([*entrypoints, *functions]) or "none"
    raise click.UsageError(f"{name!r} is not a local entrypoint or function of the app; it has "
                           f"{choices}.")


def _target_help(ref: str, label: str, params: inspect.Signature) -> str:
    lines = [f"Usage: mctl run {ref.split('::')[0]}::{label} [--name value | --name=value]...",
             ""]
    if not params.parameters:
        lines.append(f"{label} takes no arguments.")
    for param in params.parameters.values():
        kind = param.annotation if isinstance(param.annotation, str) else getattr(
            param.annotation, "__name__", "")
        if param.annotation is inspect.Parameter.empty:
            kind = "str"
        flag = f"--{param.name.replace('_', '-')}"
        if kind == "bool":
            detail = "flag"
        else:
            detail = kind.upper()
        default = ("required" if param.default is inspect.Parameter.empty
                   else f"default: {param.default!r}")
        lines.append(f"  {flag} {detail if detail != 'flag' else ''}".rstrip().ljust(30)
                     + f"[{default}]")
    return "\n".join(lines)


@cli.command(short_help="Deploy an app; it keeps running on the control plane.")
@click.argument("app_ref")
@click.option("--name", help="Deploy under this name instead of the App's own.")
@click.option("--scheduler", help="With --dry-run: the scheduler whose jobs to print (nomad).")
@click.option("--scheduler-option", "scheduler_options", multiple=True, metavar="KEY=VALUE",
              help="With --dry-run: an option of that scheduler; repeat for several.")
@click.option("--dry-run", is_flag=True, help="Print what would be submitted; contact nothing.")
def deploy(app_ref: str, name: str | None, scheduler: str | None,
           scheduler_options: tuple[str, ...], dry_run: bool) -> None:
    """Deploy APP_REF to the control plane; it keeps running (schedules fire there)."""
    from mctl.core.runner import deploy_app

    if dry_run or scheduler:
        if not (dry_run and scheduler == "nomad"):
            raise click.UsageError("--scheduler and --dry-run go together, and only "
                                   "`--scheduler nomad --dry-run` is supported; the control "
                                   "plane's own scheduler places a real deploy.")
        from mctl.cli.nomad import print_jobs, render_jobs

        print_jobs(render_jobs(app_ref, name, scheduler_options), hcl=False)
        return

    try:
        _, app, _ = import_app_file(app_ref)
        result = deploy_app(app, name=name)
    except Error as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Deployed app {result['name']} ({result['app_id']}) version "
               f"{result['version']} on {result['url']}")
    for tag, fid in result["functions"].items():
        click.echo(f"  {tag}  {fid}")
    for endpoint in result.get("web_urls", ()):
        where = endpoint["tag"] + (f".{endpoint['method']}" if endpoint["method"] else "")
        click.echo(f"  web endpoint {where} => {endpoint['url']}")


# --- app -----------------------------------------------------------------------------------------
@cli.group()
def app() -> None:
    """Manage deployed apps: list, stop, history, rollback, logs."""


# What a command about running things (apps, containers, sandboxes) says when no server runs:
# here an absent local server means nothing is running, so such a command starts none.
NO_SERVER = ("No mctl server is running, so no app, container or sandbox is running "
             "(`mctl server start` starts one; MCTL_SERVER_URL names another).")


def embedded_note() -> str:
    """For a list that came back empty or an id not found: the `mctl run`s alive now on their
    own embedded control planes, which this command cannot reach, and what to do; '' if none."""
    from mctl.core.runner import embedded_runs

    runs = embedded_runs()
    if not runs:
        return ""
    which = ", ".join(f"pid {r['pid']}: app {r.get('name') or r['app_id']}" for r in runs)
    return (f"\n{'A `mctl run` is' if len(runs) == 1 else 'Some `mctl run`s are'} live ({which}) "
            "on its own control plane inside that process, which mctl commands cannot reach. To "
            "see and manage its apps, containers and sandboxes from here, start a server first "
            "(`mctl server start`, or set MCTL_SERVER_URL) and `mctl run` again: it then runs "
            "there.")


def running_server() -> str | None:
    """The server to talk to if one is running: MCTL_SERVER_URL or the profile's (taken as
    given), else the background server recorded in server.json if it is alive; None if none.
    Starts nothing."""
    from mctl.core.config import server_choice
    from mctl.core.runner import background_server

    try:
        choice = server_choice()
    except Error as exc:
        raise click.ClickException(str(exc)) from None
    if choice.source == "background":
        return choice.url if background_server() else None  # a stale server.json
    return choice.url


def _admin_list(path: str, params: dict[str, Any] | None = None) -> list[Any] | None:
    """A list of running things from the control plane; None (not an error, no server started)
    when no server is running."""
    if running_server() is None:
        return None
    return _admin("GET", path, params=params)


def _admin(method: str, path: str, body: Any = None, params: dict[str, Any] | None = None,
           start: bool = False) -> Any:
    """One request to the control plane; `start`: start the background server if none runs
    (stored objects: secrets, volumes, dicts); without it, no running server is NO_SERVER."""
    from mctl.core.client import client_for, close_client, run_sync

    url = running_server()
    if start:
        from mctl.core.runner import ensure_background_server

        try:
            url = ensure_background_server()
        except Error as exc:
            raise click.ClickException(str(exc)) from None
    if url is None:
        raise click.ClickException(NO_SERVER)
    try:
        return run_sync(client_for(url).http(method, path, body, params))
    except Error as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        run_sync(close_client(url))  # one request per command: no session left for the GC


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


@app.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--all", "show_all", is_flag=True, help="Include stopped ephemeral apps.")
def app_list(as_json: bool, show_all: bool) -> None:
    """List apps."""
    apps = _admin_list("/api/apps", params={"all": "1" if show_all else "0"})
    if apps is None:
        click.echo("[]" if as_json else "No apps are running (no mctl server is running)."
                   + embedded_note())
        return
    if as_json:
        click.echo(json.dumps(apps, indent=2))
        return
    if not apps:
        click.echo(("No apps are running." if not show_all else "No apps.") + embedded_note())
        return
    width = max([20, *(len(a["name"]) for a in apps)])  # long names keep the columns straight
    click.echo(f"{'APP ID':<26} {'NAME':<{width}} {'MODE':<10} {'STATE':<8} {'VERSION':<7} "
               "CREATED")
    for a in apps:
        state = "failing" if a.get("failing") and a["state"] == "running" else a["state"]
        click.echo(f"{a['app_id']:<26} {a['name']:<{width}} {a['mode']:<10} {state:<8} "
                   f"{a['version']:<7} {_when(a['created'])}")
        for tag, reason in (a.get("failing") or {}).items():
            click.echo(f"    {tag}: {reason}")
        for tag, run in (a.get("last_run_failed") or {}).items():
            what = {"timeout": "timed out", "crashed": "crashed"}.get(run["status"], "failed")
            click.echo(f"    {tag}: last scheduled run {what} at {_when(run['at'])} "
                       f"({run['call_id']}): {run['error']}; see `mctl app logs {a['name']}`")


@app.command("stop")
@click.argument("name")
def app_stop(name: str) -> None:
    """Stop an app: its workers exit and its schedules stop firing."""
    result = _admin("POST", f"/api/apps/{name}/stop")
    shown = result.get("name") or name
    shown = f"{shown} ({result['app_id']})" if shown != result["app_id"] else shown
    click.echo(f"App {shown} was already stopped; nothing to do." if result.get("already")
               else f"Stopped {shown}")


@app.command("history")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def app_history(name: str, as_json: bool) -> None:
    """Show the versions of a deployed app."""
    result = _admin("GET", f"/api/apps/{name}/history")
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    current = result["app"]["version"]
    click.echo(f"{'VERSION':<8} {'DEPLOYMENT':<26} {'CREATED':<20} NOTE")
    for v in reversed(result["versions"]):
        mark = "*" if v["version"] == current else " "
        click.echo(f"{mark}v{v['version']:<6} {v['deployment_id']:<26} {_when(v['created']):<20} "
                   f"{v['note']}")


@app.command("rollback", short_help="Roll an app back to an earlier version.")
@click.argument("name")
@click.argument("version", required=False, type=str)
def app_rollback(name: str, version: str | None) -> None:
    """Roll NAME back to VERSION (default: the previous one), as a new version."""
    body = {}
    if version is not None:
        try:
            body["version"] = int(version.lstrip("v"))
        except ValueError:
            raise click.UsageError(f"VERSION must be a number such as 2 or v2, not "
                                   f"{version!r}.") from None
    result = _admin("POST", f"/api/apps/{name}/rollback", body)
    click.echo(f"Rolled {name} back to v{result['from']}; now at v{result['version']}")


@app.command("logs")
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("--stream", type=click.Choice(["all", "stdout", "stderr"]), default="all",
              show_default=True, help="Only the lines the functions printed to this stream.")
def app_logs(name: str, follow: bool, stream: str) -> None:
    """Print an app's logs. Lines the functions printed to stderr go to stderr (as `modal app
    logs` and `nomad alloc logs -stderr` do), so `mctl app logs APP > out.txt` keeps only stdout's;
    `--stream` picks one stream."""
    print_logs(f"/api/apps/{name}/logs", follow,
               lambda row: f"{row['function']} {row['task_id']}  {row['line']}", stream,
               until_stopped=True)


def print_logs(path: str, follow: bool, describe: Any, stream: str = "all",
               until_stopped: bool = False) -> None:
    """Page through a logs route (1,000 lines a page); `follow`: long-poll for new lines.
    A stderr line goes to stderr; `stream` other than "all" prints only that stream's.
    `until_stopped` (an app's logs): following ends, with a line saying so, once the app is
    stopped and every line is printed (as `modal app logs` streams only while the app runs)."""
    after = 0
    while True:
        params = {"after": after, "wait": 25 if follow else 0}
        if follow and until_stopped:
            params["state"] = 1
        answer = _admin("GET", path, params=params)
        rows = answer["rows"] if isinstance(answer, dict) else answer  # list: an older server
        for row in rows:
            after = row["id"]
            row_stream = row.get("stream", "stdout")
            if stream not in ("all", row_stream):
                continue
            try:
                if row_stream == "stderr":
                    sys.stdout.flush()
                click.echo(f"{_when(row['ts'])} {describe(row)}", err=row_stream == "stderr")
            except BrokenPipeError:  # `mctl app logs APP | head`: the reader has its lines
                from mctl.core.interrupts import stdout_gone

                stdout_gone()
                sys.exit(141)  # quietly, 128 + SIGPIPE as `yes | head` leaves it
        if len(rows) < 1000 and (not follow or (isinstance(answer, dict)
                                               and answer["state"] == "stopped")):
            if follow:
                shown = (f"{answer['name']} ({answer['app_id']})"
                         if answer["name"] != answer["app_id"] else answer["app_id"])
                sys.stdout.flush()
                click.echo(f"mctl: app {shown} is stopped; no more lines will come.", err=True)
            return


# --- secrets -------------------------------------------------------------------------------------
@cli.group(short_help="Manage secrets: create, list, delete.")
def secret() -> None:
    """Manage the control plane's secrets (its backend: `mctl server --secret-backend`, default
    local).

    The commands go through the control plane (started in the background if none runs), so a
    shared server's workers see the secret and the change is in `mctl audit`."""


def _secret_values(pairs: tuple[str, ...], dotenv: str | None, from_json: str | None
                   ) -> dict[str, str]:
    """Values from --from-dotenv, then --from-json, then KEY=VALUE pairs (later ones win)."""
    values: dict[str, str] = {}
    if dotenv:
        from mctl.sdk.secret import Secret

        try:
            values.update(Secret.from_dotenv(os.path.dirname(os.path.abspath(dotenv)),
                                             filename=os.path.basename(dotenv)).values or {})
        except OSError as exc:
            raise click.UsageError(f"Cannot read {dotenv}: {exc.strerror}.") from None
    if from_json:
        try:
            with open(from_json) as fh:
                data = json.load(fh)
        except OSError as exc:
            raise click.UsageError(f"Cannot read {from_json}: {exc.strerror}.") from None
        except ValueError:
            raise click.UsageError(f"{from_json} is not JSON; give an object of names to "
                                   "strings.") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise click.UsageError(f"{from_json} must hold a JSON object of names to strings.")
        values.update(data)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.UsageError(f"{pair!r} is not KEY=VALUE.")
        values[key] = value
    if not values:
        raise click.UsageError("Give the secret's values as KEY=VALUE, --from-dotenv FILE or "
                               "--from-json FILE.")
    return values


@secret.command("create")
@click.argument("name")
@click.argument("pairs", nargs=-1)
@click.option("--from-dotenv", "dotenv", type=click.Path(dir_okay=False),
              help="Read KEY=VALUE lines from a .env file.")
@click.option("--from-json", "from_json", type=click.Path(dir_okay=False),
              help="Read a JSON object of names to strings.")
@click.option("--force", is_flag=True, help="Replace an existing secret.")
def secret_create(name: str, pairs: tuple[str, ...], dotenv: str | None, from_json: str | None,
                  force: bool) -> None:
    """Create secret NAME from KEY=VALUE pairs or a file."""
    from mctl.cli.secret_direct import create

    if "=" in name:
        raise click.UsageError(f"The secret's name is missing: {name!r} is a KEY=VALUE pair; "
                               f"write `mctl secret create NAME {name} ...`.")
    values = _secret_values(pairs, dotenv, from_json)
    existed = force and any(row["name"] == name for row in _admin("GET", "/api/secrets",
                                                                    start=True))
    how = create(_admin, name, values, force)  # to Vault from here when it can: see that module
    click.echo(f"{'Replaced' if existed else 'Created'} secret {name} with keys "
               f"{', '.join(sorted(values))}"
               + (" (written to Vault from this machine)" if how == "client" else ""))
    if existed:
        click.echo("mctl: containers already running keep the old values until they are "
                   "replaced: `mctl container stop ID` (or deploy the app again) to pick up the "
                   "new ones.", err=True)


@secret.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--all", "show_all", is_flag=True, help="Include apps' inline secrets (values "
              "given in code).")
def secret_list(as_json: bool, show_all: bool) -> None:
    """List secrets: names, keys and dates, never values."""
    rows = _admin("GET", "/api/secrets", params={"all": "1" if show_all else "0"}, start=True)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max([24, *(len(row["name"]) for row in rows)])
    click.echo(f"{'NAME':<{width}} {'UPDATED':<20} KEYS")
    for row in rows:
        mark = " (inline)" if row["inline"] else ""
        click.echo(f"{row['name']:<{width}} {_when(row['updated']):<20} "
                   f"{', '.join(row['keys'])}{mark}")


@secret.command("delete")
@click.argument("name")
@click.option("--allow-missing", is_flag=True, help="Succeed when there is no such secret.")
def secret_delete(name: str, allow_missing: bool) -> None:
    """Delete secret NAME."""
    found = _admin("DELETE", f"/api/secrets/{name}", start=True)["deleted"]
    if not found and not allow_missing:
        raise click.ClickException(f"No secret named {name!r}; `mctl secret list` shows them.")
    click.echo(f"Deleted secret {name}" if found else f"No secret named {name}")


# --- tokens and audit ----------------------------------------------------------------------------
@cli.group(short_help="Manage access tokens: create, list, revoke, set.")
def token() -> None:
    """Manage access tokens: create, list, revoke; `set` saves yours for this machine."""


def _local_state(state_dir: str | None) -> Any:
    """The server state to change directly (no token needed, only access to its files): the one
    named, else the local background server's when this user has no token yet."""
    from pathlib import Path

    from mctl.core.config import configured_token, home

    if state_dir:
        path = Path(state_dir)
        if not (path / "state.db").exists():
            raise click.UsageError(f"{path} holds no mctl server state (no state.db); pass the "
                                   "--state-dir the server runs with.")
        return path
    default = home() / "server"
    if configured_token() is None and (default / "state.db").exists():
        return default
    return None


def _with_local_tokens(state_dir: Any, action: Any) -> Any:
    from mctl.core.server.audit import Audit
    from mctl.core.server.auth import LOCAL, TokenStore
    from mctl.core.server.store import Store

    store = Store(state_dir)
    try:
        return action(TokenStore(store.db), lambda *a, **kw: Audit(state_dir / "audit.log")(
            LOCAL, *a, **kw))
    except Error as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        store.close()


STATE_DIR_HELP = ("Change the tokens of the server state in DIR directly (on the server's machine, "
                  "no token needed).")


@token.command("create")
@click.option("--name", help="A name to recognise it by (default: its id).")
@click.option("--scope", type=click.Choice(["admin", "deploy", "invoke", "proxy"]),
              default="invoke", show_default=True,
              help="admin ⊇ deploy ⊇ invoke; proxy only calls web endpoints that require proxy "
                   "auth (Modal-Key: the token id, Modal-Secret: the token).")
@click.option("--state-dir", type=click.Path(file_okay=False), help=STATE_DIR_HELP)
def token_create(name: str | None, scope: str, state_dir: str | None) -> None:
    """Create a token; it is printed once, on stdout."""
    local = _local_state(state_dir)
    if local is not None:
        def create(tokens: Any, audit: Any) -> dict[str, Any]:
            record, secret = tokens.issue(name, scope)
            audit("token.create", record["token_id"], name=record["name"], scope=scope)
            return {**record, "token": secret}

        result = _with_local_tokens(local, create)
    else:
        result = _admin("POST", "/api/tokens", {"name": name, "scope": scope})
    click.echo(f"Created token {result['token_id']} ({result['name']}, scope {result['scope']}); "
               "it is shown only now:", err=True)
    click.echo(result["token"])


@token.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--all", "show_all", is_flag=True, help="Include workers' task tokens.")
@click.option("--state-dir", type=click.Path(file_okay=False), help=STATE_DIR_HELP)
def token_list(as_json: bool, show_all: bool, state_dir: str | None) -> None:
    """List tokens (never their secrets)."""
    local = _local_state(state_dir)
    if local is not None:
        rows = _with_local_tokens(local, lambda tokens, _: tokens.list(show_all))
    else:
        rows = _admin("GET", "/api/tokens", params={"all": "1" if show_all else "0"})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'ID':<16} {'NAME':<24} {'SCOPE':<7} {'CREATED':<20} {'LAST USED':<20} REVOKED")
    for r in rows:
        click.echo(f"{r['token_id']:<16} {r['name']:<24} {r['scope']:<7} {_when(r['created']):<20} "
                   f"{_when(r['last_used']):<20} {_when(r['revoked'])}")


@token.command("revoke")
@click.argument("id_or_name")
@click.option("--state-dir", type=click.Path(file_okay=False), help=STATE_DIR_HELP)
def token_revoke(id_or_name: str, state_dir: str | None) -> None:
    """Revoke a token by id or name; its connections are closed."""
    local = _local_state(state_dir)
    if local is not None:
        def revoke(tokens: Any, audit: Any) -> dict[str, Any]:
            record = tokens.revoke(id_or_name)
            audit("token.revoke", record["token_id"], name=record["name"], scope=record["scope"])
            return record

        result = _with_local_tokens(local, revoke)
    else:
        result = _admin("POST", f"/api/tokens/{id_or_name}/revoke")
    click.echo(f"Revoked token {result['token_id']} ({result['name']})")


@token.command("set")
@click.argument("token_value", metavar="TOKEN")
@click.option("--server", help="The control plane's URL, e.g. https://mctl.example.org:8600.")
@click.option("--profile", "profile", help="Save under this profile name (default: the active "
              "one, or `default`); `mctl profile activate` switches between them.")
@click.option("--activate/--no-activate", default=None,
              help="Make the profile the active one (a new first profile always is).")
def token_set(token_value: str, server: str | None, profile: str | None,
              activate: bool | None) -> None:
    """Use TOKEN (and --server) from now on: saved in $MCTL_HOME/profile.json, mode 0600."""
    from mctl.core.config import active_profile_name, save_profile

    if not token_value.startswith("mctl_"):
        raise click.UsageError("That is not an mctl token (they start with mctl_); copy the "
                               "whole line `mctl token create` printed.")
    try:
        path = save_profile(token_value.strip(), server, profile, activate)
    except Error as exc:
        raise click.ClickException(str(exc)) from None
    name = profile or active_profile_name()
    active = name == active_profile_name()
    click.echo(f"Saved the token{' and server' if server else ''} to {path} (profile {name}"
               f"{', active' if active else ''})")
    if active:
        click.echo("Commands now use this token; `mctl profile deactivate` goes back to the local "
                   "server and its admin token.")


@cli.command(short_help="Show the audit log: who changed what, when, from where.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines' objects as a list.")
@click.option("--limit", default=50, show_default=True, help="The last N entries.")
def audit(as_json: bool, limit: int) -> None:
    """Show the audit log: deploys, stops, rollbacks, token changes; who and from where."""
    rows = _admin("GET", "/api/audit", params={"limit": limit})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'TIME':<20} {'WHO':<36} {'FROM':<16} {'ACTION':<14} {'TARGET':<26} DETAILS")
    for r in rows:
        details = " ".join(f"{k}={v}" for k, v in r.get("details", {}).items())
        click.echo(f"{_when(r['ts']):<20} {r['who']:<36} {r['from']:<16} {r['action']:<14} "
                   f"{r['target']:<26} {details}")


# --- plugins & server ----------------------------------------------------------------------------
@cli.command()
@click.option("--json", "as_json", is_flag=True)
def plugins(as_json: bool) -> None:
    """List plugins with their versions and hooks."""
    from mctl.core.plugins import describe

    rows = describe()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        kind = "builtin" if row["builtin"] else (row["version"] or "")
        click.echo(f"{row['name']}  {kind}")
        for hook in row["hooks"]:
            click.echo(f"    {hook}")


@cli.group(invoke_without_command=True, short_help="Run the control plane; status, start, stop.")
@click.option("--host", help="Address to listen on (default 127.0.0.1).")
@click.option("--port", type=int, help="Default: the port this state directory used last, "
              "else a free one.")
@click.option("--state-dir", type=click.Path(), help="Default: $MCTL_HOME/server.")
@click.option("--scheduler", help="Scheduler plugin (default: $MCTL_SCHEDULER or local).")
@click.option("--scheduler-option", "scheduler_options", multiple=True, metavar="KEY=VALUE",
              help="An option for the scheduler plugin; repeat for several.")
@click.option("--advertise-url", help="URL workers use to reach this server.")
@click.option("--secret-backend", help="Where `mctl secret` and values given in code are kept: "
              "local (the default) or vault.")
@click.option("--config", "config_path", type=click.Path(),
              help="Settings file (TOML); default $MCTL_HOME/server.toml when it exists.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False),
              help="PEM certificate (chain) to serve HTTPS and WSS with; needs --tls-key.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False),
              help="PEM private key of --tls-cert.")
@click.option("--no-local-token", is_flag=True,
              help="On first start, do not write an admin token to $MCTL_HOME/token.")
@click.pass_context
def server(ctx: click.Context, host: str | None, port: int | None, state_dir: str | None,
           scheduler: str | None, scheduler_options: tuple[str, ...], advertise_url: str | None,
           secret_backend: str | None, config_path: str | None, tls_cert: str | None, tls_key: str | None,
           no_local_token: bool) -> None:
    """Run the control plane in the foreground; `status`, `start` and `stop` manage the
    background server that `mctl deploy` starts.

    Options on the command line override the settings file.
    """
    if ctx.invoked_subcommand is not None:
        return
    import logging
    import signal
    from pathlib import Path

    from mctl.core.config import home, load_server_config, local_token_file, parse_options
    from mctl.core.runner import forget_server_file, write_server_file
    from mctl.core.server.http import start_server

    logging.basicConfig(level=os.environ.get("MCTL_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        settings = load_server_config(config_path)
        sched = settings.get("scheduler", {})
        options = {k: str(v) for k, v in sched.get("options", {}).items()}
        options.update(parse_options(scheduler_options))
    except Error as exc:
        raise click.ClickException(str(exc)) from None
    state = state_dir or settings.get("state_dir")
    advertise_url = advertise_url or settings.get("advertise_url")
    if settings.get("web_domain"):  # web endpoints by host name: <app>--<endpoint>.<domain>
        os.environ.setdefault("MCTL_WEB_DOMAIN", str(settings["web_domain"]))
    ssl_context = _server_tls(tls_cert, tls_key, advertise_url)

    state_path = Path(state) if state else home() / "server"
    chosen_port = port if port is not None else int(settings.get("port", 0))

    async def start(listen_port: int) -> Any:
        return await start_server(
            state_path, host or settings.get("host", "127.0.0.1"), listen_port,
            scheduler or sched.get("name"),
            advertise_url=advertise_url, scheduler_options=options, ssl_context=ssl_context,
            secret_backend=secret_backend or settings.get("secrets", {}).get("backend"),
            bootstrap_tokens=True,
            local_token_file=None if no_local_token else local_token_file())

    async def main() -> None:
        # No port chosen: the one this state directory used last, so the URLs printed for web
        # endpoints and saved in profiles keep working across restarts; a free one if it is taken.
        last = _last_port(state_path) if chosen_port == 0 else None
        try:
            srv = await start(last or chosen_port)
        except OSError:
            if not last:
                raise
            srv = await start(0)
        _remember_port(state_path, srv.url)
        write_server_file(srv.url)
        click.echo(f"mctl control plane listening on {srv.url}", err=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await srv.close()

    try:
        asyncio.run(main())
    except Error as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:  # the address: not this machine's, or the port is taken
        import errno

        if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise click.ClickException(f"The control plane could not start: {exc}") from None
        raise click.ClickException(
            f"Cannot listen on {host or settings.get('host', '127.0.0.1')}:"
            f"{port if port is not None else settings.get('port', 0)}: {exc.strerror}. Use an "
            "address of this machine (--host) and a free port (--port, 0 picks one).") from None
    finally:
        forget_server_file(os.getpid())


def _last_port(state_path: Any) -> int | None:
    try:
        return int((state_path / "port").read_text().strip()) or None
    except (OSError, ValueError):
        return None


def _remember_port(state_path: Any, url: str) -> None:
    from urllib.parse import urlsplit

    with contextlib.suppress(OSError):
        (state_path / "port").write_text(f"{urlsplit(url).port}\n")


def _uptime(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


@server.command("status")
def server_status() -> None:
    """Say which server commands use and whether it answers; and whether the local background
    server (the one `mctl server start/stop` manage) runs: its URL, pid and uptime."""
    from mctl.core.runner import background_server, server_alive

    choice = _named_choice()
    record = background_server()
    if choice is not None:
        try:
            alive = server_alive(choice.url)
        except Error as exc:
            alive, why = False, str(exc)
        else:
            why = "it answers /healthz" if alive else "it does not answer /healthz"
        click.echo(f"Commands use the mctl server at {choice.url} (from {choice.where}): {why}.")
        if record is not None:
            click.echo(f"A local background server also runs at {record['url']} (pid "
                       f"{record['pid']}); commands do not use it while {choice.where} names "
                       "a server.")
        click.echo("`mctl server start/stop/status` manage only a local background server"
                   + ("" if record else "; none runs") + ".")
        sys.exit(0 if alive else 1)
    if record is None:
        click.echo("No mctl server is running; `mctl deploy` or `mctl server start` starts one.")
        sys.exit(1)
    started = record.get("started")
    uptime = _uptime(time.time() - started) if started else "unknown"
    click.echo(f"mctl server running at {record['url']} (pid {record['pid']}, up {uptime})")


def _named_choice() -> Any:
    """The server MCTL_SERVER_URL or the active profile names (config.ServerChoice), else None."""
    from mctl.core.config import server_choice

    try:
        choice = server_choice()
    except Error as exc:
        raise click.ClickException(str(exc)) from None
    return choice if choice.named else None


@server.command("start")
def server_start() -> None:
    """Start the background server if none runs (as `mctl deploy` does)."""
    from mctl.core.runner import background_server, ensure_background_server, server_alive

    choice = _named_choice()
    if choice is not None:
        alive = server_alive(choice.url)
        click.echo(f"Commands use the mctl server at {choice.url} (from {choice.where}), which "
                   f"{'answers' if alive else 'does not answer'} /healthz; no local background "
                   "server was started (it would not be used). Unset MCTL_SERVER_URL or run "
                   "`mctl profile deactivate` to use one.")
        sys.exit(0 if alive else 1)
    try:
        running = background_server()
        url = running["url"] if running else ensure_background_server()
    except Error as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"mctl server {'already ' if running else ''}running at {url}")


@server.command("stop")
def server_stop() -> None:
    """Stop the background server: SIGTERM, then wait until it has exited."""
    from mctl.core.runner import stop_background_server

    try:
        record = stop_background_server()
    except Error as exc:
        raise click.ClickException(str(exc)) from None
    choice = _named_choice()
    if record is None:
        if choice is not None:
            click.echo(f"No local background server is running, so nothing was stopped. Commands "
                       f"use the mctl server at {choice.url} (from {choice.where}), which `mctl "
                       "server stop` does not manage: stop it where it runs.")
            return
        click.echo("No mctl server is running; nothing to stop.")
        return
    click.echo(f"Stopped the mctl server at {record['url']} (pid {record['pid']})")
    if choice is not None:
        click.echo(f"Commands use the mctl server at {choice.url} (from {choice.where}), which "
                   "keeps running.")


def _server_tls(cert: str | None, key: str | None, advertise_url: str | None) -> Any:
    """The server's TLS context for --tls-cert/--tls-key, or None for plain HTTP."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise click.UsageError("TLS needs both --tls-cert and --tls-key; pass the certificate and "
                               "its private key.")
    if advertise_url and not advertise_url.startswith("https://"):
        raise click.UsageError(f"--advertise-url {advertise_url} is not https while TLS is on; "
                               "advertise the https:// URL clients and workers should use.")
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise click.UsageError(f"Could not load the TLS certificate {cert} with key {key} ({exc}); "
                               "check that they are PEM files and belong together.") from None
    return context


from mctl.cli.volume import volume  # noqa: E402 - the command modules need `cli` defined first
cli.add_command(volume)
from mctl.cli.nomad import nomad  # noqa: E402 - the nomad group lives in its own module

cli.add_command(nomad)

from mctl.cli.serve import serve  # noqa: E402 - the command modules import main's helpers

cli.add_command(serve)

from mctl.cli.dicts import dict_group, queue_group  # noqa: E402

cli.add_command(dict_group)
cli.add_command(queue_group)


def _register_plugin_commands() -> None:
    from mctl.core.plugins import get_plugin_manager

    get_plugin_manager().hook.mctl_register_commands(cli=cli)


from mctl.cli.containers import config, container, profile  # noqa: E402 - their own module

cli.add_command(container)
cli.add_command(config)
cli.add_command(profile)
from mctl.cli.profile_nomad import profile_nomad  # noqa: E402

profile.add_command(profile_nomad)
from mctl.cli.environment import environment  # noqa: E402

cli.add_command(environment)
from mctl.cli.sandbox import sandbox  # noqa: E402 - its own module
cli.add_command(sandbox)


def main() -> None:
    _register_plugin_commands()
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort as exc:
        click.echo("Aborted!", err=True)
        # Ctrl-C exits 130 as a shell expects of it (128 + SIGINT); a declined prompt 1
        sys.exit(130 if isinstance(exc.__context__, KeyboardInterrupt) else 1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except Error as exc:  # an mctl error that no command turned into a message: still one line
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except SystemExit:
        raise
