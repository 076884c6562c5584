"""The embedded default scheduler: worker subprocesses on this machine, scaled by queue depth.

Each function has a pool of `mctl.core.runtime` subprocesses kept between `min_containers` and
`max_containers`: enough to give every waiting or running input a slot (`target_inputs` per
container), plus `buffer_containers` while busy. A worker idle for `scaledown_window` is stopped.
Without `max_containers`, a pool grows to at most one worker per CPU core.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import mctl
from mctl.core import ids
from mctl.core.plugin_types import Scheduler

log = logging.getLogger("mctl.scheduler.local")

TICK = 0.2


@dataclass
class Proc:
    task_id: str
    process: asyncio.subprocess.Process
    version: int
    started: float
    idle_since: float
    stopping: bool = False


@dataclass
class Pool:
    app_id: str
    function_id: str
    version: int
    spec: Any
    app: Any
    procs: dict[str, Proc] = field(default_factory=dict)


class LocalScheduler:
    handles_schedules = False

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.pools: dict[str, Pool] = {}
        self.control: Any = None
        self.server_url = ""
        self._task: asyncio.Task[None] | None = None
        self._notices: set[str] = set()
        self.default_max = int(options.get("default_max_containers") or os.cpu_count() or 2)

    async def start(self, control: Any, server_url: str) -> None:
        self.control = control
        self.server_url = server_url
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def apply_app(self, app_id: str, spec: Any, version: int, mode: str) -> None:
        for fspec in spec.functions.values():
            pool = self.pools.get(fspec.function_id)
            if pool is None:
                pool = self.pools[fspec.function_id] = Pool(app_id, fspec.function_id, version,
                                                            fspec, spec)
            elif pool.version != version:
                # A new version: old workers finish what they run and exit; new ones start.
                pool.version, pool.spec, pool.app = version, fspec, spec
                for proc in pool.procs.values():
                    self._stop(proc)
            self._reconcile(pool)

    async def stop_app(self, app_id: str) -> None:
        for fid, pool in list(self.pools.items()):
            if pool.app_id == app_id:
                del self.pools[fid]
                for proc in pool.procs.values():
                    self._stop(proc, force_after=5.0)

    def on_demand(self, function_id: str) -> None:
        pool = self.pools.get(function_id)
        if pool is not None:
            self._reconcile(pool)

    async def shutdown(self) -> None:
        if self._task:
            self._task.cancel()
        procs = [p for pool in self.pools.values() for p in pool.procs.values()]
        for proc in procs:
            if proc.process.returncode is None:
                proc.process.terminate()
        for proc in procs:
            try:
                await asyncio.wait_for(proc.process.wait(), 5)
            except asyncio.TimeoutError:
                proc.process.kill()

    # --- scaling -------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            for pool in list(self.pools.values()):
                try:
                    self._reconcile(pool)
                except Exception:
                    log.exception("autoscaling %s failed", pool.function_id)

    def desired(self, pool: Pool) -> int:
        fs = self.control.functions.get(pool.function_id)
        auto = pool.spec.autoscaling
        busy = (fs.n_pending + fs.running) if fs is not None else 0
        want = math.ceil(busy / pool.spec.target_per_container)
        if busy:
            want += auto.buffer_containers
        # Without max_containers, one machine runs at most one worker per core per function.
        cap = auto.max_containers if auto.max_containers is not None else self.default_max
        return max(min(want, cap), auto.min_containers)

    def _reconcile(self, pool: Pool) -> None:
        now = time.monotonic()
        live = [p for p in pool.procs.values() if not p.stopping and p.version == pool.version]
        want = self.desired(pool)
        for _ in range(want - len(live)):
            self._spawn(pool)
        if len(live) <= want:
            return
        busy = self._busy_tasks(pool)
        for proc in live:
            if proc.task_id in busy:
                proc.idle_since = now
        idle = sorted((p for p in live if p.task_id not in busy), key=lambda p: p.idle_since)
        surplus = len(live) - want
        for proc in idle[:surplus]:
            if now - proc.idle_since >= pool.spec.autoscaling.scaledown_window:
                self._stop(proc)

    def _busy_tasks(self, pool: Pool) -> set[str]:
        fs = self.control.functions.get(pool.function_id)
        if fs is None:
            return set()
        return {w.task_id for w in fs.workers if w.running}

    def _spawn(self, pool: Pool) -> None:
        task_id = ids.new_id("task")
        proc_placeholder = Proc(task_id, None, pool.version, time.monotonic(),  # type: ignore[arg-type]
                                time.monotonic())
        pool.procs[task_id] = proc_placeholder
        asyncio.get_running_loop().create_task(self._run_process(pool, proc_placeholder))

    async def _run_process(self, pool: Pool, proc: Proc) -> None:
        from mctl.core import plugins
        from mctl.core.config import environment_name
        from mctl.core.environment import worker_env
        from mctl.core.spec import ImageSpec

        fspec, app = pool.spec, pool.app
        try:
            image = app.images.get(fspec.image_id) or ImageSpec(image_id=fspec.image_id, recipe={})
            builder = next(b for b in plugins.registrations("mctl_register_image_builders")
                           if b.handles(image))
            built = builder.build(image)
            env = dict(os.environ)
            env.update(worker_env(app, fspec, app_id=pool.app_id, task_id=proc.task_id,
                                  server_url=self.server_url, environment=environment_name(),
                                  region=self.options.get("region", "local"), provider="local",
                                  image_env=built.get("env")))
            env["MCTL_PARENT_PID"] = str(os.getpid())
            env.pop("MCTL_TOKEN", None)  # a worker acts with its task token, not the server's
            env["MCTL_TASK_TOKEN"] = self.control.tokens.task_token(pool.app_id, fspec.function_id,
                                                                    pool.version)
            if built.get("notice") and fspec.image_id not in self._notices:
                self._notices.add(fspec.image_id)
                self.control.append_log(pool.app_id, proc.task_id, fspec.tag, built["notice"])
            proc.process = await asyncio.create_subprocess_exec(
                built.get("python", sys.executable), "-m", "mctl.core.runtime", env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
        except Exception as exc:
            pool.procs.pop(proc.task_id, None)
            self.control.append_log(pool.app_id, proc.task_id, fspec.tag,
                                    f"mctl: could not start a worker for {fspec.tag}: {exc}")
            await asyncio.sleep(1)  # do not spin on a broken environment
            return
        if proc.stopping:
            proc.process.terminate()
        assert proc.process.stdout is not None
        async for raw in proc.process.stdout:
            self.control.append_log(pool.app_id, proc.task_id, fspec.tag,
                                    raw.decode(errors="replace").rstrip("\n"))
        code = await proc.process.wait()
        pool.procs.pop(proc.task_id, None)
        if code not in (0, -signal.SIGTERM) and not proc.stopping:
            self.control.append_log(pool.app_id, proc.task_id, fspec.tag,
                                    f"mctl: worker {proc.task_id} exited with code {code}")

    def _stop(self, proc: Proc, force_after: float = 30.0) -> None:
        if proc.stopping:
            return
        proc.stopping = True
        fs = None
        for pool in self.pools.values():
            if proc.task_id in pool.procs:
                fs = self.control.functions.get(pool.function_id)
        conn = next((w for w in fs.workers if w.task_id == proc.task_id), None) if fs else None
        if conn is not None:
            conn.draining = True
            conn.send({"type": "stop"})
        elif proc.process is not None and proc.process.returncode is None:
            proc.process.terminate()

        async def force() -> None:
            await asyncio.sleep(force_after)
            if proc.process is not None and proc.process.returncode is None:
                proc.process.kill()

        asyncio.get_running_loop().create_task(force())

    def containers(self, function_id: str) -> int:
        pool = self.pools.get(function_id)
        return sum(1 for p in pool.procs.values() if not p.stopping) if pool else 0


@mctl.hookimpl
def mctl_register_schedulers():
    yield Scheduler(name="local", factory=LocalScheduler)
