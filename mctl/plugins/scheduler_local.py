"""The embedded default backend: each worker is a subprocess on this machine.

Core decides how many workers a pool needs (`mctl.core.server.autoscaler`); this backend starts
and stops processes. Options (`mctl server --scheduler-option KEY=VALUE`):

- `max_containers_per_function` (default: the number of CPU cores): the cap for functions without
  `max_containers`.
- `strict_resources` (default false): refuse (instead of only noting) a `cpu`, `memory` or `gpu`
  request this machine can never offer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mctl
from mctl.core import ids
from mctl.core.plugin_types import PlacementError, Scheduler, WorkerInfo, check_options
from mctl.core.worker_output import OutputTail

if TYPE_CHECKING:
    from mctl.core.launch import LaunchSpec
    from mctl.core.plugin_types import PoolEvents

log = logging.getLogger("mctl.scheduler.local")


@dataclass
class Proc:
    task_id: str
    process: asyncio.subprocess.Process | None = None
    stopping: bool = False
    bridge: Any = None  # block_network: the Unix socket to the control plane (netjail_host)

    def __post_init__(self) -> None:
        self.tail = OutputTail(self.task_id)  # the end of its own output (mctl.core.worker_output)


@dataclass
class LocalPool:
    launch: LaunchSpec
    procs: dict[str, Proc] = field(default_factory=dict)


def _flag(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


class LocalScheduler:
    handles_schedules = False
    provider = "local"
    blocks_network = True  # `block_network=True`: process workers in a network namespace

    OPTIONS = ("max_containers_per_function", "strict_resources", "region")

    def __init__(self, options: dict[str, Any]) -> None:
        check_options("local", options, self.OPTIONS)
        self.options = options
        self.default_max_containers = int(options.get("max_containers_per_function")
                                          or os.cpu_count() or 2)
        self.strict = _flag(options.get("strict_resources", "false"))
        self.pools: dict[str, LocalPool] = {}
        self.events: PoolEvents | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.live: dict[str, Proc] = {}  # every worker process not yet ended, by task id

    async def start(self, events: PoolEvents) -> None:
        self.events = events

    async def ensure_pool(self, launch: LaunchSpec) -> None:
        if launch.pool_id in self.pools:
            return
        if launch.mounts and launch.runtime != "oci":  # containers bind volumes themselves
            from mctl.core import mount_namespace

            if mount_namespace.problem():
                raise PlacementError(f"{launch.function} mounts volumes, but this machine "
                                     f"({socket.gethostname()}) {mount_namespace.problem()}")
        if (launch.cpu_limit or launch.memory_limit_mb) and launch.runtime != "oci" \
                and self.events is not None:
            self.events.notice(launch.pool_id, f"{launch.function}'s cpu/memory limits are not "
                                               "enforced for a worker process without an image; "
                                               "they are in containers (an image with system "
                                               "packages) and on Slurm.")
        if launch.block_network:
            from mctl.core.runtime import netjail_host

            why = netjail_host.problem(launch)
            if why:
                raise PlacementError(f"{launch.function} has block_network=True, but {why}")
        problem = _unavailable(launch)
        if problem and self.strict:
            raise PlacementError(f"this machine ({socket.gethostname()}) {problem}")
        if problem and self.events is not None:
            self.events.notice(launch.pool_id, f"{launch.function}: this machine {problem}; it "
                                               "runs here anyway.")
        unknown = _unknown_gpus(launch)
        if unknown and self.events is not None:
            self.events.notice(launch.pool_id, f"{launch.function}: {unknown}.")
        self.pools[launch.pool_id] = LocalPool(launch)

    async def scale(self, pool_id: str, count: int) -> None:
        pool = self.pools.get(pool_id)
        if pool is None:
            return
        live = [p for p in pool.procs.values() if not p.stopping]
        for _ in range(count - len(live)):
            self._spawn(pool)
        for proc in reversed(live[count:]):  # newest first
            self._stop(proc, grace_s=pool.launch.timeout_s + 5)

    async def stop_worker(self, pool_id: str, worker_id: str, grace_s: float) -> None:
        pool = self.pools.get(pool_id)
        proc = pool.procs.get(worker_id) if pool else None
        if proc is not None:
            self._stop(proc, grace_s)

    async def remove_pool(self, pool_id: str, grace_s: float) -> None:
        pool = self.pools.pop(pool_id, None)
        for proc in pool.procs.values() if pool else ():
            self._stop(proc, grace_s)

    async def list_workers(self, pool_id: str) -> list[WorkerInfo]:
        pool = self.pools.get(pool_id)
        host = socket.gethostname()
        return [WorkerInfo(p.task_id, host, "stopping" if p.stopping else "running",
                           f"pid {p.process.pid}" if p.process else "")
                for p in (pool.procs.values() if pool else ())]

    # How long shutdown waits for workers to drain before killing them; the embedded control
    # plane of an interrupted (Ctrl-C) `mctl run` sets it short.
    shutdown_grace_s = 5.0

    async def shutdown(self) -> None:
        # Every worker still alive, those of removed pools (still draining) too.
        procs = list(self.live.values())
        for proc in procs:
            if proc.process is not None and proc.process.returncode is None:
                proc.process.terminate()
        for proc in procs:
            if proc.process is None:
                continue
            try:
                await asyncio.wait_for(proc.process.wait(), self.shutdown_grace_s)
            except asyncio.TimeoutError:
                proc.process.kill()
        for task in list(self._tasks):
            task.cancel()

    # --- processes -----------------------------------------------------------------------------
    def _spawn(self, pool: LocalPool) -> None:
        proc = Proc(ids.new_id("task"))
        pool.procs[proc.task_id] = proc
        self.live[proc.task_id] = proc
        self._background(self._run(pool, proc))

    async def _run(self, pool: LocalPool, proc: Proc) -> None:
        launch = pool.launch
        env = dict(os.environ)
        env.pop("MCTL_TOKEN", None)  # a worker acts with its task token, not the server's
        for key in ("VAULT_TOKEN", "VAULT_ROLE_ID", "VAULT_SECRET_ID"):  # nor with its Vault rights
            env.pop(key, None)
        argv = list(launch.command)
        extra: dict[str, Any] = {}
        from mctl.core.volume_sync import sources

        for directory in sources(launch.mounts, proc.task_id).values():  # working copies
            os.makedirs(directory, exist_ok=True)
        if launch.runtime == "oci":  # in its image, with podman
            from mctl.plugins.containers import run_argv

            argv, worker_env = run_argv(launch, proc.task_id)
            env.update(worker_env)
            extra["preexec_fn"] = _die_with_parent  # podman stops the container on SIGTERM
        else:
            parent = os.getpid()
            if launch.mounts:  # each volume at its mount path, seen by this worker only
                from mctl.core import mount_namespace

                argv = mount_namespace.wrap(argv, launch.mounts, proc.task_id)
                if mount_namespace.method() == "bwrap":  # bwrap stays the worker's parent
                    parent, extra["preexec_fn"] = 0, _die_with_parent
            env.update(launch.worker_env(proc.task_id))
            if parent:
                env["MCTL_PARENT_PID"] = str(parent)  # workers exit when this server dies
            if launch.block_network:  # no network but the way to the control plane
                from mctl.core.runtime import netjail_host

                argv, proc.bridge = await netjail_host.wrap(argv, launch, proc.task_id)
                extra["preexec_fn"] = _die_with_parent
        code: int | None = None
        try:
            proc.process = await asyncio.create_subprocess_exec(
                *argv, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, **extra)
        except OSError as exc:
            proc.tail.add(f"could not run {argv[0]}: {exc}")
        else:
            if proc.stopping:
                proc.process.terminate()
            assert proc.process.stdout is not None
            # The worker sends its logs over its connection; the tail has what it could not send
            # (killed by a signal) and the reason of an early death.
            async for raw in proc.process.stdout:
                proc.tail.add(raw.decode(errors="replace"))
            code = await proc.process.wait()
            if launch.runtime == "oci" and code is not None and 128 < code < 128 + 65:
                code = 128 - code  # podman's 128+N: the container's process died of signal N
        if proc.bridge is not None:
            await proc.bridge.close()
        copies = sources(launch.mounts, proc.task_id)
        if copies:  # a worker that died before removing its working copies
            import shutil

            for directory in copies.values():
                shutil.rmtree(directory, ignore_errors=True)
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.dirname(directory))
        pool.procs.pop(proc.task_id, None)
        self.live.pop(proc.task_id, None)
        if self.events is not None:
            clean = proc.stopping or code in (0, -signal.SIGTERM)
            self.events.worker_exited(launch.pool_id, proc.task_id, code,
                                      "" if clean else proc.tail.text(), output=proc.tail)

    def _stop(self, proc: Proc, grace_s: float) -> None:
        if proc.stopping:
            return
        proc.stopping = True
        if proc.process is not None and proc.process.returncode is None:
            proc.process.terminate()  # the worker drains on SIGTERM: running inputs finish

        async def kill_later() -> None:
            await asyncio.sleep(grace_s)
            if proc.process is not None and proc.process.returncode is None:
                proc.process.kill()

        self._background(kill_later())

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when this server dies (Linux's PR_SET_PDEATHSIG)."""
    import ctypes

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    except Exception:
        pass


