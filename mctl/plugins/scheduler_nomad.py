"""Nomad backend: each function is a Nomad service job whose task group `workers` runs mctl's
worker runtime; core's autoscaler sets its count through Nomad's scale API.

The jobs are those `mctl nomad render` prints (`nomad_render`): one service job
`mctl-<app>-<function>` per function, and a periodic batch job per schedule, so Nomad fires
schedules (`handles_schedules`). A new version (a redeploy, a rollback) is registered over the
same job IDs while the old version still runs (`updates_in_place`: core removes the old pool
only after `ensure_pool` of the new one); Nomad keeps the job's versions and its `update` block
rolls the allocations over. The old pool's removal then deregisters only the jobs the new
version no longer has (a dropped schedule's periodic job). A worker's task id is
`ta-<allocation id>`. Its task token is written to the job's Nomad Variable
(`nomad/jobs/<job id>`), which only that job's tasks can read, never into the job itself.

This backend has been checked by contract only: every body it sends is checked against Nomad's
own API types by tools/nomad-jobcheck in the tests; it has not run against a live Nomad agent.
The calls go through python-nomad (`nomad_api.NomadAPI`, which also says what it works around).

Connection settings: see `nomad_api`. Other options: see `NomadOptions`, plus request_timeout
(seconds, default 15), poll_interval (default 2) and sandbox_start_timeout (default 300: how long a
sandbox's job may take to be placed and start, plugins/sandbox_nomad).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import mctl
from mctl.core.plugin_types import Scheduler, WorkerInfo
from mctl.exception import InvalidError
from mctl.plugins.nomad_api import (Connection, FrameDecoder, NomadAPI, NomadError,
                                    logs_request)
from mctl.plugins.nomad_render import GROUP, SPEC_META, TASK, NomadOptions, render_function

__all__ = ["Connection", "FrameDecoder", "NomadError", "NomadScheduler", "force_path",
           "image_ref", "logs_request", "register_body", "revert_body", "revert_target",
           "scale_body", "variable_body"]

if TYPE_CHECKING:
    from mctl.core.launch import LaunchSpec
    from mctl.core.plugin_types import PoolEvents

log = logging.getLogger("mctl.scheduler.nomad")
CONNECTION = ("address", "token_file", "cacert", "request_timeout", "poll_interval",
              "sandbox_start_timeout")
LIVE = {"pending", "running"}
TAIL_BYTES = 4096  # of a failed worker's stdout and stderr, into the app's logs


@dataclass
class NomadPool:
    launch: LaunchSpec
    job_ids: tuple[str, ...]      # the service job, then the periodic job if any
    namespace: str                # the jobs' (a function may have its own)
    count: int = 0
    job_version: int = 0          # the Nomad job version this pool registered
    workers: dict[str, WorkerInfo] = field(default_factory=dict)  # task id -> last seen


# --- request bodies (the tests pass each through tools/nomad-jobcheck) --------------------------
def register_body(job: dict[str, Any], conn: Connection) -> dict[str, Any]:
    """`POST /v1/job/:id`: an `api.JobRegisterRequest`, in the job's own namespace (a
    per-function override may differ from the connection's)."""
    return {**job, "Namespace": job["Job"].get("Namespace") or conn.namespace,
            "Region": conn.region}


def scale_body(job_id: str, count: int, launch: LaunchSpec) -> dict[str, Any]:
    """`POST /v1/job/:id/scale`: an `api.ScalingRequest`."""
    return {"Count": count, "Target": {"Job": job_id, "Group": GROUP},
            "Message": f"mctl autoscaler: {launch.function} v{launch.version} to {count}",
            "Meta": {"mctl.pool": launch.pool_id}}


def variable_body(job_id: str, task_token: str | None, conn: Connection,
                  app_version: int = 0, namespace: str | None = None) -> dict[str, Any]:
    """`PUT /v1/var/nomad/jobs/:id`: an `api.Variable` the job's own tasks may read: the task
    token and the app version their workers serve (neither is in the job itself)."""
    items = {"app_version": str(app_version)}
    if task_token:
        items["task_token"] = task_token
    return {"Namespace": namespace or conn.namespace, "Path": f"nomad/jobs/{job_id}",
            "Items": items}


