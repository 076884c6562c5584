"""Nomad backend: each function is a Nomad service job whose task group `workers` runs mctl's
worker runtime; core's autoscaler sets its count through Nomad's scale API.

The jobs are those `mctl nomad render` prints (`nomad_render`): one service job
`mctl-<app>-<function>` per function, re-registered for each new version (Nomad keeps the job's
versions and rolls allocations over with the `update` block), and a periodic batch job per
schedule, so Nomad fires schedules (`handles_schedules`). A worker's task id is
`ta-<allocation id>`. Its task token is written to the job's Nomad Variable
(`nomad/jobs/<job id>`), which only that job's tasks can read, never into the job itself.

This backend has been checked by contract only: every body it sends is checked against Nomad's
own API types by tools/nomad-jobcheck in the tests; it has not run against a live Nomad agent.

Connection settings, as Nomad's own CLI reads them: NOMAD_ADDR (default http://127.0.0.1:4646),
NOMAD_TOKEN, NOMAD_NAMESPACE, NOMAD_REGION, NOMAD_CACERT (and NOMAD_CLIENT_CERT/NOMAD_CLIENT_KEY),
or the options address, token_file, cacert. Other options: see `NomadOptions`, plus
request_timeout (seconds, default 15) and poll_interval (default 2).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import mctl
from mctl.core.plugin_types import Scheduler, WorkerInfo
from mctl.exception import InvalidError
from mctl.plugins.nomad_render import GROUP, SPEC_META, TASK, NomadOptions, render_function

if TYPE_CHECKING:
    from mctl.core.launch import LaunchSpec
    from mctl.core.plugin_types import PoolEvents

log = logging.getLogger("mctl.scheduler.nomad")
CONNECTION = ("address", "token_file", "cacert", "request_timeout", "poll_interval")
LIVE = {"pending", "running"}
TAIL_BYTES = 4096  # of a failed worker's stdout and stderr, into the app's logs


class NomadError(InvalidError):
    """Nomad refused a request or could not be reached; the message says what to set."""


@dataclass
class NomadPool:
    launch: LaunchSpec
    job_ids: tuple[str, ...]      # the service job, then the periodic job if any
    count: int = 0
    job_version: int = 0          # the Nomad job version this pool registered
    workers: dict[str, WorkerInfo] = field(default_factory=dict)  # task id -> last seen


@dataclass(frozen=True)
class Connection:
    address: str
    token: str | None
    namespace: str
    region: str
    cacert: str | None
    client_cert: str | None = None
    client_key: str | None = None

    @classmethod
    def from_settings(cls, options: dict[str, Any], render: NomadOptions,
                      explicit: set[str]) -> Connection:
        token = os.environ.get("NOMAD_TOKEN") or None
        if options.get("token_file"):
            with open(options["token_file"]) as fh:
                token = fh.read().strip()
        return cls(
            address=(options.get("address") or os.environ.get("NOMAD_ADDR")
                     or "http://127.0.0.1:4646").rstrip("/"),
            token=token,
            namespace=render.namespace if "namespace" in explicit
            else os.environ.get("NOMAD_NAMESPACE") or render.namespace,
            region=render.region if "region" in explicit
            else os.environ.get("NOMAD_REGION") or render.region,
            cacert=options.get("cacert") or os.environ.get("NOMAD_CACERT") or None,
            client_cert=os.environ.get("NOMAD_CLIENT_CERT") or None,
            client_key=os.environ.get("NOMAD_CLIENT_KEY") or None)


# --- request bodies (the tests pass each through tools/nomad-jobcheck) --------------------------
def register_body(job: dict[str, Any], conn: Connection) -> dict[str, Any]:
    """`PUT /v1/jobs`: an `api.JobRegisterRequest`."""
    return {**job, "Namespace": conn.namespace, "Region": conn.region}


def scale_body(job_id: str, count: int, launch: LaunchSpec) -> dict[str, Any]:
    """`POST /v1/job/:id/scale`: an `api.ScalingRequest`."""
    return {"Count": count, "Target": {"Job": job_id, "Group": GROUP},
            "Message": f"mctl autoscaler: {launch.function} v{launch.version} to {count}",
            "Meta": {"mctl.pool": launch.pool_id}}


def variable_body(job_id: str, task_token: str | None, conn: Connection,
                  app_version: int = 0) -> dict[str, Any]:
    """`PUT /v1/var/nomad/jobs/:id`: an `api.Variable` the job's own tasks may read: the task
    token and the app version their workers serve (neither is in the job itself)."""
    items = {"app_version": str(app_version)}
    if task_token:
        items["task_token"] = task_token
    return {"Namespace": conn.namespace, "Path": f"nomad/jobs/{job_id}", "Items": items}


def revert_body(job_id: str, version: int, prior: int, conn: Connection) -> dict[str, Any]:
    """`PUT /v1/job/:id/revert`: an `api.JobRevertRequest`. EnforcePriorVersion makes Nomad
    refuse the revert if someone changed the job since the backend read its versions."""
    return {"JobID": job_id, "JobVersion": version, "EnforcePriorVersion": prior,
            "Namespace": conn.namespace, "Region": conn.region}


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
    """`PUT /v1/job/:id/periodic/force` (no body): Nomad launches the periodic job now."""
    return f"/v1/job/{quote(job_id, safe='')}/periodic/force"


def logs_request(alloc_id: str, task: str = TASK, kind: str = "stdout", follow: bool = False,
                 tail_bytes: int = 0) -> tuple[str, dict[str, str]]:
    """`GET /v1/client/fs/logs/:alloc_id`: a stream of `api.StreamFrame` objects, from
    `tail_bytes` before the end of the task's log (`origin=end`); `follow` keeps it open."""
    if kind not in ("stdout", "stderr"):
        raise InvalidError(f"Log type {kind!r} is not stdout or stderr.")
    return (f"/v1/client/fs/logs/{quote(alloc_id, safe='')}",
            {"task": task, "type": kind, "follow": "true" if follow else "false",
             "origin": "end", "offset": str(max(0, tail_bytes)), "plain": "false"})


