"""Running and deploying apps: the embedded control plane for `mctl run`, the background server
for `mctl deploy`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from mctl.core import config, ids, transport
from mctl.core.client import client_for, close_client, run_sync
from mctl.exception import ConnectionError

if TYPE_CHECKING:
    from mctl.core.declared import DeclaredApp


def _print_log(app_id: str, task_id: str, function: str, line: str,
               stream: str = "stdout") -> None:
    """A function's output line, on this process's stdout or stderr as the function printed it
    (as `modal run` does: `mctl run app.py > out.txt` leaves warnings on the terminal)."""
    from mctl.core import interrupts

    if (task_id, function) == ("build", "image") or interrupts.output_gone:
        return  # image build output: the deployer follows it with a progress line
    try:
        if stream == "stderr":
            sys.stdout.flush()  # what came before it on stdout shows first on a shared terminal
            print(line, file=sys.stderr, flush=True)
        else:
            print(line, flush=True)
    except BrokenPipeError:  # `mctl run app.py | head`: the reader went away; the run ends
        interrupts.stdout_gone()
    except (OSError, ValueError):  # a closed terminal (SIGHUP ends the run): nowhere to print
        pass


async def _start_embedded(state_dir: Path) -> tuple[Any, str]:
    from mctl.core.server.http import start_server

    server = await start_server(state_dir, log_sink=_print_log, ephemeral=True)
    _, token = server.control.tokens.issue("embedded", "admin")
    return server, token


_embedded_urls: set[str] = set()  # control planes in this process: they print logs themselves

INTERRUPT_GRACE_S = 0.3  # after Ctrl-C, how long workers get before they are killed


@contextlib.contextmanager
def embedded_server() -> Iterator[str]:
    """A control plane in this process (on the client's background loop), state in a temp dir.
    It gets a fresh admin token that only this process holds, in memory."""
    with tempfile.TemporaryDirectory(prefix="mctl-run-") as state_dir:
        server, token = run_sync(_start_embedded(Path(state_dir)))
        _embedded_urls.add(server.url)
        # A client left from an earlier server on the same address (the OS reuses ports) holds
        # that server's token: drop it before this server's token is used.
        run_sync(close_client(server.url))
        transport.use_token(server.url, token)
        grace_s = None
        try:
            yield server.url
        except KeyboardInterrupt:  # Ctrl-C: the user wants out now, not after a drain
            grace_s = INTERRUPT_GRACE_S
            raise
        finally:
            run_sync(close_client(server.url))
            run_sync(server.close(grace_s=grace_s))
            transport.forget_token(server.url)
            _embedded_urls.discard(server.url)


class LogFollower:
    """Prints an app's log lines from a separate control plane as they arrive: a long poll of
    `GET /api/apps/{id}/logs` on the client's loop, from the start of the run."""

    PAGE = 1000  # the route's page size

    def __init__(self, url: str, app_id: str) -> None:
        self.url, self.path, self.after = url, f"/api/apps/{app_id}/logs", 0
        self._task = run_sync(self._start(), timeout=10)  # runs on the client's loop

    async def _start(self) -> Any:
        import asyncio

        return asyncio.get_running_loop().create_task(self._follow())

    async def _page(self, wait: float) -> int:
        rows = await client_for(self.url).http("GET", self.path, params={
            "after": self.after, "wait": wait}, timeout_s=wait + 30)
        for row in rows:
            self.after = row["id"]
            _print_log("", row["task_id"], row["function"], row["line"],
                       row.get("stream", "stdout"))
        return len(rows)

    async def _follow(self) -> None:
        import asyncio

        from mctl.exception import AuthError

        while True:
            try:
                await self._page(25)
            except asyncio.CancelledError:
                raise
            except AuthError:
                print("mctl: this token may not read the app's logs (that needs a deploy token); "
                      "what functions print is not shown here.", file=sys.stderr, flush=True)
                return
            except Exception:  # a dropped connection: the calls say so themselves; retry
                await asyncio.sleep(1)

    async def _finish(self, drain: bool) -> None:
        import asyncio

        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        if drain:  # every line stored before the run ended (a worker sends its output first)
            with contextlib.suppress(Exception):
                while await self._page(0) >= self.PAGE:
                    pass

    def finish(self, drain: bool = True) -> None:
        with contextlib.suppress(Exception):
            run_sync(self._finish(drain), timeout=30)


def volumes_to_create(app: Any) -> set[str]:
    """The names of the app's volumes declared with `create_if_missing=True`."""
    declared = list(getattr(app, "volumes", {}).values())
    for handle in getattr(app, "registered_functions", {}).values():
        declared += getattr(handle, "options", {}).get("volume_objects") or []
    return {v.name for v in declared if getattr(v, "create_if_missing", False)}


async def _ensure_volumes(client: Any, spec: Any, create: set[str]) -> None:
    """Fail before anything starts when a mounted volume does not exist (making the
    `create_if_missing=True` ones): a worker must never write into a volume nobody made."""
    from mctl.exception import InvalidError, NotFoundError

    needed = {name for f in spec.functions.values() for name in f.volumes.values()}
    if not needed:
        return
    for name in sorted(needed & create):  # made if missing; an existing one is left as it is
        await client.http("POST", "/api/volumes", {"name": name, "exist_ok": True})
    try:
        existing = {row["name"] for row in await client.http("GET", "/api/volumes")}
    except InvalidError:  # a driver that cannot list: its workers' mount(create=False) says it
        return
    missing = sorted(needed - create - existing)
    if missing:
        name = missing[0]
        raise NotFoundError(f"Volume {name!r} does not exist; create it with `mctl volume "
                            f"create {name}` or declare it with create_if_missing=True.")


async def _publish(url: str, spec: Any, blobs: dict[str, bytes], mode: str,
                   app_id: str | None, secrets: dict[str, dict[str, str]],
                   create_volumes: set[str]) -> dict[str, Any]:
    """Upload the blobs, then create the app, printing its image builds as they run. Inline
    secret values travel beside the spec, never in it: the server puts them in its secret
    backend."""
    from mctl.core.build_follow import BuildProgress, post_following

    client = client_for(url)
    await _ensure_volumes(client, spec, create_volumes)
    for data in blobs.values():
        await client.upload_blob(data)
    progress = BuildProgress()
    result = await post_following(client, {"spec": spec.model_dump(mode="json"), "mode": mode,
                                           "app_id": app_id, "secrets": secrets}, progress)
    if not progress.followed:  # a control plane without the live log: print it now
        print_build_log(result)
    return result


def print_build_log(result: dict[str, Any]) -> None:
    """The control plane's build output for this deploy (the whole log: `mctl app logs`)."""
    for image in result.get("images") or []:
        for line in image.get("log") or []:
            print(line, flush=True)


# Control planes that apps run on in this process, innermost last (Dict/Queue handles use it).
_running_urls: list[str] = []


def running_server_url() -> str | None:
    """The control plane of the app `app.run()` runs in this process, if one does."""
    return _running_urls[-1] if _running_urls else None


@contextlib.contextmanager
def run_app(app: DeclaredApp, detach: bool = False) -> Iterator[None]:
    """Run `app` as an ephemeral app: on the server the user named (MCTL_SERVER_URL or the active
    profile's, `config.server_choice`), else on an embedded server.

    `detach`: the app outlives this process (Modal's `run --detach`): it runs on the configured
    or background server, is not stopped when the block ends nor when its caller disconnects,
    and stops with `mctl app stop APP_ID`."""
    from mctl.core.compile import compile_app, inline_secret_values

    app_id = ids.new_id("app")
    _quiet_interrupts("app", f"app {app_id} keeps running (detached; `mctl app stop {app_id}` "
                      "stops it)" if detach else "the app was stopped")
    spec, blobs = compile_app(app, app_id)  # fails on bad input before anything starts
    secrets = inline_secret_values(app, app_id)
    url = config.named_server_url()
    from mctl.core import interrupts

    try:
        with interrupts.ending_like_ctrl_c():
            yield from _run_app(app, app_id, spec, blobs, secrets, url, detach)
    except interrupts.Terminated as exc:  # SIGTERM, SIGHUP: cleaned up as after Ctrl-C
        if exc.signum != signal.SIGPIPE:  # stdout went away: quietly, as `yes | head` does
            interrupts.say(interrupt_line(exc))
        raise SystemExit(interrupts.exit_status(exc)) from None


def _run_app(app: DeclaredApp, app_id: str, spec: Any, blobs: dict[str, bytes],
             secrets: dict[str, dict[str, str]], url: str | None, detach: bool
             ) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        if detach:
            url = url or ensure_background_server()
        elif not url:
            url = stack.enter_context(embedded_server())
        run_sync(_publish(url, spec, blobs, "detached" if detach else "ephemeral",
                 app_id, secrets, volumes_to_create(app)))
        if not detach:
            run_sync(client_for(url).claim_app(app_id))
        app._hydrate(app_id, url)
        print_web_urls(url, app_id)
        _running_urls.append(url)
        if url in _embedded_urls:  # so `mctl app list` elsewhere can say this run is not its
            stack.callback(_note_embedded_run(url, app_id, getattr(app, "name", None)))
        # The embedded control plane prints log lines itself (its log sink); a separate one is
        # followed over HTTP, so `mctl run` shows what functions print wherever they run (with
        # --detach too, while this process runs, as Modal's does).
        follower = LogFollower(url, app_id) if url not in _embedded_urls else None
        try:
            interrupted = False
            try:
                yield
            except KeyboardInterrupt:
                interrupted = True
                raise
            finally:
                if follower is not None:
                    follower.finish(drain=not interrupted)
                if not detach:
                    client = client_for(url)
                    client.owned_apps.discard(app_id)
                    with contextlib.suppress(Exception):
                        run_sync(client.http("POST", f"/api/apps/{app_id}/stop"))
        finally:
            _running_urls.remove(url)


def _runs_dir() -> Path:
    return config.home() / "runs"


def _note_embedded_run(url: str, app_id: str, name: str | None) -> Callable[[], None]:
    """Record `$MCTL_HOME/runs/<pid>.json` (url, app; no token) while this process runs an app
    on its own embedded control plane; returns what removes it. Best effort: never fails."""
    path = _runs_dir() / f"{os.getpid()}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"pid": os.getpid(), "url": url, "app_id": app_id,
                                    "name": name, "started": time.time()}))
    except OSError:
        pass
    return lambda: path.unlink(missing_ok=True)


