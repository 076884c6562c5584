"""Sandboxes in the control plane: every sandbox's record (id, app, name, tags, isolation, state,
return code), its life (start, timeout, exit, terminate) and its HTTP routes.

The control plane starts a sandbox through its sandbox backend: `local`, podman on the control
plane's host, isolated as `core/sandbox_runtime` says, or, when it schedules on a cluster, that
cluster's backend (`cluster()`: plugins/sandbox_slurm, plugins/sandbox_nomad). A watcher
task per sandbox waits for its main process (`podman wait`) and records the return code; a timer
ends it at its `timeout` (return code -1, as Modal's), and another at its `idle_timeout` once
nothing has been active in it for that long (see `_idle`). Commands in a sandbox (`exec`) are
run by the client itself with `podman exec` on the same host, after `POST .../exec` has checked
its token and the sandbox's state (see docs/architecture.md, Sandboxes, for how a cluster node
would run them instead). Secret values reach podman's environment only, never the store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mctl.core import ids, sandbox_runtime
from mctl.core.sandbox_runtime import SandboxConfig, container_name
from mctl.exception import InvalidError, NotFoundError

if TYPE_CHECKING:
    from mctl.core.server.control import ControlPlane

log = logging.getLogger("mctl.sandboxes")

MAX_TIMEOUT_S = 24 * 3600
DEFAULT_TIMEOUT_S = 300
WAIT_CAP_S = 50.0  # one long-poll waits at most this long; the client asks again
# podman's own --timeout: this long after the sandbox's, in case no control plane ends it
TIMEOUT_GRACE_S = 30
# A warm container's own podman timeout (the net under a control plane that dies without removing
# it; it used to be 24 h): it serves sandboxes whose timeout fits in what is left of it, and is
# replaced when too little is left.
WARM_TTL_S = float(os.environ.get("MCTL_SANDBOX_WARM_TTL", "3600"))
# A finished sandbox's container (its logs) is kept this long, then removed.
SNAPSHOT_TIMEOUT_S = 600.0  # snapshot_filesystem(), here or on a node
KEEP_FINISHED_S = float(os.environ.get("MCTL_SANDBOX_KEEP_S", "900"))


# The label of an embedded control plane's containers: "host:pid:start" of its process.
EPHEMERAL_LABEL = "mctl.ephemeral"


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with its
    pid it names one process, not a later one that got the same pid; None if there is none."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def ephemeral_owner() -> str:
    """This process as an embedded control plane's owner label: "host:pid:start"."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process_start(os.getpid())}"


def _owner_gone(owner: str, host: str) -> bool:
    """Whether the embedded control plane `owner` ("host:pid:start") is certainly gone: of this
    host, and no process with its pid and start time runs. Another host's, or one that cannot
    be read, counts as alive (its containers are left alone)."""
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
        return False
    start = _process_start(int(parts[1]))
    return start is None or start != parts[2]


async def _podman(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
                  gpus: int = 0) -> tuple[int, str, str]:
    """`podman ARGS`; `gpus`: a `run` or `create` of a GPU sandbox, through the wrapper that
    adds this host's GPUs by CDI as for function containers (containers.gpu_argv: all of them,
    or MCTL_GPU_DEVICES / CUDA_VISIBLE_DEVICES; no CDI spec → exit 125 naming the fix)."""
    argv = ["podman", *args]
    if gpus:
        from mctl.plugins.containers import GPU_CHOICE_ENV, gpu_argv

        argv = gpu_argv(argv, gpus, "sandbox")
        # which GPUs: the control plane's settings, never the sandbox's own env=
        env = dict(os.environ if env is None else env)
        for key in GPU_CHOICE_ENV:
            env.pop(key, None)
            if key in os.environ:
                env[key] = os.environ[key]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL, env=env)
    except FileNotFoundError:  # a control plane without podman serves all but sandboxes
        return 127, "", "podman is not installed (scripts/sandbox-dev install)"
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


def _gpu(gpu: Any) -> str | None:
    """`gpu=` checked ("A100:1", "any", ...); None for none."""
    if not gpu:
        return None
    from mctl.core.spec import GpuRequest

    try:
        GpuRequest.parse(gpu)
    except (ValueError, TypeError) as exc:
        raise InvalidError(f"Sandbox gpu= {gpu!r}: {exc}") from None
    return str(gpu)


# The least memory= (MiB) a sandbox starts and runs a command with: gVisor's own kernel lives
# inside the limit (below ~24 MiB runsc fails with "start-sync descriptor" or conmon errors, or
# the first exec dies); podman refuses less than 6 MiB.
MIN_MEMORY_MB = {"gvisor": 32, "runc": 6}


def _check_memory(memory: Any, isolation: str) -> None:
    if memory is None:
        return
    floor = MIN_MEMORY_MB.get(isolation, 6)
    if isinstance(memory, bool) or not isinstance(memory, (int, float)) or memory < floor:
        hint = (" (gVisor's kernel runs inside the limit; isolation=\"runc\" needs only "
                f"{MIN_MEMORY_MB['runc']})" if isolation == "gvisor" else "")
        raise InvalidError(f"Sandbox memory= is a number of MiB, at least {floor} for a "
                           f"{isolation} sandbox{hint}; not {memory!r}.")