class FrameDecoder:
    """Nomad's log stream: JSON `StreamFrame` objects one after another (`{}` heartbeats
    between), each `Data` base64; `feed` returns the log bytes of the frames complete so far."""

    def __init__(self) -> None:
        import codecs
        import json

        self._text = ""
        self._json = json.JSONDecoder()
        self._utf8 = codecs.getincrementaldecoder("utf-8")()  # a chunk may cut a character

    def feed(self, chunk: bytes) -> list[bytes]:
        import base64

        self._text += self._utf8.decode(chunk)
        out = []
        while True:
            text = self._text.lstrip()
            if not text:
                self._text = ""
                return out
            try:
                frame, end = self._json.raw_decode(text)
            except ValueError:  # an incomplete frame: wait for more
                self._text = text
                return out
            self._text = text[end:]
            if isinstance(frame, dict) and frame.get("Data"):
                out.append(base64.b64decode(frame["Data"]))


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
    provider = "nomad"

    def __init__(self, options: dict[str, Any]) -> None:
        render_options = {k: v for k, v in options.items() if k not in CONNECTION}
        self.render = NomadOptions.parse(render_options, extra=())
        self.conn = Connection.from_settings(options, self.render, set(render_options))
        self.render = self.render._with({"namespace": self.conn.namespace,
                                         "region": self.conn.region})
        self.timeout = float(options.get("request_timeout", 15))
        self.poll_interval = float(options.get("poll_interval", 2))
        self.pools: dict[str, NomadPool] = {}
        self.current: dict[str, str] = {}  # job id -> the pool (function version) it runs
        self.events: PoolEvents | None = None
        self._session: Any = None
        self._poller: asyncio.Task[None] | None = None

    # --- HTTP ----------------------------------------------------------------------------------
    async def _http(self) -> Any:
        if self._session is None:
            import aiohttp

            ssl_context: Any = None
            if self.conn.cacert or self.conn.client_cert:
                import ssl

                ssl_context = ssl.create_default_context(cafile=self.conn.cacert)
                if self.conn.client_cert:
                    ssl_context.load_cert_chain(self.conn.client_cert, self.conn.client_key)
            headers = {"X-Nomad-Token": self.conn.token} if self.conn.token else {}
            self._session = aiohttp.ClientSession(
                headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(ssl=ssl_context) if ssl_context else None)
        return self._session

    async def request(self, method: str, path: str, body: Any = None,
                      params: dict[str, str] | None = None, missing_ok: bool = False) -> Any:
        """One call to Nomad's HTTP API; its JSON answer, or a NomadError that says what to do.
        `missing_ok`: a 404 answers None."""
        import aiohttp

        session = await self._http()
        query = {"namespace": self.conn.namespace, "region": self.conn.region, **(params or {})}
        url = f"{self.conn.address}{path}"
        try:
            async with session.request(method, url, json=body, params=query) as resp:
                text = await resp.text()
                if resp.status == 404 and missing_ok:
                    return None
                if resp.status == 403:
                    raise NomadError(self._denied(method, path, text))
                if resp.status >= 400:
                    raise NomadError(f"Nomad answered {resp.status} to {method} {path}: "
                                     f"{text.strip()[:500]}")
                return await resp.json(content_type=None) if text.strip() else None
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as exc:
            raise self._unreachable(exc) from None

    async def stream_logs(self, alloc_id: str, task: str = TASK, kind: str = "stdout",
                          follow: bool = False, tail_bytes: int = 0) -> AsyncIterator[bytes]:
        """The task's log through Nomad's client fs API (the agent forwards it from the node):
        its last `tail_bytes`, then, with `follow`, what it writes until the allocation ends."""
        import aiohttp

        path, params = logs_request(alloc_id, task, kind, follow, tail_bytes)
        session = await self._http()
        query = {"namespace": self.conn.namespace, "region": self.conn.region, **params}
        frames = FrameDecoder()
        no_limit = aiohttp.ClientTimeout(total=None, connect=self.timeout)
        try:
            async with session.get(f"{self.conn.address}{path}", params=query,
                                   timeout=no_limit if follow else session.timeout) as resp:
                if resp.status >= 400:
                    text = await resp.text()
                    raise NomadError(self._denied("GET", path, text) if resp.status == 403 else
                                     f"Nomad answered {resp.status} to GET {path}: "
                                     f"{text.strip()[:500]}")
                async for chunk in resp.content.iter_any():
                    for data in frames.feed(chunk):
                        yield data
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: BaseException) -> NomadError:
        reason = (getattr(exc, "strerror", None) or str(exc) or "no answer within "
                  f"{self.timeout:g}s").lower()
        return NomadError(
            f"Nomad is unreachable at {self.conn.address} ({reason}). Set NOMAD_ADDR (or the "
            "nomad option address=URL) to a Nomad agent's HTTP address, e.g. "
            "http://nomad.service.consul:4646.")

    def _denied(self, method: str, path: str, text: str) -> str:
        if not self.conn.token:
            return (f"Nomad refused {method} {path}: permission denied, and no ACL token was "
                    "sent. Set NOMAD_TOKEN (or --scheduler-option token_file=PATH) to a token "
                    f"allowed to submit, scale and read jobs in namespace {self.conn.namespace}.")
        return (f"Nomad refused {method} {path}: permission denied ({text.strip()[:200]}). The "
                f"token in NOMAD_TOKEN needs the submit-job, scale-job, read-job and "
                f"variables write capabilities in namespace {self.conn.namespace}.")

    # --- the backend ---------------------------------------------------------------------------
    async def start(self, events: PoolEvents) -> None:
        self.events = events
        try:  # fails the server's start, with what to set, when Nomad cannot be reached
            await self.request("GET", "/v1/status/leader")
        except NomadError:
            await self.shutdown()
            raise
        self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def ensure_pool(self, launch: LaunchSpec) -> None:
        if launch.pool_id in self.pools:
            return
        if launch.spec is None:
            raise InvalidError("The nomad scheduler needs the function's spec in its launch "
                               "description; this mctl server is older than the backend.")
        jobs = render_function(launch, launch.spec, self.render, image_ref(launch),
                               version_from_variable=True)
        ids = tuple(doc["Job"]["ID"] for doc in jobs)
        # Claim the job first: core removes the previous version's pool while this one is being
        # prepared, and that removal must not deregister the job or delete its Variable now.
        previous = self.current.get(ids[0])
        self.current[ids[0]] = launch.pool_id
        try:
            token = launch.env.get("MCTL_TASK_TOKEN")
            for job_id in ids:
                await self.request("PUT", f"/v1/var/nomad/jobs/{job_id}",
                                   variable_body(job_id, token, self.conn, launch.version))
            for doc in jobs:
                await self._submit(launch, doc)
            info = await self.request("GET", f"/v1/job/{ids[0]}") or {}
        except BaseException:
            if self.current.get(ids[0]) == launch.pool_id:
                if previous is None:
                    del self.current[ids[0]]
                else:
                    self.current[ids[0]] = previous
            raise
        groups = info.get("TaskGroups") or [{}]
        count = groups[0].get("Count", launch.spec.autoscaling.min_containers)
        self.pools[launch.pool_id] = NomadPool(launch, ids, count, int(info.get("Version") or 0))
        log.info("Nomad job(s) %s at version %s for %s", ", ".join(ids), info.get("Version"),
                 launch.pool_id)

    async def _submit(self, launch: LaunchSpec, doc: dict[str, Any]) -> None:
        """Register the job, or, when an earlier job version ran this same function spec (a
        rollback, or a redeploy of an older app), revert to it: Nomad then runs that version
        again, as `nomad job revert` would. `mctl app rollback` activates every function of the
        version it returns to, so every job of the app is reverted."""
        job = doc["Job"]
        try:
            versions = await self.request("GET", f"/v1/job/{job['ID']}/versions", missing_ok=True)
            target = revert_target(versions, job["Meta"][SPEC_META])
            if target is None:
                await self.request("PUT", "/v1/jobs", register_body(doc, self.conn))
            else:
                await self.request("PUT", f"/v1/job/{job['ID']}/revert",
                                   revert_body(job["ID"], *target, self.conn))
                log.info("reverted Nomad job %s to version %s (app %s v%s)", job["ID"],
                         target[0], launch.app_name, launch.version)
        except NomadError as exc:  # Nomad's own reason, with the function it concerns
            raise NomadError(f"Function {launch.function} (job {job['ID']}): {exc}") from None

    async def scale(self, pool_id: str, count: int) -> None:
        pool = self.pools.get(pool_id)
        if pool is None or self.current.get(pool.job_ids[0]) != pool_id or count == pool.count:
            return
        await self.request("POST", f"/v1/job/{pool.job_ids[0]}/scale",
                           scale_body(pool.job_ids[0], count, pool.launch))
        pool.count = count

    async def stop_worker(self, pool_id: str, worker_id: str, grace_s: float) -> None:
        """Nomad chooses which allocation a lower count stops (the highest index); a worker that
        is stopped while busy drains on SIGTERM within the job's kill_timeout."""
        pool = self.pools.get(pool_id)
        if pool is not None and pool.count > 0:
            await self.scale(pool_id, pool.count - 1)

    async def remove_pool(self, pool_id: str, grace_s: float) -> None:
        pool = self.pools.pop(pool_id, None)
        if pool is None:
            return
        service = pool.job_ids[0]
        for job_id in pool.job_ids:
            # A newer version of the function (a redeploy, a rollback) may claim the job while
            # this runs: it then keeps the job and its Variable.
            for path in (f"/v1/job/{job_id}", f"/v1/var/nomad/jobs/{job_id}"):
                if self.current.get(service) != pool_id:
                    return
                await self.request("DELETE", path)
        if self.current.get(service) == pool_id:
            del self.current[service]

    async def list_workers(self, pool_id: str) -> list[WorkerInfo]:
        pool = self.pools.get(pool_id)
        return list(pool.workers.values()) if pool else []

    async def shutdown(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if self._session is not None:
            await self._session.close()

    # --- allocations ---------------------------------------------------------------------------
    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            for pool_id, pool in list(self.pools.items()):
                if self.current.get(pool.job_ids[0]) != pool_id:
                    continue  # core drains an old version's workers itself
                try:
                    allocs = await self.request("GET", f"/v1/job/{pool.job_ids[0]}/allocations")
                except NomadError as exc:
                    log.warning("listing allocations of %s: %s", pool.job_ids[0], exc)
                    continue
                for worker_id, code, detail in self._update(pool, allocs or []):
                    if detail:  # what the worker wrote before it died: into the app's logs
                        detail = await self._with_tail(worker_id, detail)
                    if self.events is not None:
                        self.events.worker_exited(pool_id, worker_id, code, detail)

    async def _with_tail(self, worker_id: str, detail: str) -> str:
        alloc_id = worker_id[len("ta-"):]
        tail = b""
        try:
            for kind in ("stdout", "stderr"):
                async for data in self.stream_logs(alloc_id, kind=kind, tail_bytes=TAIL_BYTES):
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