def revert_body(job_id: str, version: int, prior: int) -> dict[str, Any]:
    """`POST /v1/job/:id/revert`: the `api.JobRevertRequest` python-nomad's `revert_job` sends
    (namespace and region travel in the query). EnforcePriorVersion makes Nomad refuse the
    revert if someone changed the job since the backend read its versions."""
    return {"JobID": job_id, "JobVersion": version, "EnforcePriorVersion": prior}


def revert_target(versions: dict[str, Any] | None, spec: str) -> tuple[int, int] | None:
    """From `GET /v1/job/:id/versions` (`{"Versions": [Job, ...], ...}`): (the newest earlier
    job version that ran the same function spec — its `mctl.spec` meta —, the current version),
    or None when the job is new, already runs that spec, or never did."""
    jobs = (versions or {}).get("Versions") or []
    if not jobs:
        return None
    current = max(jobs, key=lambda job: job.get("Version", 0))
    if (current.get("Meta") or {}).get(SPEC_META) == spec and not current.get("Stop"):
        return None  # registering again only updates its meta
    same = [job.get("Version", 0) for job in jobs
            if (job.get("Meta") or {}).get(SPEC_META) == spec and job is not current]
    return (max(same), current.get("Version", 0)) if same else None


def force_path(job_id: str) -> str:
    """`POST /v1/job/:id/periodic/force` (no body): Nomad launches the periodic job now."""
    return f"/v1/job/{quote(job_id, safe='')}/periodic/force"


def image_ref(launch: LaunchSpec) -> str | None:
    """The container image the `oci` builder produced (its reference names MCTL_IMAGE_REGISTRY
    when that is set), or None when workers run in a Python environment. An image that exists
    only on the control plane's host is refused: Nomad's nodes could not pull it."""
    if launch.runtime != "oci":
        return None
    if launch.image.startswith("localhost/"):
        raise InvalidError(
            f"Function {launch.function}'s image {launch.image} exists only on the control "
            "plane's host, where Nomad's nodes cannot pull it. Set MCTL_IMAGE_REGISTRY=host:port "
            "on the control plane so the image builder pushes images where the nodes pull.")
    return launch.image