class Sandboxes:
    """The control plane's sandboxes: records in SQLite, live ones in memory."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control
        self.db = control.store.db
        self.done: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, list[asyncio.Task[Any]]] = {}
        self.touched: set[str] = set()  # sandboxes with an exec started since their last check
        self._cluster: Any = None  # the cluster backend, made on first use
        self.host = socket.gethostname()
        self.started = time.time()
        # Warm containers of the default shape, per isolation, started ahead of `create`
        # (MCTL_SANDBOX_WARM of each, default 1; 0 turns it off). Labelled with this control
        # plane's state directory, so a restart removes its own leftovers and no one else's.
        self.warm_size = int(os.environ.get("MCTL_SANDBOX_WARM", "1"))
        # (container name, container id, started: time.monotonic())
        self.pool: dict[str, list[tuple[str, str, float]]] = {}
        self.defaults: dict[str, str] = {}
        self.filling: set[str] = set()
        import hashlib

        state = str(getattr(control.store, "state_dir", id(control)))
        self.owner = hashlib.sha256(f"{self.host}:{state}".encode()).hexdigest()[:16]
        # An embedded control plane (`mctl run`, a script's app.run()) labels its containers
        # with its process: nobody can reach them once that process is gone (its state dir was
        # temporary), so the next one to start removes them if a crash left them behind.
        owner = getattr(control, "ephemeral_owner", None)
        self.labels = {EPHEMERAL_LABEL: owner} if owner else {}
        self._reaper: asyncio.Task[Any] | None = None
        self._removing: set[asyncio.Task[Any]] = set()

    # --- records -----------------------------------------------------------------------------
    def _row(self, sandbox_id: str) -> dict[str, Any]:
        row = self.db.execute("SELECT * FROM sandboxes WHERE sandbox_id = ?",
                              (sandbox_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"No sandbox {sandbox_id!r}; `mctl sandbox list` shows them.")
        return self._public(row)

    def _public(self, row: Any) -> dict[str, Any]:
        cols = [d[0] for d in self.db.execute("SELECT * FROM sandboxes LIMIT 0").description]
        rec = dict(zip(cols, row))
        rec["tags"] = json.loads(rec["tags"] or "{}")
        rec["ports"] = {int(k): v for k, v in json.loads(rec["ports"] or "{}").items()}
        config = json.loads(rec.pop("config", None) or "{}")
        rec["pids"] = config.get("pids") or sandbox_runtime.DEFAULT_PIDS
        rec["idle_timeout"] = config.get("idle_timeout")
        rec["ended_by"] = config.get("ended_by")  # "idle_timeout" when that ended it
        rec["pty"] = bool(config.get("pty"))  # the main command runs on a terminal
        rec["cidr_allowlist"] = config.get("cidr_allowlist")
        rec["run_dir"] = config.get("run_dir")  # bwrap: its host directory (agent, output)
        rec["container"] = rec.get("container") or container_name(rec["sandbox_id"])
        return rec

    def _container(self, sandbox_id: str) -> str:
        row = self.db.execute("SELECT container FROM sandboxes WHERE sandbox_id = ?",
                              (sandbox_id,)).fetchone()
        return (row[0] if row else None) or container_name(sandbox_id)

    def insert(self, cfg: SandboxConfig, app_id: str, name: str | None, tags: Any,
               isolation: str, timeout: float, host: str, backend: str, container: str,
               **extra: Any) -> dict[str, Any]:
        """Record a new sandbox as starting; its config without the env values (their names
        only). Returns the stored config, for a backend to add to later."""
        stored = {k: v for k, v in cfg.__dict__.items() if k != "env"}
        stored["env_names"] = sorted(cfg.env)
        stored.update(extra)
        self.db.execute(
            "INSERT INTO sandboxes (sandbox_id, app_id, name, tags, isolation, state, created, "
            "timeout, config, host, backend, ports, container) VALUES (?, ?, ?, ?, ?, "
            "'starting', ?, ?, ?, ?, ?, '{}', ?)",
            (cfg.sandbox_id, app_id, name, json.dumps(tags or {}), isolation, time.time(),
             timeout, json.dumps(stored), host, backend, container))
        self.db.commit()
        return stored

    def _update(self, sandbox_id: str, **fields: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE sandboxes SET {sets} WHERE sandbox_id = ?",
                        (*fields.values(), sandbox_id))
        self.db.commit()

    def get(self, sandbox_id: str) -> dict[str, Any]:
        return self._row(sandbox_id)

    def list(self, app_id: str | None = None, tags: dict[str, str] | None = None,
             include_finished: bool = False) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM sandboxes", []
        where = []
        if app_id:
            where.append("app_id = ?")
            args.append(app_id)
        if not include_finished:
            where.append("state = 'running'")
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = [self._public(r) for r in self.db.execute(sql + " ORDER BY created DESC", args)]
        if tags:
            rows = [r for r in rows if all(r["tags"].get(k) == v for k, v in tags.items())]
        return rows

    def from_name(self, app: str, name: str) -> dict[str, Any]:
        record = self.control.store.find_app(app)
        if record is None:  # not deployed: the newest running app of that name (`app.run()`)
            running = [a for a in self.control.store.apps()
                       if a["name"] == app and a["state"] == "running"]
            record = running[-1] if running else None
        if record is None:
            raise NotFoundError(f"No app named {app!r}.")
        row = self.db.execute("SELECT * FROM sandboxes WHERE app_id = ? AND name = ? AND "
                              "state = 'running'", (record["app_id"], name)).fetchone()
        if row is None:
            raise NotFoundError(f"No running sandbox named {name!r} in app {app!r}.")
        return self._public(row)

    def set_tags(self, sandbox_id: str, tags: dict[str, str]) -> None:
        self._row(sandbox_id)
        if not isinstance(tags, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in tags.items()):
            raise InvalidError("Sandbox tags must be a dict of str to str.")
        self._update(sandbox_id, tags=json.dumps(tags))

    # --- life --------------------------------------------------------------------------------
    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        app_id = body.get("app_id")
        if not app_id or self.control.store.find_app(app_id) is None:
            raise NotFoundError(f"No app {app_id!r} to create the sandbox in; pass app= (an "
                                "App that runs, or App.lookup(name, create_if_missing=True)).")
        name = body.get("name")
        if name is not None:
            if self.db.execute("SELECT 1 FROM sandboxes WHERE app_id = ? AND name = ? AND "
                               "state = 'running'", (app_id, name)).fetchone():
                from mctl.exception import AlreadyExistsError

                raise AlreadyExistsError(f"A running sandbox named {name!r} already exists in "
                                         "this app; terminate it or pick another name.")
        timeout = body.get("timeout")  # 0 is refused, not the default (it was 300 s, silently)
        timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not 1 <= timeout <= MAX_TIMEOUT_S:
            raise InvalidError(f"Sandbox timeout must be between 1 and {MAX_TIMEOUT_S} seconds, "
                               f"not {timeout!r}.")
        timeout = int(timeout)
        idle_timeout = body.get("idle_timeout")
        if idle_timeout is not None:
            if isinstance(idle_timeout, bool) or not isinstance(idle_timeout, (int, float)) \
                    or not 1 <= idle_timeout <= MAX_TIMEOUT_S:
                raise InvalidError(f"Sandbox idle_timeout must be a number of seconds between 1 "
                                   f"and {MAX_TIMEOUT_S} (or None for no idle timeout), not "
                                   f"{idle_timeout!r}.")
            idle_timeout = int(idle_timeout)
        block_network = bool(body.get("block_network", True))
        cidr_allowlist = body.get("cidr_allowlist")
        if cidr_allowlist is not None:
            if block_network:  # Modal's rule: an allowlist is a kind of network, not a block
                raise InvalidError("`cidr_allowlist` cannot be used when `block_network` is "
                                   "enabled; drop block_network=True (an allowlist of [] "
                                   "blocks all outbound traffic).")
            cidr_allowlist = sandbox_runtime.normalize_cidrs(cidr_allowlist)
        sandbox_id = ids.new_id("sandbox")
        cluster = self.cluster()
        wanted = sandbox_runtime.wanted_isolation(body.get("isolation"))
        if wanted == "bwrap" or (cluster is None and sandbox_runtime.image_less_bwrap(
                body.get("isolation"), bool(body.get("image")))):
            if body.get("image"):
                raise InvalidError("bwrap sandboxes are image-less (the host's /usr, "
                                   "read-only); drop image=, or use isolation='gvisor' or "
                                   "'runc' (podman).")
            image = ""  # bubblewrap on the host's own /usr (core/sandbox_bwrap)
        else:
            if cluster is None and not (set(sandbox_runtime.available())
                                        & set(sandbox_runtime.PODMAN_ISOLATIONS)):
                # no podman to build or run an image: say so before trying
                sandbox_runtime.choose(SandboxConfig(
                    sandbox_id=sandbox_id, image="(image)", isolation=body.get("isolation"),
                    block_network=bool(body.get("block_network", True))))
            image = await self._image(body.get("image"), app_id)
        env = dict(body.get("env") or {})
        env.update(await asyncio.to_thread(self._secret_values, body))
        cfg = SandboxConfig(
            sandbox_id=sandbox_id, image=image, command=list(body.get("command") or []),
            workdir=body.get("workdir"), env=env, cpu=body.get("cpu"),
            memory_mb=body.get("memory"), pids=body.get("pids"),
            block_network=block_network, cidr_allowlist=cidr_allowlist,
            ports=[int(p) for p in body.get("ports") or []],
            mounts=await asyncio.to_thread(self._mounts, body.get("volumes") or {}),
            isolation=body.get("isolation"), idle_timeout=idle_timeout,
            pty=body.get("pty") if isinstance(body.get("pty"), dict) else None,
            gpu=_gpu(body.get("gpu")))
        if not cfg.image:  # bwrap, on this host whatever the cluster backend
            sandbox_runtime.choose(cfg)  # says bwrap, or why not
            if body.get("gpu"):
                raise InvalidError("bwrap sandboxes have no GPUs; use a function "
                                   "(@app.function(gpu=...)).")
            if cfg.pty is not None:
                raise InvalidError("bwrap sandboxes have no terminal for their main command "
                                   "(pty=True) yet; use an image (podman) for that.")
            return await self._create_bwrap(cfg, app_id, name, body.get("tags"), timeout,
                                            idle_timeout)
        isolation = (cluster.isolation(cfg) if hasattr(cluster, "isolation")  # the nodes'
                     else sandbox_runtime.choose(cfg))
        _check_memory(cfg.memory_mb, isolation)
        if cluster is not None:  # a job on a node (plugins/sandbox_slurm, sandbox_nomad)
            rec = await cluster.create(self, cfg, isolation, body, app_id, name, timeout)
            self._watch_idle(sandbox_id, idle_timeout)
            return rec
        argv = sandbox_runtime.run_argv(cfg, isolation, labels=self.labels,
                                        timeout_s=timeout + TIMEOUT_GRACE_S)
        warm = None
        if image == self._base() and sandbox_runtime.poolable(cfg) and self.warm_size > 0:
            warm = self._claim(isolation, timeout)
            asyncio.get_running_loop().create_task(self._refill(isolation))
        self.insert(cfg, app_id, name, body.get("tags"), isolation, timeout, host=self.host,
                    backend="local", container=warm[0] if warm else container_name(sandbox_id))
        rc, err = 0, ""
        if cfg.cidr_allowlist is not None:
            rc, out, err = await self._start_with_allowlist(cfg, isolation, timeout)
        elif warm is None:
            rc, out, err = await _podman(*argv[1:], env={**os.environ, **cfg.env},
                                         gpus=sandbox_runtime.gpu_count(cfg))
        container_id = warm[1] if warm else out.strip().splitlines()[-1] if rc == 0 else None
        if rc != 0:
            self._update(sandbox_id, state="failed", ended=time.time())
            await _podman("rm", "-f", "-t", "0", self._container(sandbox_id))
            raise InvalidError(f"The sandbox could not start ({isolation}): {err.strip()[-800:]}")
        if cfg.command:
            await self._hold_stdin(self._container(sandbox_id))
        ports = await self._ports(sandbox_id, cfg.ports)
        self._update(sandbox_id, state="running", ports=json.dumps(ports),
                     container_id=container_id)
        self.done[sandbox_id] = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.tasks[sandbox_id] = [loop.create_task(self._watch(sandbox_id)),
                                  loop.create_task(self._expire(sandbox_id, timeout))]
        self._watch_idle(sandbox_id, idle_timeout)
        return self._row(sandbox_id)

    async def _hold_stdin(self, container: str) -> None:
        """Feed the main command's stdin from its FIFO (sandbox_runtime, STDIN_HOLD_SCRIPT): a
        holder process of its own session, which outlives this control plane, and ends with the
        container (or at write_eof). Waits until the FIFO is there, so a first write finds it."""
        import subprocess

        fifo = sandbox_runtime.stdin_fifo(container)
        # started through a shell that exits at once: the holder is nobody's child here
        await asyncio.to_thread(subprocess.run, [
            "/bin/sh", "-c", 'sh -c "$0" sh "$1" "$2" </dev/null >/dev/null 2>&1 &',
            sandbox_runtime.STDIN_HOLD_SCRIPT, fifo, container], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not os.path.exists(fifo + ".pid"):
            await asyncio.sleep(0.01)

    # --- bwrap: image-less sandboxes under bubblewrap (core/sandbox_bwrap) ------------------
    async def _create_bwrap(self, cfg: SandboxConfig, app_id: str, name: str | None, tags: Any,
                            timeout: int, idle_timeout: int | None) -> dict[str, Any]:
        """Start the launcher (cgroups, then bwrap as the sandbox's own uid with the agent as
        its first process); running once the agent answers. It is this process's child:
        `_watch_bwrap` waits for it, and it dies with the control plane (--die-with-parent)."""
        from mctl.core import sandbox_bwrap

        sandbox_id = cfg.sandbox_id
        run_dir, listener = await asyncio.to_thread(sandbox_bwrap.prepare, cfg)
        self.insert(cfg, app_id, name, tags, "bwrap", timeout, host=self.host,
                    backend="local", container=container_name(sandbox_id),
                    run_dir=str(run_dir))
        try:
            groups = await asyncio.to_thread(sandbox_bwrap.make_cgroups, cfg)
            out = open(run_dir / "stdout", "wb")
            err = open(run_dir / "stderr", "wb")
            fds: list[int] = []
            try:
                argv, fds = sandbox_bwrap.launch(cfg, run_dir, listener.fileno(), groups)
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err,
                    pass_fds=[listener.fileno(), *fds], env=sandbox_bwrap.environment(cfg))
            finally:
                for f in (out, err, listener):
                    f.close()
                for fd in fds:
                    os.close(fd)
            deadline = time.monotonic() + 30
            while not await asyncio.to_thread(sandbox_bwrap.ready, run_dir, 0.5):
                if proc.returncode is not None or time.monotonic() > deadline:
                    if proc.returncode is None:
                        proc.kill()
                    await proc.wait()
                    raise InvalidError("The sandbox could not start (bwrap): " + (
                        sandbox_bwrap.read_logs(run_dir)["stderr"] or "").strip()[-800:])
        except BaseException:
            self._update(sandbox_id, state="failed", ended=time.time())
            await asyncio.to_thread(sandbox_bwrap.cleanup, sandbox_id, run_dir)
            await asyncio.to_thread(sandbox_bwrap.remove_dir, run_dir)
            raise
        self._update(sandbox_id, state="running")
        self.done[sandbox_id] = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.tasks[sandbox_id] = [loop.create_task(self._watch_bwrap(sandbox_id, proc)),
                                  loop.create_task(self._expire(sandbox_id, timeout))]
        self._watch_idle(sandbox_id, idle_timeout)
        return self._row(sandbox_id)

    async def _watch_bwrap(self, sandbox_id: str, proc: Any) -> None:
        """Wait for the launcher (bwrap passes on the main command's code, 128+n after a
        signal), record it, then remove what is left: processes, cgroups, the socket."""
        from mctl.core import sandbox_bwrap

        try:
            rc = await proc.wait()
        except asyncio.CancelledError:
            rc = await proc.wait()  # terminated or expired: the kill ends it at once
        run_dir = self._row(sandbox_id).get("run_dir")
        self._finish(sandbox_id, "finished", 128 - rc if rc < 0 else rc)
        await asyncio.to_thread(sandbox_bwrap.cleanup, sandbox_id, run_dir)
        # terminate (which set its state before the kill) removes the directory itself: a
        # marker written meanwhile would keep it
        if run_dir and self._state(sandbox_id) != "terminated":
            try:
                (Path(run_dir) / "exit").write_text(str(rc))
            except OSError:
                pass

    async def _kill(self, rec: dict[str, Any]) -> None:
        """Kill a local sandbox's processes (its container stays, for its logs)."""
        if rec.get("isolation") == "bwrap":
            from mctl.core import sandbox_bwrap

            await asyncio.to_thread(sandbox_bwrap.kill, rec["sandbox_id"])
        else:
            await _podman("kill", rec["container"])

    async def _start_with_allowlist(self, cfg: SandboxConfig, isolation: str, timeout: int
                                    ) -> tuple[int, str, str]:
        """Start a sandbox whose outbound traffic goes only to its cidr_allowlist: create and
        initialise the container (its network namespace exists, the runtime holds the main
        command before its exec), load the firewall into that namespace from here, then start
        it. No code of the sandbox runs before the rules hold; any failure leaves it unstarted.
        Returns (rc, container id, error) as `_podman` does."""
        name = container_name(cfg.sandbox_id)
        argv = sandbox_runtime.create_argv(cfg, isolation, labels=self.labels,
                                           timeout_s=timeout + TIMEOUT_GRACE_S)
        rc, out, err = await _podman(*argv[1:], env={**os.environ, **cfg.env},
                                     gpus=sandbox_runtime.gpu_count(cfg))
        if rc != 0:
            return rc, out, err
        rc, _, err = await _podman("init", name)
        if rc != 0:
            return rc, out, err
        # the held container's init process, from runc's own state (a `podman inspect` costs
        # ~0.06 s more): its network namespace is the sandbox's
        netns = sandbox_runtime.runc_netns(out.strip().splitlines()[-1] if out.strip() else "")
        if netns is None:
            rc, key, err = await _podman("inspect", "-f", "{{.NetworkSettings.SandboxKey}} "
                                         "{{.State.Pid}}", name)
            path, _, pid = key.strip().partition(" ")
            if rc != 0 or not (path or pid.strip("0")):
                return 1, out, f"no network namespace for the sandbox ({err.strip()})"
            netns = path or f"/proc/{pid}/ns/net"
        try:
            await asyncio.to_thread(sandbox_runtime.apply_allowlist, netns,
                                    cfg.cidr_allowlist or [])
        except (sandbox_runtime.SandboxIsolationError, OSError,
                subprocess.TimeoutExpired) as exc:
            return 1, out, str(exc)
        rc, _, err = await _podman("start", name)
        return rc, out, err

    def cluster(self, rec: dict[str, Any] | None = None) -> Any:
        """The cluster sandbox backend (Slurm or Nomad, as the control plane's scheduler) for
        new sandboxes, or for `rec` when it runs on one; None: podman on this host.

        A backend has create/terminate/logs/recover/ready and `_cancel(sandbox_id)`. Commands
        in its sandboxes run either as `podman ...` on the node behind `relay_prefix` (Slurm:
        srun) and `_on_node`, or, when it has `relay` and `run_in`, through its own protocol
        (Nomad's alloc exec); `isolation(cfg)`, when it has one, chooses for the nodes."""
        if rec is not None and rec.get("backend", "local") == "local":
            return None
        if os.environ.get("MCTL_SANDBOX_BACKEND", "") == "local":
            return None
        if self._cluster is None:
            from mctl.plugins import sandbox_nomad, sandbox_slurm

            self._cluster = (sandbox_slurm.backend_for(self.control)
                             or sandbox_nomad.backend_for(self.control))
        return self._cluster

    def _base(self) -> str:
        """The default image: debian_slim's base plus `python` (Modal's images have it; the
        reference's agent runs `sb.exec("python", "-c", code)`). Made once with buildah."""
        from mctl.plugins.debian_slim_base import base_for

        base = base_for(None)[0]
        if base not in self.defaults:
            self.defaults[base] = _default_image(base)
        return self.defaults[base]

    def _claim(self, isolation: str, timeout: float) -> tuple[str, str, float] | None:
        """A warm container whose own podman timeout (WARM_TTL_S from its start) leaves room
        for a sandbox of `timeout` seconds; one too old for any is removed (the refill that
        follows starts a fresh one)."""
        pool = self.pool.get(isolation) or []
        now = time.monotonic()
        for warm in list(pool):
            left = warm[2] + WARM_TTL_S - now
            if left >= timeout:
                pool.remove(warm)
                return warm
            if left < DEFAULT_TIMEOUT_S:  # of no use to a default sandbox either
                pool.remove(warm)
                task = asyncio.get_running_loop().create_task(
                    _podman("rm", "-f", "-t", "0", "--ignore", warm[0]))
                self._removing.add(task)  # held until done (the loop keeps weak references)
                task.add_done_callback(self._removing.discard)
        return None

    async def _refill(self, isolation: str) -> None:
        """Start warm containers of the default shape until the pool is full again."""
        if isolation in self.filling:
            return
        self.filling.add(isolation)
        try:
            pool = self.pool.setdefault(isolation, [])
            while len(pool) < self.warm_size:
                warm_id = "warm-" + ids.new_id("sandbox")[3:].lower()
                cfg = SandboxConfig(sandbox_id=warm_id, image=self._base())
                argv = sandbox_runtime.run_argv(
                    cfg, isolation, name=f"mctl-{warm_id}",
                    labels={"mctl.sandbox.warm": self.owner, **self.labels},
                    timeout_s=WARM_TTL_S + TIMEOUT_GRACE_S)
                started = time.monotonic()
                rc, out, err = await _podman(*argv[1:])
                if rc != 0:
                    log.warning("sandboxes: a warm %s container did not start: %s", isolation,
                                err.strip()[-300:])
                    return
                if self.warm_size == 0:  # the control plane stopped meanwhile
                    await _podman("rm", "-f", "-t", "0", f"mctl-{warm_id}")
                    return
                pool.append((f"mctl-{warm_id}", out.strip(), started))
        except Exception:  # noqa: BLE001 - a pool is an optimisation; create still works cold
            log.exception("sandboxes: filling the warm pool failed")
        finally:
            self.filling.discard(isolation)

    async def _drain_pool(self) -> None:
        """Remove this control plane's warm containers (also ones a crash left behind)."""
        self.pool.clear()
        rc, out, _ = await _podman("ps", "-a", "-q", "--filter",
                                   f"label=mctl.sandbox.warm={self.owner}")
        if rc == 0 and out.split():
            await _podman("rm", "-f", "-t", "0", *out.split())

    async def _image(self, image: dict[str, Any] | None, app_id: str) -> str:
        """The OCI reference to start from: the default image for debian_slim as it is, else
        the recipe built by the `oci` builder (a sandbox needs an image, not a virtualenv)."""
        base = await asyncio.to_thread(self._base)
        if not image:
            return base
        recipe = image.get("recipe") or {}
        kind = (recipe.get("base") or {}).get("kind")
        from mctl.plugins.debian_slim_base import DEFAULT_PYTHON

        version = recipe.get("python_version")
        plain = not recipe.get("steps")
        if plain and kind in (None, "debian_slim") and version in (None, DEFAULT_PYTHON):
            return base
        tag = (recipe.get("base") or {}).get("tag") or ""
        if not recipe.get("steps") and kind == "registry" and snapshot_image(tag):
            return tag  # a snapshot_filesystem() image: here already, or in MCTL_IMAGE_REGISTRY
        from mctl.core import plugins
        from mctl.core.server.image_builds import context_for
        from mctl.core.spec import ImageSpec

        builder = plugins.find("mctl_register_image_builders", "oci")
        spec = ImageSpec(image_id=image["image_id"], recipe=recipe)
        built = await asyncio.to_thread(builder.build, spec,
                                        context_for(self.control, app_id, mode="sandbox"))
        return built["image"]

    def _secret_values(self, body: dict[str, Any]) -> dict[str, str]:
        from mctl.core import secret_store

        env: dict[str, str] = {}
        for name in body.get("secret_names") or []:
            values = secret_store.backend().resolve(name)
            if values is None:
                raise NotFoundError(f"No secret named {name!r}; create it with `mctl secret "
                                    "create`.")
            env.update(values)
        for values in body.get("secret_values") or []:  # Secret.from_dict: given by the caller
            env.update({str(k): str(v) for k, v in values.items()})
        return env

    def _mounts(self, volumes: dict[str, Any]) -> list[dict[str, Any]]:
        from mctl.core import volume_files

        out = []
        for path, v in volumes.items():
            if not path.startswith("/") or path.rstrip("/") == "":
                raise InvalidError(f"Sandbox mount path {path!r} must be absolute, not '/'.")
            host = volume_files.root(v["name"], create=bool(v.get("create_if_missing")))
            out.append({"host_path": str(host), "path": path.rstrip("/"),
                        "read_only": bool(v.get("read_only"))})
        return out

    async def _ports(self, sandbox_id: str, ports: list[int]) -> dict[int, list[Any]]:
        out: dict[int, list[Any]] = {}
        for port in ports:
            rc, text, _ = await _podman("port", self._container(sandbox_id), f"{port}/tcp")
            if rc == 0 and text.strip():
                host, _, hport = text.strip().splitlines()[0].rpartition(":")
                out[port] = [host or "127.0.0.1", int(hport)]
        return out

    async def _watch(self, sandbox_id: str) -> None:
        """Wait for the main process; record its return code (128+n for a signal)."""
        try:
            rc, out, _ = await _podman("wait", self._container(sandbox_id),
                                        timeout=MAX_TIMEOUT_S)
        except asyncio.CancelledError:
            return
        text = out.strip()
        code = int(text) if rc == 0 and text.lstrip("-").isdigit() else None
        self._finish(sandbox_id, "finished", code)

    async def _expire(self, sandbox_id: str, timeout: float) -> None:
        await asyncio.sleep(timeout)
        if self._state(sandbox_id) == "running":
            rec = self._row(sandbox_id)
            self._finish(sandbox_id, "timeout", -1)
            await self._kill(rec)

    # --- idle_timeout ----------------------------------------------------------------------------
    def touch(self, sandbox_id: str) -> None:
        """An exec is starting in the sandbox: activity, even if it ends before the next check."""
        self.touched.add(sandbox_id)

    def _watch_idle(self, sandbox_id: str, idle_timeout: int | None) -> None:
        if idle_timeout and self._state(sandbox_id) == "running":
            task = asyncio.get_running_loop().create_task(self._idle(sandbox_id, idle_timeout))
            self.tasks.setdefault(sandbox_id, []).append(task)

    async def _idle(self, sandbox_id: str, idle_timeout: float) -> None:
        """End the sandbox once it has been idle for `idle_timeout` seconds, as Modal's: active
        while a command started by `exec` runs (stdin is written only to those) or a TCP
        connection through one of its tunnels is open. The main command's own work is not
        activity. Checked every `idle_timeout`/4 (0.5 s to 10 s) by listing the processes in the
        sandbox (`ACTIVITY_SCRIPT`): an exec runs from this host or from its client with the
        runtime's own exec, so only the sandbox sees them all. Never early: a check that finds
        activity, follows one that did, or follows an exec's start counts as active at its own
        time; the sandbox ends at most one period late."""
        period = min(max(idle_timeout / 4, 0.5), 10.0)
        last = time.monotonic()
        was_active = False
        try:
            while self._state(sandbox_id) == "running":
                await asyncio.sleep(max(0.05, min(period, last + idle_timeout - time.monotonic())))
                touched = sandbox_id in self.touched
                self.touched.discard(sandbox_id)
                active = await self._active(sandbox_id)
                now = time.monotonic()
                if active or was_active or touched:
                    last = now
                was_active = active
                if now - last >= idle_timeout and self._state(sandbox_id) == "running":
                    log.info("sandbox %s: idle for %gs, ending it", sandbox_id, idle_timeout)
                    self._set_config(sandbox_id, ended_by="idle_timeout")
                    rec = self._row(sandbox_id)
                    self._finish(sandbox_id, "timeout", -1)
                    cluster = self.cluster(rec)
                    if cluster is not None:
                        await cluster._cancel(sandbox_id)
                    else:
                        await self._kill(rec)
                    return
        except asyncio.CancelledError:
            return

    async def _active(self, sandbox_id: str) -> bool:
        """Whether an exec'd command runs in the sandbox or a tunnel has a connection. A check
        that cannot tell (the image has no /bin/sh, the node does not answer) counts as active:
        mctl never ends work it could not see."""
        rec = self._row(sandbox_id)
        ports = list(rec.get("ports") or {})
        argv = sandbox_runtime.activity_argv(rec.get("run_dir") or rec["container"], ports,
                                             isolation=rec["isolation"],
                                             container_id=rec.get("container_id"))
        cluster = self.cluster(rec)
        try:
            if cluster is not None and hasattr(cluster, "run_in"):  # its own exec (Nomad)
                rc, out, err = await cluster.run_in(
                    self, sandbox_id, sandbox_runtime.activity_command(ports), timeout=30)
            elif cluster is not None:  # podman exec on the node, inside the sandbox's job
                argv = sandbox_runtime.activity_argv(rec["container"], ports)
                rc, out, err = await cluster._on_node(sandbox_id, *argv[1:], timeout=30)
            else:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                    stdin=asyncio.subprocess.DEVNULL)
                raw_out, raw_err = await asyncio.wait_for(proc.communicate(), 30)
                rc, out, err = (proc.returncode or 0, raw_out.decode(errors="replace"),
                                raw_err.decode(errors="replace"))
        except (asyncio.TimeoutError, OSError, InvalidError) as exc:
            rc, out, err = 1, "", str(exc)
        counts = out.split()
        if rc != 0 or len(counts) != 2 or not all(c.isdigit() for c in counts):
            if self._state(sandbox_id) == "running":
                log.warning("sandbox %s: could not check its activity for idle_timeout "
                            "(counted as active): %s", sandbox_id, err.strip()[-300:])
            return True
        return int(counts[0]) > 0 or int(counts[1]) > 0

    def config(self, sandbox_id: str) -> dict[str, Any]:
        """The sandbox's stored config (`insert`, plus what its backend added), {} if none."""
        row = self.db.execute("SELECT config FROM sandboxes WHERE sandbox_id = ?",
                              (sandbox_id,)).fetchone()
        return json.loads((row[0] if row else None) or "{}")

    def _set_config(self, sandbox_id: str, **fields: Any) -> None:
        config = self.config(sandbox_id)
        config.update(fields)
        self._update(sandbox_id, config=json.dumps(config))

    def _state(self, sandbox_id: str) -> str | None:
        row = self.db.execute("SELECT state FROM sandboxes WHERE sandbox_id = ?",
                              (sandbox_id,)).fetchone()
        return row[0] if row else None

    def _finish(self, sandbox_id: str, state: str, code: int | None) -> None:
        if self._state(sandbox_id) != "running":
            return  # the first end wins: a timeout, then the kill's exit, stays a timeout
        self._update(sandbox_id, state=state, returncode=code, ended=time.time())
        self.touched.discard(sandbox_id)
        if state in ("finished", "timeout"):
            self._remove_later(sandbox_id)
        event = self.done.get(sandbox_id)
        if event is not None:
            event.set()
        for task in self.tasks.pop(sandbox_id, []):
            if task is not asyncio.current_task():
                task.cancel()

    def _remove_later(self, sandbox_id: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        container = self._container(sandbox_id)
        run_dir = self._row(sandbox_id).get("run_dir")

        def remove() -> None:
            if run_dir:  # bwrap: its output goes with its directory
                from mctl.core import sandbox_bwrap

                sandbox_bwrap.remove_dir(run_dir)
                return
            loop.create_task(_podman("rm", "-f", "-t", "0", "--ignore", container))

        loop.call_later(KEEP_FINISHED_S, remove)

    async def wait(self, sandbox_id: str, timeout: float) -> dict[str, Any]:
        rec = self._row(sandbox_id)
        if rec["state"] in ("running", "starting") and timeout > 0:
            event = self.done.setdefault(sandbox_id, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), min(timeout, WAIT_CAP_S))
            except asyncio.TimeoutError:
                pass
            rec = self._row(sandbox_id)
        return rec

    async def terminate(self, sandbox_id: str) -> dict[str, Any]:
        """Kill the sandbox and every process in it; its container goes (logs with it)."""
        rec = self._row(sandbox_id)
        if self.cluster(rec) is not None:
            return await self.cluster(rec).terminate(self, sandbox_id)
        if rec["state"] == "running":
            self._finish(sandbox_id, "terminated", 137)
        if rec.get("isolation") == "bwrap":
            from mctl.core import sandbox_bwrap

            await asyncio.to_thread(sandbox_bwrap.cleanup, sandbox_id, rec.get("run_dir"))
            await asyncio.to_thread(sandbox_bwrap.remove_dir, rec.get("run_dir"))
            return self._row(sandbox_id)
        await _podman("rm", "-f", "-t", "0", self._container(sandbox_id))
        return self._row(sandbox_id)

    async def logs(self, sandbox_id: str) -> dict[str, str]:
        rec = self._row(sandbox_id)
        if self.cluster(rec) is not None:
            return await self.cluster(rec).logs(self, sandbox_id)
        if rec.get("isolation") == "bwrap":
            from mctl.core import sandbox_bwrap

            logs = sandbox_bwrap.read_logs(rec["run_dir"]) if rec.get("run_dir") else {}
            if logs.get("stdout") is None:
                raise NotFoundError(f"The logs of sandbox {sandbox_id} are gone (its directory "
                                    "was removed when it was terminated).")
            return logs
        rc, out, err = await _podman("logs", self._container(sandbox_id))
        if rc != 0:
            raise NotFoundError(f"The logs of sandbox {sandbox_id} are gone (its container was "
                                "removed when it was terminated).")
        return {"stdout": out, "stderr": err}

    async def snapshot(self, sandbox_id: str) -> dict[str, Any]:
        """The sandbox's file system as a new local image, its deletions included
        (core/sandbox_snapshot says how, and why not `podman commit`)."""
        rec = self._row(sandbox_id)
        if rec["state"] != "running":
            raise InvalidError(f"Sandbox {sandbox_id} is {rec['state']}; snapshot a running one.")
        cluster = self.cluster(rec)
        if cluster is not None:  # on its node (plugins/sandbox_slurm)
            if not hasattr(cluster, "snapshot"):
                raise InvalidError(f"Sandbox {sandbox_id} runs on the {cluster.name} node "
                                   f"{rec['host']}: snapshot_filesystem() is not available for "
                                   f"sandboxes on {cluster.name.capitalize()} yet.")
            return await cluster.snapshot(self, rec)
        if rec["isolation"] == "bwrap":
            raise InvalidError(f"Sandbox {sandbox_id} is a bwrap sandbox (the host's /usr, no "
                               "image): snapshot_filesystem() needs isolation='gvisor' or "
                               "'runc'.")
        from mctl.core import sandbox_snapshot

        tag = sandbox_snapshot.tag(sandbox_id)
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", self.snapshot_script(rec, tag), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), SNAPSHOT_TIMEOUT_S)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise InvalidError(f"Could not snapshot sandbox {sandbox_id}: it took over "
                               f"{SNAPSHOT_TIMEOUT_S:g}s (a very large file system?).") from None
        if proc.returncode != 0:
            raise InvalidError(f"Could not snapshot sandbox {sandbox_id}: "
                               f"{err.decode(errors='replace').strip()[-400:]}")
        return {"image": tag}

    def snapshot_script(self, rec: dict[str, Any], tag: str) -> str:
        """The script that snapshots sandbox `rec` as `tag` where it runs."""
        from mctl.core import sandbox_snapshot

        config = self.config(rec["sandbox_id"])
        return sandbox_snapshot.script(rec["container"], config["image"], tag,
                                       [m["path"] for m in config.get("mounts") or []],
                                       sandbox_runtime.SANDBOX_USER)

    async def stop_app(self, app_id: str) -> None:
        """The app stopped: its sandboxes stop, and the containers of finished ones go too."""
        for rec in self.list(app_id=app_id):
            await self.terminate(rec["sandbox_id"])
        await self._remove([r for r in self.list(app_id=app_id, include_finished=True)])

    async def _remove(self, records: list[dict[str, Any]]) -> None:
        from mctl.core import sandbox_bwrap

        for r in records:
            if r.get("run_dir") and r["state"] in ("finished", "timeout"):
                sandbox_bwrap.remove_dir(r["run_dir"])
        names = [r["container"] for r in records if r["state"] in ("finished", "timeout")
                 and not r.get("run_dir")]
        if names:
            await _podman("rm", "-f", "-t", "0", "--ignore", *names)

    async def reap_ephemeral(self) -> list[str]:
        """Remove the sandbox and warm containers of embedded control planes of this host whose
        process is gone (a `mctl run` killed with SIGKILL, a crash): their state went with them,
        so no command could reach them. A live one's, or another host's, are left alone.
        Returns the containers removed."""
        try:
            rc, out, _ = await _podman("ps", "-a", "--filter", f"label={EPHEMERAL_LABEL}",
                                       "--format", f'{{{{.ID}}}} {{{{index .Labels '
                                       f'"{EPHEMERAL_LABEL}"}}}}')
            if rc != 0:
                return []
            gone = [cid for cid, _, owner in (line.partition(" ") for line in out.splitlines())
                    if owner and _owner_gone(owner.strip(), self.host)]
            if gone:
                log.info("sandboxes: removing %d containers of embedded control planes that "
                         "no longer run", len(gone))
                await _podman("rm", "-f", "-t", "0", "--ignore", *gone)
            return gone
        except Exception:  # noqa: BLE001 - a net under crashes; never in the way of a start
            log.exception("sandboxes: removing leftover containers failed")
            return []

    async def shutdown(self) -> None:
        """The control plane stops: its running sandboxes stop with it."""
        self.warm_size = 0
        if self._reaper is not None:
            self._reaper.cancel()
        await self._drain_pool()
        for rec in self.list():
            await self.terminate(rec["sandbox_id"])
        for tasks in self.tasks.values():
            for task in tasks:
                task.cancel()
        started = self.db.execute("SELECT sandbox_id FROM sandboxes WHERE ended > ?",
                                  (self.started,)).fetchall()
        await self._remove([self._row(r[0]) for r in started])

    async def recover(self) -> None:
        """After a restart: sandboxes whose container still runs get their watchers back; one
        that ended meanwhile gets its exit code from podman; one whose container is gone is
        recorded as lost."""
        await self._drain_pool()
        if self.labels:  # in the background: an embedded control plane starts at once
            self._reaper = asyncio.get_running_loop().create_task(self.reap_ephemeral())
        if self.cluster() is not None:  # sandboxes on Slurm nodes: their jobs, found again
            await self.cluster().recover(self, [r for r in self.list() if self.cluster(r)])
            for rec in self.list():
                if self.cluster(rec) is not None:
                    self._watch_idle(rec["sandbox_id"], rec.get("idle_timeout"))
        for rec in self.list():
            if self.cluster(rec) is not None:
                continue
            if rec.get("isolation") == "bwrap":  # died with the control plane that ran it
                from mctl.core import sandbox_bwrap

                await asyncio.to_thread(sandbox_bwrap.cleanup, rec["sandbox_id"],
                                        rec.get("run_dir"))
                await asyncio.to_thread(sandbox_bwrap.remove_dir, rec.get("run_dir"))
                self._update(rec["sandbox_id"], state="lost", ended=time.time())
                continue
            rc, out, _ = await _podman("inspect", "-f", "{{.State.Running}} {{.State.ExitCode}}",
                                       rec["container"])
            running, _, code = out.strip().partition(" ")
            if rc == 0 and running == "false" and code.lstrip("-").isdigit():
                timed_out = time.time() >= rec["created"] + rec["timeout"]
                self._update(rec["sandbox_id"], state="timeout" if timed_out else "finished",
                             returncode=-1 if timed_out else int(code), ended=time.time())
                self._remove_later(rec["sandbox_id"])
            elif rc == 0 and running == "true":
                self.done[rec["sandbox_id"]] = asyncio.Event()
                left = rec["created"] + rec["timeout"] - time.time()
                loop = asyncio.get_running_loop()
                self.tasks[rec["sandbox_id"]] = [
                    loop.create_task(self._watch(rec["sandbox_id"])),
                    loop.create_task(self._expire(rec["sandbox_id"], max(0.0, left)))]
                self._watch_idle(rec["sandbox_id"], rec.get("idle_timeout"))
            else:
                self._update(rec["sandbox_id"], state="lost", ended=time.time())