def embedded_runs() -> list[dict[str, Any]]:
    """The `mctl run`s (and `app.run()`s) of this MCTL_HOME alive now on their own embedded
    control planes, which no other process can reach (their token is in their memory only)."""
    out = []
    for path in sorted(_runs_dir().glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record.get("pid"), int) and process_alive(record["pid"]):
            out.append(record)
        else:  # a run that was killed: its record stays behind
            path.unlink(missing_ok=True)
    return out


# What the Ctrl-C line says was left behind, by topic ("app", "sandboxes"); "" says nothing.
interrupt_notes: dict[str, str] = {}


def _quiet_interrupts(topic: str | None = None, note: str = "") -> None:
    """Ctrl-C in a script (`with app.run():`, a sandbox's exec) ends it with one line, not a
    traceback through mctl's client (`mctl run` has its own): "Aborted (Ctrl-C)", then each
    note in `interrupt_notes` (the app was stopped; a sandbox keeps running, ...)."""
    if topic is not None:
        interrupt_notes[topic] = note
    previous = sys.excepthook
    if getattr(previous, "_mctl", False):
        return

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if issubclass(kind, KeyboardInterrupt):
            from mctl.core.interrupts import say

            say(interrupt_line(value))
            return
        previous(kind, value, tb)

    hook._mctl = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def interrupt_line(exc: BaseException | None = None) -> str:
    """The one line a run ended by Ctrl-C (or `exc`: SIGTERM, SIGHUP) ends with, and what that
    left behind: "Aborted (Ctrl-C); the app was stopped."."""
    from mctl.core.interrupts import Terminated

    how = {"SIGTERM": "Terminated (SIGTERM)", "SIGHUP": "Hung up (SIGHUP)"}.get(
        exc.name, exc.name) if isinstance(exc, Terminated) else "Aborted (Ctrl-C)"
    notes = "; ".join(n for n in interrupt_notes.values() if n)
    return f"{how}{'; ' + notes if notes else ''}."