class NomadScheduler:
    handles_schedules = True  # each schedule is a periodic job that Nomad fires
    updates_in_place = True   # a new version re-registers the same jobs; `update` rolls them
    provider = "nomad"

    def __init__(self, options: dict[str, Any]) -> None:
        render_options = {k: v for k, v in options.items() if k not in CONNECTION}
        self.render = NomadOptions.parse(render_options, extra=())
        self.conn = Connection.from_settings(options, self.render, set(render_options))
        self.render = self.render._with({"namespace": self.conn.namespace,
                                         "region": self.conn.region})
        self.timeout = _seconds(options, "request_timeout", 15)
        self.poll_interval = _seconds(options, "poll_interval", 2)
        # how long a sandbox's job may wait to be placed and started (plugins/sandbox_nomad)
        self.sandbox_start_timeout = _seconds(options, "sandbox_start_timeout", 300)
        self.api = NomadAPI(self.conn, self.timeout)
        self.pools: dict[str, NomadPool] = {}
        # job id -> the pool (function version) that registered it last: only that pool may
        # scale the job or deregister it, so an old version's removal leaves a job that a
        # newer version took over alone (and deregisters the jobs the newer one dropped).
        self.current: dict[str, str] = {}
        self.events: PoolEvents | None = None
        self._poller: asyncio.Task[None] | None = None

    def stream_logs(self, alloc_id: str, task: str = TASK, kind: str = "stdout",
                    follow: bool = False, tail_bytes: int = 0,
                    ns: str | None = None) -> AsyncIterator[bytes]:
        return self.api.stream_logs(alloc_id, task, kind, follow, tail_bytes, ns)

    # --- the backend ---------------------------------------------------------------------------
    async def start(self, events: PoolEvents) -> None:
        self.events = events
        try:  # fails the server's start, with what to set, when Nomad cannot be reached
            await self.api.leader()
        except NomadError:
            await self.shutdown()
            raise
        self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def ensure_pool(self, launch: LaunchSpec) -> None:
        """Register the version's jobs over the previous version's (same job IDs): Nomad keeps
        the running allocations until the `update` block has rolled them over. Core calls this
        before it removes the previous version's pool (`updates_in_place`)."""
        if launch.pool_id in self.pools:
            return
        if launch.spec is None:
            raise InvalidError("The nomad scheduler needs the function's spec in its launch "
                               "description; this mctl server is older than the backend.")
        jobs = render_function(launch, launch.spec, self.render, image_ref(launch),
                               version_from_variable=True)
        ids = tuple(doc["Job"]["ID"] for doc in jobs)
        ns = jobs[0]["Job"]["Namespace"]
        # Claim the jobs first: the previous version's removal must not deregister a job (or
        # delete its Variable) that this version registers.
        previous = {job_id: self.current.get(job_id) for job_id in ids}
        self.current.update(dict.fromkeys(ids, launch.pool_id))
        try:
            token = launch.env.get("MCTL_TASK_TOKEN")
            for job_id in ids:
                await self.api.put_variable(job_id, variable_body(
                    job_id, token, self.conn, launch.version, ns), ns)
            for doc in jobs:
                await self._submit(launch, doc)
            info = await self.api.job(ids[0], ns) or {}
        except BaseException:
            for job_id, before in previous.items():
                if self.current.get(job_id) != launch.pool_id:
                    continue
                if before is None:
                    del self.current[job_id]
                else:
                    self.current[job_id] = before
            raise
        groups = info.get("TaskGroups") or [{}]
        count = groups[0].get("Count", launch.spec.autoscaling.min_containers)
        self.pools[launch.pool_id] = NomadPool(launch, ids, ns, count,
                                               int(info.get("Version") or 0))
        log.info("Nomad job(s) %s at version %s for %s", ", ".join(ids), info.get("Version"),
                 launch.pool_id)

    async def _submit(self, launch: LaunchSpec, doc: dict[str, Any]) -> None:
        """Register the job, or, when an earlier job version ran this same function spec (a
        rollback, or a redeploy of an older app), revert to it: Nomad then runs that version
        again, as `nomad job revert` would. `mctl app rollback` activates every function of the
        version it returns to, so every job of the app is reverted."""
        job = doc["Job"]
        ns = job["Namespace"]
        try:
            versions = await self.api.versions(job["ID"], ns)
            target = revert_target(versions, job["Meta"][SPEC_META])
            if target is None:
                await self.api.register(job["ID"], register_body(doc, self.conn), ns)
            else:
                await self.api.revert(job["ID"], *target, ns)
                log.info("reverted Nomad job %s to version %s (app %s v%s)", job["ID"],
                         target[0], launch.app_name, launch.version)
        except NomadError as exc:  # Nomad's own reason, with the function it concerns
            raise NomadError(f"Function {launch.function} (job {job['ID']}): {exc}") from None

    async def scale(self, pool_id: str, count: int) -> None:
        pool = self.pools.get(pool_id)
        if pool is None or self.current.get(pool.job_ids[0]) != pool_id or count == pool.count:
            return
        await self.api.scale(pool.job_ids[0], scale_body(pool.job_ids[0], count, pool.launch),
                             pool.namespace)
        pool.count = count

    async def stop_worker(self, pool_id: str, worker_id: str, grace_s: float) -> None:
        """Nomad chooses which allocation a lower count stops (the highest index); a worker that
        is stopped while busy drains on SIGTERM within the job's kill_timeout."""
        pool = self.pools.get(pool_id)
        if pool is not None and pool.count > 0:
            await self.scale(pool_id, pool.count - 1)

    async def remove_pool(self, pool_id: str, grace_s: float) -> None:
        """Deregister the pool's jobs that no newer version took over: all of them when the app
        stops or drops the function; after a redeploy, only those the new version no longer
        has (a schedule it dropped: its periodic job)."""
        pool = self.pools.pop(pool_id, None)
        if pool is None:
            return
        for job_id in pool.job_ids:
            if self.current.get(job_id) != pool_id:
                continue  # a newer version registered this job over this one
            await self.api.deregister(job_id, pool.namespace)
            if self.current.get(job_id) != pool_id:
                continue  # claimed meanwhile: its new version wrote the Variable
            await self.api.delete_variable(job_id, pool.namespace)
            if self.current.get(job_id) == pool_id:
                del self.current[job_id]
            log.info("deregistered Nomad job %s (%s)", job_id, pool_id)

    async def list_workers(self, pool_id: str) -> list[WorkerInfo]:
        pool = self.pools.get(pool_id)
        return list(pool.workers.values()) if pool else []

    async def shutdown(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        await self.api.close()

    # --- allocations ---------------------------------------------------------------------------
    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            for pool_id, pool in list(self.pools.items()):
                if self.current.get(pool.job_ids[0]) != pool_id:
                    continue  # core drains an old version's workers itself
                try:
                    allocs = await self.api.allocations(pool.job_ids[0], pool.namespace)
                except NomadError as exc:
                    log.warning("listing allocations of %s: %s", pool.job_ids[0], exc)
                    continue
                for worker_id, code, detail in self._update(pool, allocs or []):
                    if detail:  # what the worker wrote before it died: into the app's logs
                        detail = await self._with_tail(worker_id, detail, pool.namespace)
                    if self.events is not None:
                        self.events.worker_exited(pool_id, worker_id, code, detail)

    async def _with_tail(self, worker_id: str, detail: str, ns: str) -> str:
        alloc_id = worker_id[len("ta-"):]
        tail = b""
        try:
            for kind in ("stdout", "stderr"):
                async for data in self.api.stream_logs(alloc_id, kind=kind,
                                                       tail_bytes=TAIL_BYTES, ns=ns):
                    tail += data
        except NomadError as exc:  # the node may be gone with its logs
            return f"{detail} (its log could not be read: {exc})"
        lines = tail.decode(errors="replace").splitlines()[-20:]
        return "\n".join([detail, *lines]) if lines else detail

    def _update(self, pool: NomadPool, allocs: list[dict[str, Any]]
                ) -> list[tuple[str, int | None, str]]:
        """Record this version's live allocations; return (task id, exit code, detail) of the
        workers that ended."""
        seen: dict[str, WorkerInfo] = {}
        ended: list[tuple[str, int | None, str]] = []
        for alloc in allocs:
            if alloc.get("JobVersion", pool.job_version) < pool.job_version:
                continue  # an older version's allocation, on its way out
            worker_id = f"ta-{alloc['ID']}"
            status = alloc.get("ClientStatus", "pending")
            if status in LIVE:
                state = "stopping" if alloc.get("DesiredStatus") == "stop" else (
                    "running" if status == "running" else "starting")
                seen[worker_id] = WorkerInfo(worker_id, alloc.get("NodeName", ""), state,
                                             f"allocation {alloc['ID']}")
            elif worker_id in pool.workers:
                ended.append((worker_id, *_exit(alloc)))
        pool.workers = seen
        return ended


def _seconds(options: dict[str, Any], key: str, default: float) -> float:
    try:
        value = float(options.get(key, default))
    except ValueError:
        value = -1.0
    if value <= 0:
        raise InvalidError(f"The nomad option {key}={options[key]!r} is not a positive number "
                           f"of seconds; write e.g. {key}={default:g}.")
    return value


def _exit(alloc: dict[str, Any]) -> tuple[int | None, str]:
    """The worker task's exit code and the reason Nomad gives, from the allocation's events."""
    state = (alloc.get("TaskStates") or {}).get("worker") or {}
    code, reason = None, ""
    for event in state.get("Events") or []:
        if event.get("ExitCode") is not None and event.get("Type") == "Terminated":
            code = event["ExitCode"]
        reason = event.get("DisplayMessage") or reason
    status = alloc.get("ClientStatus")
    return code, "" if status == "complete" and code == 0 else (
        f"Nomad allocation {alloc.get('ID')} ended {status}: {reason}".strip())


@mctl.hookimpl
def mctl_register_schedulers():
    yield Scheduler(name="nomad", factory=NomadScheduler)