def snapshot_image(tag: str) -> bool:
    """Whether `tag` is an image a sandbox can start from as it is: one on this machine
    (`localhost/...`, a snapshot_filesystem() image) or a snapshot pushed to
    MCTL_IMAGE_REGISTRY by a sandbox on a cluster node (plugins/sandbox_slurm)."""
    registry = os.environ.get("MCTL_IMAGE_REGISTRY", "").rstrip("/")
    return tag.startswith("localhost/") or bool(registry) and tag.startswith(
        f"{registry}/mctl/snapshot:")


def _default_image(base: str) -> str:
    """`base` plus /usr/bin/python -> python3, as `localhost/mctl/sandbox-default:<base id>`;
    `base` itself when buildah is missing or the base is not here (create then says so)."""
    import io
    import subprocess
    import tarfile
    import tempfile

    inspect = subprocess.run(["podman", "image", "inspect", "-f", "{{.Id}}", base],
                             capture_output=True, text=True)
    if inspect.returncode != 0 or not shutil.which("buildah"):
        return base
    tag = f"localhost/mctl/sandbox-default:{inspect.stdout.strip()[:12]}"
    if subprocess.run(["podman", "image", "exists", tag]).returncode == 0:
        return tag
    with tempfile.NamedTemporaryFile(suffix=".tar") as tmp:
        with tarfile.open(tmp.name, "w") as tar:
            link = tarfile.TarInfo("usr/bin/python")
            link.type, link.linkname = tarfile.SYMTYPE, "python3"
            tar.addfile(link, io.BytesIO(b""))
        ctr = subprocess.run(["buildah", "from", "--pull=never", base], capture_output=True,
                             text=True)
        if ctr.returncode != 0:
            return base
        name = ctr.stdout.strip()
        try:
            ok = (subprocess.run(["buildah", "add", name, tmp.name, "/"],
                                 capture_output=True).returncode == 0
                  and subprocess.run(["buildah", "commit", "-q", name, tag],
                                     capture_output=True).returncode == 0)
        finally:
            subprocess.run(["buildah", "rm", name], capture_output=True)
    return tag if ok else base