def web_urls(url: str, app_id: str) -> list[dict[str, Any]]:
    """The app's web endpoints with their URLs (`GET /api/web`), [] when it has none."""
    from mctl.exception import NotFoundError

    try:
        return run_sync(client_for(url).http("GET", "/api/web", params={"app": app_id}))
    except NotFoundError:  # a control plane older than web endpoints
        return []


def print_web_urls(url: str, app_id: str) -> None:
    for endpoint in web_urls(url, app_id):
        where = endpoint["tag"] + (f".{endpoint['method']}" if endpoint["method"] else "")
        auth = " (requires proxy auth)" if endpoint["requires_proxy_auth"] else ""
        print(f"Web endpoint {where} => {endpoint['url']}{auth}", file=sys.stderr, flush=True)


def deploy_app(app: DeclaredApp, name: str | None = None) -> dict[str, Any]:
    """Deploy to the configured control plane, starting the background server if none runs."""
    from mctl.core.compile import compile_app, inline_secret_values
    from mctl.core.server.control import deployed_app_id

    app_name = name or app.name
    if not app_name:
        from mctl.exception import InvalidError

        raise InvalidError("A deployed app needs a name: mctl.App('my-app') or "
                           "`mctl deploy --name my-app`.")
    app_id = deployed_app_id(app_name)
    spec, blobs = compile_app(app, app_id, app_name)
    url = ensure_background_server()
    result = run_sync(_publish(url, spec, blobs, "deployed", app_id,
                               inline_secret_values(app, app_id), volumes_to_create(app)))
    app._hydrate(app_id, url)
    return {**result, "name": app_name, "url": url,
            "functions": {tag: f.function_id for tag, f in spec.functions.items()},
            "web_urls": web_urls(url, app_id)}


