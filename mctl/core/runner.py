"""Running and deploying apps: the embedded control plane for `mctl run`, the background server
for `mctl deploy`."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from mctl.core import config, ids, transport
from mctl.core.client import client_for, close_client, run_sync
from mctl.exception import ConnectionError

if TYPE_CHECKING:
    from mctl.sdk.app import App


def _print_log(app_id: str, task_id: str, function: str, line: str) -> None:
    print(line, flush=True)


async def _start_embedded(state_dir: Path) -> tuple[Any, str]:
    from mctl.core.server.http import start_server

    server = await start_server(state_dir, log_sink=_print_log)
    _, token = server.control.tokens.issue("embedded", "admin")
    return server, token


@contextlib.contextmanager
def embedded_server() -> Iterator[str]:
    """A control plane in this process (on the client's background loop), state in a temp dir.
    It gets a fresh admin token that only this process holds, in memory."""
    with tempfile.TemporaryDirectory(prefix="mctl-run-") as state_dir:
        server, token = run_sync(_start_embedded(Path(state_dir)))
        transport.use_token(server.url, token)
        try:
            yield server.url
        finally:
            run_sync(close_client(server.url))
            run_sync(server.close())
            transport.forget_token(server.url)


async def _publish(url: str, spec: Any, blobs: dict[str, bytes], mode: str,
                   app_id: str | None) -> dict[str, Any]:
    client = client_for(url)
    for data in blobs.values():
        await client.upload_blob(data)
    return await client.http("POST", "/api/apps", {"spec": spec.model_dump(mode="json"),
                                                   "mode": mode, "app_id": app_id})


@contextlib.contextmanager
def run_app(app: App) -> Iterator[None]:
    """Run `app` as an ephemeral app: on MCTL_SERVER_URL if set, else on an embedded server."""
    from mctl.core.compile import compile_app

    app_id = ids.new_id("app")
    spec, blobs = compile_app(app, app_id)  # fails on bad input before anything starts
    url = os.environ.get("MCTL_SERVER_URL")
    with contextlib.ExitStack() as stack:
        if not url:
            url = stack.enter_context(embedded_server())
        run_sync(_publish(url, spec, blobs, "ephemeral", app_id))
        run_sync(client_for(url).claim_app(app_id))
        app._hydrate(app_id, url)
        app._running = True
        try:
            yield
        finally:
            app._running = False
            client = client_for(url)
            client.owned_apps.discard(app_id)
            with contextlib.suppress(Exception):
                run_sync(client.http("POST", f"/api/apps/{app_id}/stop"))


def deploy_app(app: App, name: str | None = None) -> dict[str, Any]:
    """Deploy to the configured control plane, starting the background server if none runs."""
    from mctl.core.compile import compile_app
    from mctl.core.server.control import deployed_app_id

    app_name = name or app.name
    if not app_name:
        from mctl.exception import InvalidError

        raise InvalidError("A deployed app needs a name: mctl.App('my-app') or "
                           "`mctl deploy --name my-app`.")
    app_id = deployed_app_id(app_name)
    spec, blobs = compile_app(app, app_id, app_name)
    url = ensure_background_server()
    result = run_sync(_publish(url, spec, blobs, "deployed", app_id))
    app._hydrate(app_id, url)
    return {**result, "name": app_name, "url": url,
            "functions": {tag: f.function_id for tag, f in spec.functions.items()}}


def server_alive(url: str) -> bool:
    """True if a control plane answers at `url`; an unverifiable certificate raises."""
    try:
        with transport.urlopen(f"{url}/healthz", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def ensure_background_server(timeout: float = 30.0) -> str:
    """The configured server's URL; start `mctl server` in the background if none answers."""
    url = config.configured_server_url()
    if url and server_alive(url):
        return url
    if os.environ.get("MCTL_SERVER_URL"):
        raise ConnectionError(f"No mctl control plane answers at MCTL_SERVER_URL={url}; start it "
                              "with `mctl server` or unset MCTL_SERVER_URL.")
    home = config.home()
    home.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        config.server_file().unlink()
    log = open(home / "server.log", "ab")
    subprocess.Popen([sys.executable, "-m", "mctl", "server"], stdout=log, stderr=log,
                     stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        url = config.configured_server_url()
        if url and server_alive(url):
            return url
        time.sleep(0.1)
    raise ConnectionError(f"The background mctl server did not start within {timeout:g}s; see "
                          f"{home / 'server.log'}.")


def write_server_file(url: str) -> None:
    path = config.server_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"url": url, "pid": os.getpid()}))