def sandboxes(control: ControlPlane) -> Sandboxes:
    found = getattr(control, "sandboxes", None)
    if found is None:
        found = control.sandboxes = Sandboxes(control)  # type: ignore[attr-defined]
    return found


def _sb(request: web.Request) -> Sandboxes:
    from mctl.core.server.http import CONTROL

    return sandboxes(request.app[CONTROL])


def _check_secret_names(request: web.Request, names: list[str]) -> web.Response | None:
    """Named secrets in a sandbox need what reading them needs elsewhere: a deploy token (which
    could deploy a function with them), or the task token of a function that declares them. An
    invoke token may pass values it has (Secret.from_dict), not names."""
    from mctl.core.server.audit import PRINCIPAL_KEY
    from mctl.core.server.http import CONTROL

    principal = request.get(PRINCIPAL_KEY)
    if not names or principal is None or principal.has("deploy"):
        return None
    if principal.is_task:
        spec = request.app[CONTROL].apps.get(principal.app_id)
        fspec = next((f for f in (spec.functions.values() if spec else ())
                      if f.function_id == principal.function_id), None)
        declared = {s.get("name") if isinstance(s, dict) else getattr(s, "name", None)
                    for s in (fspec.secrets if fspec else [])}
        if set(names) <= declared:
            return None
    return web.json_response({"error": "Named secrets in a sandbox need a deploy token (or, "
                                       "inside a function, secrets its own function declares); "
                                       f"this token may not read {', '.join(sorted(names))}."},
                             status=403)


