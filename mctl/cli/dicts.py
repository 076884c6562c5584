"""`mctl dict list|items|get|clear|delete` and `mctl queue list|peek|len|clear|delete`.

Values are unpickled here to be shown with repr(): the classes they hold must be importable where
the command runs, as with `modal dict items`.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import click

from mctl.exception import Error


def _server() -> str:
    """The server that holds the named dicts and queues: they are stored objects, kept in the
    state directory between servers, so (as `mctl volume` and `mctl secret` do) this starts the
    background server when none runs rather than saying there are none."""
    from mctl.cli.main import running_server
    from mctl.core.runner import ensure_background_server

    url = running_server()
    if url is None:
        try:
            url = ensure_background_server()
        except Error as exc:
            raise click.ClickException(str(exc)) from None
    return url


def _with_server(action: Callable[[str], Any]) -> Any:
    """Run `action(url)` and close the connection after; mctl errors become one-line messages."""
    from mctl.core.client import close_client, run_sync

    url = _server()
    try:
        return action(url)
    except Error as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        run_sync(close_client(url))


def _list(kind: str, as_json: bool) -> None:
    from mctl.core.client import client_for, run_sync

    rows = _with_server(lambda url: run_sync(client_for(url).http(
        "GET", "/api/objects", params={"kind": kind})))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'NAME':<32} {'ITEMS':>8}  CREATED")
    for row in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["created"]))
        click.echo(f"{row['name']:<32} {row['items']:>8}  {created}")


def _delete(kind: str, name: str, yes: bool, allow_missing: bool) -> None:
    from mctl.sdk.dict import Dict
    from mctl.sdk.queue import Queue

    from mctl.core.client import client_for, run_sync
    from mctl.exception import NotFoundError

    # Whether it exists first: no question about deleting something that is not there.
    names = {row["name"] for row in _with_server(lambda url: run_sync(client_for(url).http(
        "GET", "/api/objects", params={"kind": kind})))}
    if name not in names:
        if allow_missing:
            click.echo(f"No {kind} named {name}; nothing to delete.")
            return
        raise click.ClickException(f"No {kind} named {name!r}; `mctl {kind} list` shows them "
                                   "(--allow-missing succeeds anyway).")
    if not yes:
        click.confirm(f"Delete {kind} {name!r} and everything in it?", abort=True)

    cls = Dict if kind == "dict" else Queue

    def delete(url: str) -> None:
        try:
            cls.delete(name, allow_missing=allow_missing)
        except NotFoundError:
            raise click.ClickException(f"No {kind} named {name!r}; `mctl {kind} list` shows "
                                       "them (--allow-missing succeeds anyway).") from None

    _with_server(delete)
    click.echo(f"Deleted {kind} {name}.")


def _show(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- mctl dict ---------------------------------------------------------------------------------
@click.group("dict", short_help="Manage Dicts: list, items, get, clear, delete.")
def dict_group() -> None:
    """Named mctl.Dict objects on the control plane."""


@dict_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dict_list(as_json: bool) -> None:
    """List named Dicts and their sizes."""
    _list("dict", as_json)


@dict_group.command("items")
@click.argument("name")
@click.argument("n", type=int, default=20)
@click.option("--all", "show_all", is_flag=True, help="Show every entry, not only the first N.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (values as repr strings).")
def dict_items(name: str, n: int, show_all: bool, as_json: bool) -> None:
    """Show the first N entries (20 by default) of Dict NAME."""
    from mctl.sdk.dict import Dict

    def items(url: str) -> list[tuple[Any, Any]]:
        d = Dict(name, server=url)
        out = []
        for pair in d.items():
            out.append(pair)
            if not show_all and len(out) >= n:
                break
        return out

    rows = _with_server(items)
    if as_json:
        click.echo(json.dumps([{"key": repr(k), "value": repr(v)} for k, v in rows], indent=2))
        return
    for key, value in rows:
        click.echo(f"{_show(key, 40):<40} {_show(value)}")


@dict_group.command("get")
@click.argument("name")
@click.argument("key")
def dict_get(name: str, key: str) -> None:
    """Print the value of KEY (a string key) in Dict NAME."""
    from mctl.sdk.dict import Dict

    missing = object()
    value = _with_server(lambda url: Dict(name, server=url).get(key, missing))
    if value is missing:
        raise click.ClickException(f"Dict {name!r} has no key {key!r}; `mctl dict items {name}` "
                                   "shows its keys.")
    click.echo(_show(value, 100_000))


@dict_group.command("clear")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def dict_clear(name: str, yes: bool) -> None:
    """Remove every entry of Dict NAME."""
    from mctl.sdk.dict import Dict

    if not yes:
        click.confirm(f"Remove every entry of Dict {name!r}?", abort=True)
    _with_server(lambda url: Dict(name, server=url).clear())
    click.echo(f"Cleared Dict {name}.")


@dict_group.command("delete")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--allow-missing", is_flag=True, help="Succeed when there is no such Dict.")
def dict_delete(name: str, yes: bool, allow_missing: bool) -> None:
    """Delete Dict NAME and its entries."""
    _delete("dict", name, yes, allow_missing)


# --- mctl queue --------------------------------------------------------------------------------
@click.group("queue", short_help="Manage Queues: list, peek, len, clear, delete.")
def queue_group() -> None:
    """Named mctl.Queue objects on the control plane."""


@queue_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def queue_list(as_json: bool) -> None:
    """List named Queues and how many items each holds (all partitions)."""
    _list("queue", as_json)


@queue_group.command("peek")
@click.argument("name")
@click.argument("n", type=int, default=1)
@click.option("--partition", help="A partition other than the default one.")
def queue_peek(name: str, n: int, partition: str | None) -> None:
    """Show the next N items (1 by default) of Queue NAME without removing them."""
    from mctl.sdk.queue import Queue

    def peek(url: str) -> list[Any]:
        out = []
        for item in Queue(name, server=url).iterate(partition=partition):
            out.append(item)
            if len(out) >= n:
                break
        return out

    for item in _with_server(peek):
        click.echo(_show(item))


@queue_group.command("len")
@click.argument("name")
@click.option("--partition", help="Count this partition instead of the default one.")
@click.option("--total", is_flag=True, help="Count every partition.")
def queue_len(name: str, partition: str | None, total: bool) -> None:
    """Print how many items Queue NAME holds."""
    from mctl.sdk.queue import Queue

    click.echo(_with_server(lambda url: Queue(name, server=url).len(partition=partition,
                                                                   total=total)))


@queue_group.command("clear")
@click.argument("name")
@click.option("--partition", help="Clear this partition instead of the default one.")
@click.option("--all", "all_partitions", is_flag=True, help="Clear every partition.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def queue_clear(name: str, partition: str | None, all_partitions: bool, yes: bool) -> None:
    """Remove the items of Queue NAME (its default partition unless told otherwise)."""
    from mctl.sdk.queue import Queue

    if not yes:
        click.confirm(f"Remove the items of Queue {name!r}?", abort=True)
    _with_server(lambda url: Queue(name, server=url).clear(partition=partition,
                                                           all=all_partitions))
    click.echo(f"Cleared Queue {name}.")


@queue_group.command("delete")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--allow-missing", is_flag=True, help="Succeed when there is no such Queue.")
def queue_delete(name: str, yes: bool, allow_missing: bool) -> None:
    """Delete Queue NAME and its items."""
    _delete("queue", name, yes, allow_missing)
