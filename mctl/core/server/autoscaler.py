"""Core's one autoscaling rule, the same for every scheduler backend.

Each function version is a pool. Its target count is enough workers to give every waiting or
running input a slot (`target_inputs` per worker), plus `buffer_containers` while busy, within
`[min_containers, max_containers]`. Growing is the backend's job (`scale`); shrinking stops chosen
workers: those idle for `scaledown_window` since they last finished an input.

A worker that fails to start (it reports its import error, or exits before saying hello) is
restarted with back-off; after `START_FAILURES` failures in a row the function is failing: its
waiting and new inputs fail with the start error until a new version is deployed. A pool the
backend cannot place fails the same way, with the backend's reason.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mctl.core.launch import LaunchSpec, Mount, build_launch, pool_id

if TYPE_CHECKING:
    from mctl.core.plugin_types import SchedulerBackend
    from mctl.core.server.control import Conn, ControlPlane, FunctionState
    from mctl.core.spec import AppSpec, FunctionSpec
    from mctl.core.worker_output import OutputTail

log = logging.getLogger("mctl.autoscaler")

TICK = 0.2
START_FAILURES = 3
MAX_BACKOFF = 30.0


def backoff(failures: int) -> float:
    """Seconds to wait before the next start after `failures` failures in a row."""
    return min(0.5 * 2 ** (failures - 1), MAX_BACKOFF) if failures else 0.0


@dataclass
class Pool:
    launch: LaunchSpec | None        # None while the image is being built
    app_id: str
    function_id: str
    version: int
    spec: FunctionSpec
    asked: int = 0                   # workers the backend runs for us, not being stopped
    ready: set[str] = field(default_factory=set)      # task ids that said hello
    stopping: set[str] = field(default_factory=set)   # task ids core asked to stop
    reported: set[str] = field(default_factory=set)   # task ids that reported a start error
    failures: int = 0                # consecutive start failures
    retry_at: float = 0.0            # monotonic: no new worker before this
    removed: bool = False
    replaces: list[str] = field(default_factory=list)  # pools removed once this one is placed
    busy: bool = False               # a reconcile is awaiting the backend
    again: bool = False


def desired(fs: FunctionState, default_max: int | None) -> int:
    """The one rule: slots for every waiting or running input, plus a buffer while busy."""
    spec = fs.spec
    auto = spec.autoscaling
    busy = fs.n_pending + fs.running
    want = math.ceil(busy / spec.target_per_container)
    if busy:
        want += auto.buffer_containers
    cap = auto.max_containers if auto.max_containers is not None else default_max
    if cap is not None:
        want = min(want, cap)
    return max(want, auto.min_containers)


class Autoscaler:
    """Owns the pools; asks the backend to reach each pool's target count."""

    def __init__(self, control: ControlPlane, backend: SchedulerBackend, server_url: str,
                 options: dict[str, Any] | None = None) -> None:
        self.control = control
        self.backend = backend
        self.server_url = server_url
        self.options = options or {}
        self.pools: dict[str, Pool] = {}
        self.current: dict[str, str] = {}          # function_id -> pool_id of its active version
        self.default_max = getattr(backend, "default_max_containers", None)
        # The backend updates a function's workers in place (see SchedulerBackend): an old
        # version's pool goes only after the new one is placed, never before.
        self.in_place = bool(getattr(backend, "updates_in_place", False))
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closing = False  # the control plane is shutting down: it stops the workers itself

    async def start(self) -> None:
        await self.backend.start(self)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def shutdown(self) -> None:
        self.closing = True
        if self._task is not None:
            self._task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await self.backend.shutdown()

    # --- apps ----------------------------------------------------------------------------------
    async def apply_app(self, app_id: str, app: AppSpec, version: int) -> None:
        """Activate `version`: new pools for its functions; older versions' pools drain."""
        current = {f.function_id for f in app.functions.values()}
        for pid, pool in list(self.pools.items()):
            if pool.app_id == app_id and pool.function_id not in current:  # function removed
                if self.current.get(pool.function_id) == pid:
                    del self.current[pool.function_id]
                self._spawn(self.remove_pool(pid))
        for fspec in app.functions.values():
            pid = pool_id(fspec.function_id, version)
            old = self.current.get(fspec.function_id)
            if old == pid:
                continue
            pool = Pool(None, app_id, fspec.function_id, version, fspec)
            if old is not None and self.in_place:
                pool.replaces.append(old)
            elif old is not None:
                self._spawn(self.remove_pool(old))
            self.pools[pid] = pool
            self.current[fspec.function_id] = pid
            self._spawn(self._prepare(pool, app))

    async def stop_app(self, app_id: str) -> None:
        for pid, pool in list(self.pools.items()):
            if pool.app_id == app_id:
                if self.current.get(pool.function_id) == pid:
                    del self.current[pool.function_id]
                await self.remove_pool(pid, grace_s=5.0)

    async def remove_pool(self, pid: str, grace_s: float | None = None) -> None:
        pool = self.pools.pop(pid, None)
        if pool is None:
            return
        pool.removed = True
        fs = self.control.functions.get(pool.function_id)
        for conn in list(fs.workers if fs else ()):
            if conn.pool_id == pid:
                self.control.drain(conn)
        if pool.launch is not None:
            try:
                await self.backend.remove_pool(pid, grace_s if grace_s is not None
                                               else pool.spec.timeout + 5)
            except Exception:
                log.exception("removing pool %s failed", pid)

    async def _prepare(self, pool: Pool, app: AppSpec) -> None:
        """Build the image, the launch description, and make sure the backend has the pool."""
        try:
            await self._place(pool, app)
        finally:
            # In-place backends: the versions this one replaces go once it is placed (or could
            # not be: then they go, as they would have gone at once on other backends).
            replaced, pool.replaces = pool.replaces, []
            for old in replaced:
                await self.remove_pool(old)

    async def _place(self, pool: Pool, app: AppSpec) -> None:
        from mctl.core.config import environment_name
        from mctl.core.server.image_builds import built_image
        from mctl.core.plugin_types import PlacementError
        from mctl.core.spec import ImageSpec

        fspec = pool.spec
        pid = pool_id(fspec.function_id, pool.version)
        try:
            image = app.images.get(fspec.image_id) or ImageSpec(image_id=fspec.image_id, recipe={})
            built = await built_image(self.control, pool.app_id, image)
            mounts = await asyncio.to_thread(_mounts, fspec)
            tokens = getattr(self.control, "tokens", None)
            token = tokens.task_token(pool.app_id, fspec.function_id, pool.version) if tokens else None
            launch = build_launch(
                pool.app_id, app, fspec, pool.version, server_url=self.server_url,
                built_image=built, task_token=token, environment=environment_name(),
                region=str(self.options.get("region", "local")),
                provider=getattr(self.backend, "provider", "local"), mounts=mounts)
            if pool.removed:  # stopped (or its function dropped) while its image was built
                return
            newer = self.pools.get(self.current.get(fspec.function_id, ""))
            if self.in_place and newer is not None and newer is not pool:
                # A newer version came while this one was being built: it takes over what this
                # one was to replace (and replaces this one), so the job is never left without
                # a version, and this one is not placed only to be rolled over at once.
                newer.replaces.extend(pool.replaces)
                pool.replaces.clear()
                return
            if launch.block_network and not getattr(self.backend, "blocks_network", False):
                raise PlacementError(
                    f"{fspec.tag} has block_network=True, which the "
                    f"{getattr(self.backend, 'provider', 'this')} backend cannot enforce; run "
                    "it on the local backend (process workers), or remove block_network=True")
            await self.backend.ensure_pool(launch)
        except PlacementError as exc:
            self.placement_failed(pid, str(exc))
            return
        except Exception as exc:
            log.exception("preparing %s failed", pid)
            self.placement_failed(pid, f"could not prepare its workers: {exc}")
            return
        pool.launch = launch
        try:  # after a restart: workers the backend adopted reclaim their inputs first
            running = {w.worker_id for w in await self.backend.list_workers(pid)
                       if w.state == "running"}
        except Exception:
            log.exception("listing the workers of %s failed", pid)
            running = set()
        self.control.expect_workers(fspec.function_id, running)
        self.poke(fspec.function_id)

    # --- scaling -------------------------------------------------------------------------------
    def poke(self, function_id: str) -> None:
        """Inputs arrived or finished: reconcile this function's pool now, not at the next tick."""
        pool = self.pools.get(self.current.get(function_id, ""))
        if pool is not None:
            self._reconcile_soon(pool)

    def _reconcile_soon(self, pool: Pool) -> None:
        if pool.busy:
            pool.again = True
            return
        self._spawn(self._reconcile(pool))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            for pool in list(self.pools.values()):
                if self.current.get(pool.function_id) == self._pid(pool):
                    self._reconcile_soon(pool)

    @staticmethod
    def _pid(pool: Pool) -> str:
        return pool_id(pool.function_id, pool.version)

    async def _reconcile(self, pool: Pool) -> None:
        if pool.busy or pool.removed or pool.launch is None:
            return
        fs = self.control.functions.get(pool.function_id)
        if fs is None:
            return
        pool.busy = True
        try:
            while True:
                pool.again = False
                await self._reconcile_once(pool, fs)
                if not pool.again or pool.removed:
                    break
        except Exception:
            log.exception("autoscaling %s failed", self._pid(pool))
        finally:
            pool.busy = False

    async def _reconcile_once(self, pool: Pool, fs: FunctionState) -> None:
        pid = self._pid(pool)
        want = 0 if fs.failure is not None else desired(fs, self.default_max)
        now = time.monotonic()
        # Trust the backend's own count: an exit report that never came must not leave a pool
        # believed full while it has no worker.
        actual = sum(1 for w in await self.backend.list_workers(pid) if w.state != "stopping")
        if actual < pool.asked:
            log.warning("%s: %d workers believed running, %d seen; starting more", pid,
                        pool.asked, actual)
            pool.asked = actual
        if want > pool.asked:
            if now < pool.retry_at:
                return  # backing off after start failures; the tick retries
            before, pool.asked = pool.asked, want
            try:
                await self.backend.scale(pid, want)
            except Exception as exc:  # e.g. the cluster rejected the job: its reason, to callers
                from mctl.core.serialization import serialize_exception
                from mctl.exception import ExecutionError

                pool.asked = before
                text = f"Function {pool.spec.tag} could not get a worker: {exc}"
                self._count_failure(pool, serialize_exception(ExecutionError(text)), text)
            return
        if want == pool.asked:
            return
        # Shrink: stop workers idle since their last finished input for scaledown_window.
        window = pool.spec.autoscaling.scaledown_window
        idle = sorted((c for c in fs.workers
                       if c.pool_id == pid and not c.draining and not c.running),
                      key=lambda c: c.idle_since)
        surplus = pool.asked - want
        not_connected = pool.asked - sum(1 for c in fs.workers
                                         if c.pool_id == pid and not c.draining)
        for conn in idle[:surplus]:
            if now - conn.idle_since < window:
                break
            self.control.drain(conn)
            pool.stopping.add(conn.task_id)
            pool.asked -= 1
            await self.backend.stop_worker(pid, conn.task_id, pool.spec.timeout + 5)
        if fs.failure is not None and not_connected > 0:
            # Failing: workers still starting will not be needed.
            pool.asked = max(pool.asked - not_connected, 0)
            await self.backend.scale(pid, pool.asked)

    async def stop_worker(self, conn: Conn) -> None:
        """`mctl container stop`: drain this worker and stop it; reconcile replaces it if the
        function still needs one."""
        pool = self.pools.get(conn.pool_id)
        self.control.drain(conn)
        if pool is None or conn.task_id in pool.stopping:
            return
        pool.stopping.add(conn.task_id)
        pool.asked = max(pool.asked - 1, 0)
        await self.backend.stop_worker(conn.pool_id, conn.task_id, pool.spec.timeout + 5)
        self._reconcile_soon(pool)

    # --- what workers and backends report -------------------------------------------------------
    def worker_ready(self, conn: Conn) -> bool:
        """A worker said hello for its pool. False when that pool is gone (the worker should stop)."""
        pool = self.pools.get(conn.pool_id)
        if pool is None or pool.removed:
            return False
        pool.ready.add(conn.task_id)
        pool.failures = 0
        return True

    def start_failed(self, pid: str, task_id: str, error: bytes, summary: str) -> None:
        """A worker could not load the user's code; `error` is the pickled exception."""
        pool = self.pools.get(pid)
        if pool is None:
            return
        pool.reported.add(task_id)
        self._count_failure(pool, error, summary)

    def worker_exited(self, pool_id: str, worker_id: str, exit_code: int | None,
                      detail: str, output: OutputTail | None = None) -> None:
        """PoolEvents: a backend saw a worker end."""
        log.info("worker %s of %s exited (code %s)", worker_id, pool_id, exit_code)
        self.control.worker_gone(worker_id, exit_code, output)
        pool = self.pools.get(pool_id)
        if pool is None:
            return
        if worker_id in pool.stopping:
            pool.stopping.discard(worker_id)
            return
        pool.asked = max(pool.asked - 1, 0)
        if self.closing:  # stopped by this shutdown, not a failed start: nothing to count or log
            return
        if worker_id in pool.ready or worker_id in pool.reported:
            pool.ready.discard(worker_id)
            pool.reported.discard(worker_id)
            self._reconcile_soon(pool)
            return
        from mctl.core.serialization import serialize_exception
        from mctl.exception import ExecutionError

        summary = (f"Function {pool.spec.tag} could not start: its worker {worker_id} exited with "
                   f"code {exit_code} before it connected.")
        if detail:
            summary += "\n" + detail
        self._count_failure(pool, serialize_exception(ExecutionError(summary)), summary)

    def placement_failed(self, pool_id: str, message: str) -> None:
        """PoolEvents: the backend can never run this pool."""
        from mctl.core.serialization import serialize_exception
        from mctl.exception import ExecutionError

        pool = self.pools.get(pool_id)
        if pool is None or self.control.functions.get(pool.function_id) is None:
            return
        text = f"Function {pool.spec.tag} cannot be placed: {message}"
        self.control.fail_function(pool.function_id, serialize_exception(ExecutionError(text)),
                                   text)

    def notice(self, pool_id: str, message: str) -> None:
        """PoolEvents: a line for the app's logs."""
        pool = self.pools.get(pool_id)
        if pool is not None:
            self.control.append_log(pool.app_id, "scheduler", pool.spec.tag, f"mctl: {message}")

    def _count_failure(self, pool: Pool, error: bytes, summary: str) -> None:
        pool.failures += 1
        pool.retry_at = time.monotonic() + backoff(pool.failures)
        if pool.failures == 1:  # said once; retries go quietly until it is failing
            self.control.append_log(pool.app_id, "start", pool.spec.tag,
                                    f"mctl: {pool.spec.tag} failed to start, retrying: {summary}")
        if pool.failures >= START_FAILURES:
            again = "deployed" if self.control.app_modes.get(pool.app_id) == "deployed" else "run"
            text = (f"Function {pool.spec.tag} failed to start {pool.failures} times in a row "
                    f"({summary.splitlines()[0] if summary else 'no reason given'}); its calls "
                    f"fail until the app is {again} again.")
            self.control.fail_function(pool.function_id, error, text)
        self._reconcile_soon(pool)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _mounts(fspec: FunctionSpec) -> tuple[Mount, ...]:
    """Volumes at their mount paths; the local driver also gives a host directory. A volume that
    does not exist (deleted since the deploy) fails the pool with its name, never is made again
    empty here: deploy and `app.run()` create the `create_if_missing=True` ones."""
    if not fspec.volumes:
        return ()
    from mctl.core import volume_files

    driver = volume_files.driver()
    mounts = []
    for path, name in sorted(fspec.volumes.items()):
        where = driver.mount(name, False)  # NotFoundError for a volume deleted since the deploy
        mounts.append(Mount(path, name, None if driver.copies else where,
                            read_only=path in fspec.read_only_volumes, synced=driver.copies))
    return tuple(mounts)