async def create_route(request: web.Request) -> web.Response:
    body = await request.json()
    refused = _check_secret_names(request, list(body.get("secret_names") or []))
    if refused is not None:
        return refused
    return web.json_response(await _sb(request).create(body))


async def list_route(request: web.Request) -> web.Response:
    q = request.query
    tags = json.loads(q["tags"]) if q.get("tags") else None
    return web.json_response(_sb(request).list(q.get("app_id") or None, tags,
                                               q.get("all") in ("1", "true")))


async def get_route(request: web.Request) -> web.Response:
    return web.json_response(_sb(request).get(request.match_info["sandbox_id"]))


async def by_name_route(request: web.Request) -> web.Response:
    return web.json_response(_sb(request).from_name(request.query.get("app", ""),
                                                    request.query.get("name", "")))


async def tags_route(request: web.Request) -> web.Response:
    _sb(request).set_tags(request.match_info["sandbox_id"], await request.json())
    return web.json_response({"ok": True})


async def wait_route(request: web.Request) -> web.Response:
    timeout = float(request.query.get("timeout", WAIT_CAP_S))
    return web.json_response(await _sb(request).wait(request.match_info["sandbox_id"], timeout))


async def terminate_route(request: web.Request) -> web.Response:
    return web.json_response(await _sb(request).terminate(request.match_info["sandbox_id"]))