def _unavailable(launch: LaunchSpec) -> str:
    """What of the launch's request this machine can never offer ('' when it can)."""
    cores = os.cpu_count() or 1
    if launch.cpu and launch.cpu > cores:
        return f"has {cores} CPU cores, fewer than cpu={launch.cpu:g}"
    if launch.memory_mb:
        try:
            total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
        except (ValueError, OSError):
            total_mb = 0
        if total_mb and launch.memory_mb > total_mb:
            return f"has {total_mb} MiB of memory, less than memory={launch.memory_mb}"
    if launch.gpu is not None:
        from mctl.core import plugins

        gpus = [g for dev in plugins.registrations("mctl_register_gpu_devices")
                for g in dev.detect()]
        missing = []
        for choice in (launch.gpu, *launch.gpu_fallbacks):  # `gpu=[...]`: any choice will do
            wanted = choice.type
            matching = [g for g in gpus if wanted is None or wanted.lower() in g.model.lower()]
            if len(matching) >= choice.count:
                return ""
            missing.append(_gpus(choice.count, wanted))
        have = (f"{_gpus(len(gpus), None)} ({', '.join(g.model for g in gpus)})" if gpus
                else "no GPU")
        return f"has {have}, and it asks for {' or '.join(missing)}"
    return ""


def _gpus(count: int, gpu_type: str | None) -> str:
    """'1 T4 GPU', '2 GPUs', '3 GPUs of any type'."""
    return f"{count} {gpu_type + ' ' if gpu_type else ''}GPU{'s' if count != 1 else ''}"


def _unknown_gpus(launch: LaunchSpec) -> str:
    from mctl.core.spec import unknown_gpu

    if launch.gpu is None:
        return ""
    return "; ".join(w for w in (unknown_gpu(c.type) for c in (launch.gpu, *launch.gpu_fallbacks))
                     if w)


@mctl.hookimpl
def mctl_register_schedulers():
    yield Scheduler(name="local", factory=LocalScheduler)