def server_alive(url: str) -> bool:
    """True if a control plane answers at `url`; an unverifiable certificate raises."""
    try:
        with transport.urlopen(f"{url}/healthz", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def ensure_background_server(timeout: float = 30.0) -> str:
    """The configured server's URL; start `mctl server` in the background if none answers.

    A server the user named (MCTL_SERVER_URL, a profile's) that does not answer is an error at
    once: another control plane started here would not hold that server's apps and secrets."""
    choice = config.server_choice()
    if choice.url and server_alive(choice.url):
        return choice.url
    if choice.named:
        raise ConnectionError(config.unreachable_message(choice.url or "", "no answer to /healthz"))
    home = config.home()
    home.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        config.server_file().unlink()
    log_path = home / "server.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mctl", "server"], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = read_server_file()
        url = record.get("url") if isinstance(record, dict) else None
        if url and server_alive(url):
            print(f"mctl: started a background control plane at {url} (state and server.log in "
                  f"{home}); `mctl server stop` stops it.", file=sys.stderr)
            return url
        if proc.poll() is not None:
            raise ConnectionError(f"The background mctl server exited at start (status "
                                  f"{proc.returncode}); see {log_path}.")
        time.sleep(0.1)
    # Not up in time: stop it rather than leave a server nobody knows of running.
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    with contextlib.suppress(FileNotFoundError):
        if (read_server_file() or {}).get("pid") == proc.pid:
            config.server_file().unlink()
    raise ConnectionError(f"The background mctl server did not start within {timeout:g}s, so it "
                          f"was stopped (pid {proc.pid}); see {log_path}.")


def write_server_file(url: str) -> None:
    path = config.server_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"url": url, "pid": os.getpid(), "started": time.time()}))


def forget_server_file(pid: int) -> None:
    """Remove server.json if it still names the server `pid` (one that is exiting)."""
    if (read_server_file() or {}).get("pid") == pid:
        with contextlib.suppress(FileNotFoundError):
            config.server_file().unlink()


def read_server_file() -> dict[str, Any] | None:
    try:
        return json.loads(config.server_file().read_text())
    except (OSError, ValueError):
        return None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited child nobody reaped yet still answers kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def background_server() -> dict[str, Any] | None:
    """The server recorded in server.json ({url, pid, started}) if it is running, else None."""
    record = read_server_file()
    if not record or not isinstance(record.get("pid"), int) or not process_alive(record["pid"]):
        return None
    return record if server_alive(record["url"]) else None


def stop_background_server(timeout: float = 15.0) -> dict[str, Any] | None:
    """SIGTERM the recorded server and wait for it to exit; returns its record, None if none ran."""
    import signal

    record = background_server()
    if record is None:
        return None
    os.kill(record["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while process_alive(record["pid"]):
        if time.monotonic() > deadline:
            raise ConnectionError(f"The mctl server (pid {record['pid']}) did not stop within "
                                  f"{timeout:g}s; stop it with `kill -9 {record['pid']}`.")
        time.sleep(0.1)
    forget_server_file(record["pid"])
    return record