async def exec_route(request: web.Request) -> web.Response:
    """Check that the sandbox runs and say where: the client runs the command there itself."""
    sb = _sb(request)
    rec = sb.get(request.match_info["sandbox_id"])
    if rec["state"] != "running":
        raise InvalidError(f"Sandbox {rec['sandbox_id']} is {rec['state']}; exec and open need a "
                           "running sandbox.")
    body = await request.json()
    refused = _check_secret_names(request, list(body.get("secret_names") or []))
    if refused is not None:
        return refused
    env = await asyncio.to_thread(sb._secret_values, {"secret_names": body.get("secret_names")})
    sb.touch(rec["sandbox_id"])
    return web.json_response({**rec, "env": env})


async def logs_route(request: web.Request) -> web.Response:
    return web.json_response(await _sb(request).logs(request.match_info["sandbox_id"]))


async def snapshot_route(request: web.Request) -> web.Response:
    return web.json_response(await _sb(request).snapshot(request.match_info["sandbox_id"]))


def routes() -> list[tuple[str, str, Any, str, str]]:
    """Rows for http.ROUTES: (method, path, handler, user scope, what a task token may do).
    A function's task token may use sandboxes, as Modal's containers may."""
    from mctl.core.server.http import TASK_ANY, TASK_NO

    return [
        ("POST", "/api/sandboxes", create_route, "invoke", TASK_ANY),
        ("GET", "/api/sandboxes", list_route, "invoke", TASK_ANY),
        ("GET", "/api/sandboxes/by-name", by_name_route, "invoke", TASK_ANY),
        ("GET", "/api/sandboxes/{sandbox_id}", get_route, "invoke", TASK_ANY),
        ("POST", "/api/sandboxes/{sandbox_id}/tags", tags_route, "invoke", TASK_ANY),
        ("GET", "/api/sandboxes/{sandbox_id}/wait", wait_route, "invoke", TASK_ANY),
        ("POST", "/api/sandboxes/{sandbox_id}/terminate", terminate_route, "invoke", TASK_ANY),
        ("POST", "/api/sandboxes/{sandbox_id}/exec", exec_route, "invoke", TASK_ANY),
        ("POST", "/api/sandboxes/{sandbox_id}/snapshot", snapshot_route, "invoke", TASK_ANY),
        ("GET", "/api/sandboxes/{sandbox_id}/logs", logs_route, "deploy", TASK_NO),
    ]
