"""Slurm backend: each worker is one Slurm batch job running mctl's worker runtime.

Core decides how many workers a pool needs; this backend submits (`sbatch --parsable`), watches
(`squeue`, `scontrol show job`) and cancels (`scancel`) jobs. A job is named `mctl-<app>-<function>`
and carries a comment naming app, version, function and task, so `squeue` reads well to a Slurm
admin. The comment also names the pool and the control plane (a hash of the address workers call
back to): a control plane restarted after a crash adopts its jobs that still run instead of
submitting new ones (a graceful stop cancels them). GPUs become GRES requests (`gpu="A100:2"` -> `--gres=gpu:a100:2`), with a configurable map
from Modal's GPU names to the cluster's GRES types.

Options (`mctl server --scheduler slurm --scheduler-option KEY=VALUE`):
  partition, account, qos, time_limit (sbatch --time, e.g. 1-00:00:00), gpu_map (e.g.
  "A100=a100,H100=h100"), output_dir (job output files; default <state>/slurm-jobs),
  command_timeout (seconds for each Slurm command, default 20), poll_interval (default 1),
  api (cli, the default: sbatch/squeue/scancel with the environment's SLURM_CONF; or rest:
  slurmrestd, see `slurm_rest`), restd_url, restd_user.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mctl
from mctl.core import ids
from mctl.core.plugin_types import PlacementError, Scheduler, WorkerInfo, check_options
from mctl.core.worker_output import OutputTail
from mctl.exception import InvalidError
from mctl.plugins.slurm_rest import parse_gres

if TYPE_CHECKING:
    from mctl.core.launch import LaunchSpec
    from mctl.core.plugin_types import PoolEvents

log = logging.getLogger("mctl.scheduler.slurm")

# Slurm job states after which the job no longer runs.
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
            "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class SlurmError(InvalidError):
    """A Slurm command failed; the message has Slurm's own words."""


@dataclass
class Job:
    task_id: str
    job_id: str
    stopping: bool = False
    node: str = ""
    state: str = "PENDING"


def server_env_without_credentials() -> dict[str, str]:
    """The server's environment for a job it submits, without the server's rights: a worker
    acts with its task token (not MCTL_TOKEN), and gets neither the server's Slurm token nor
    its Vault credentials."""
    env = dict(os.environ)
    for key in ("MCTL_TOKEN", "SLURM_JWT", "VAULT_TOKEN", "VAULT_ROLE_ID", "VAULT_SECRET_ID"):
        env.pop(key, None)
    return env


@dataclass
class SlurmPool:
    launch: LaunchSpec
    jobs: dict[str, Job] = field(default_factory=dict)  # task id -> job


class SlurmScheduler:
    handles_schedules = False
    provider = "slurm"
    OPTIONS = ("partition", "account", "qos", "time_limit", "gpu_map", "output_dir",
               "command_timeout", "poll_interval", "region", "api", "restd_url", "restd_user")

    def __init__(self, options: dict[str, Any]) -> None:
        check_options("slurm", options, self.OPTIONS)
        self.options = options
        self.timeout = float(options.get("command_timeout", 20))
        self.poll_interval = float(options.get("poll_interval", 1))
        self.gpu_map = _parse_gpu_map(options.get("gpu_map", ""))
        self.output_dir = Path(options.get("output_dir") or
                               Path(tempfile.gettempdir()) / "mctl-slurm-jobs")
        self.pools: dict[str, SlurmPool] = {}
        self.events: PoolEvents | None = None
        api = options.get("api", "cli")
        if api not in ("cli", "rest"):
            raise InvalidError(f"api={api!r}: choose cli (sbatch, squeue, scancel) or rest "
                               "(slurmrestd).")
        self.rest = None
        if api == "rest":
            from mctl.plugins.slurm_rest import SlurmRest

            self.rest = SlurmRest(options, self.timeout)
        self._poller: asyncio.Task[None] | None = None
        # pool id -> jobs found running at start (a crashed control plane's), until adopted
        self.found: dict[str, list[tuple[Job, str]]] = {}
        self._nodes: list[dict[str, Any]] | None = None

    # --- Slurm commands ------------------------------------------------------------------------
    async def _run(self, *cmd: str, env: dict[str, str] | None = None) -> str:
        """Run a Slurm client command with a timeout (a client facing a dead controller retries
        for minutes); Slurm's own error text on failure."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env)
        except FileNotFoundError:
            raise SlurmError(f"`{cmd[0]}` is not installed here; install Slurm's client commands "
                             "(Debian: slurm-client) on the control plane's machine.") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise SlurmError(f"Slurm is unreachable: `{' '.join(cmd[:2])}` did not answer within "
                             f"{self.timeout:g}s. Check that slurmctld runs and SLURM_CONF "
                             f"({os.environ.get('SLURM_CONF', 'default /etc/slurm/slurm.conf')}) "
                             "points at it.") from None
        if proc.returncode != 0:
            raise SlurmError(f"`{' '.join(cmd[:2])}` failed: "
                             f"{err.decode(errors='replace').strip() or out.decode().strip()}")
        return out.decode(errors="replace")

    async def nodes(self) -> list[dict[str, Any]]:
        """Each node's name, CPUs, memory (MiB) and GPUs as {type: count}."""
        if self._nodes is None and self.rest is not None:
            self._nodes = await self.rest.nodes()
        elif self._nodes is None:
            text = await self._run("scontrol", "show", "nodes", "--oneliner")
            self._nodes = [_parse_node(line) for line in text.splitlines() if line.strip()]
        return self._nodes

    # --- the backend ---------------------------------------------------------------------------
    async def start(self, events: PoolEvents) -> None:
        self.events = events
        try:
            await self.nodes()  # fails the server's start with Slurm's reason when unreachable
        except InvalidError as exc:
            if self.rest is None:
                raise
            await self.rest.close()
            if "SLURM_JWT" in str(exc) or "unreachable" in str(exc):
                raise
            raise InvalidError(f"{exc}. Check that SLURM_JWT is a valid, unexpired token for "
                               f"{self.rest.user} (`scontrol token` makes one).") from None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.found = await self._jobs_still_running()
        except InvalidError as exc:
            log.warning("could not list running jobs to adopt: %s", exc)
        self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def ensure_pool(self, launch: LaunchSpec) -> None:
        if launch.pool_id in self.pools:
            return
        launch, problem = place_gpu_choice(launch, await self.nodes(), self.gres_type)
        if not problem and launch.mounts and launch.runtime != "oci":
            from mctl.core import mount_namespace

            if mount_namespace.problem():
                problem = f"{launch.function} mounts volumes, but a job {mount_namespace.problem()}"
        if problem and launch.gpu is not None:
            from mctl.core.spec import unknown_gpu

            unknown = unknown_gpu(launch.gpu.type, tuple(self.gpu_map))
            problem += f" ({unknown})" if unknown else ""
        if problem:
            raise PlacementError(problem)
        pool = self.pools[launch.pool_id] = SlurmPool(launch)
        mark = control_plane_mark(launch)
        for job, cp in self.found.pop(launch.pool_id, ()):
            if cp == mark:  # its worker calls back to this control plane: it is ours
                pool.jobs[job.task_id] = job
                log.info("adopted job %s (%s, %s) of %s, still %s", job.job_id, job.task_id,
                         job.node or "no node yet", launch.pool_id, job.state.lower())

    async def _jobs_still_running(self) -> dict[str, list[tuple[Job, str]]]:
        """mctl's jobs that have not ended, by pool, with the control-plane mark they carry."""
        if self.rest is not None:
            rows = await self.rest.running_jobs()
        else:
            text = await self._run("squeue", "-h", "-o", "%i|%T|%N|%k")
            rows = [tuple(line.split("|", 3)) for line in text.splitlines() if line.count("|") >= 3]
        found: dict[str, list[tuple[Job, str]]] = {}
        for job_id, state, node, comment in rows:
            fields = dict(part.split("=", 1) for part in comment.split() if "=" in part)
            if (not comment.startswith("mctl ") or state in FINISHED
                    or not {"task", "pool", "cp"} <= fields.keys()):
                continue
            job = Job(fields["task"], job_id, node=node, state=state)
            found.setdefault(fields["pool"], []).append((job, fields["cp"]))
        return found

    async def scale(self, pool_id: str, count: int) -> None:
        pool = self.pools.get(pool_id)
        if pool is None:
            return
        live = [j for j in pool.jobs.values() if not j.stopping]
        for _ in range(count - len(live)):
            await self._submit(pool)
        for job in reversed(live[count:]):  # newest first
            await self._cancel(job, grace_s=pool.launch.timeout_s + 5)

    async def stop_worker(self, pool_id: str, worker_id: str, grace_s: float) -> None:
        pool = self.pools.get(pool_id)
        job = pool.jobs.get(worker_id) if pool else None
        if job is not None:
            await self._cancel(job, grace_s)

    async def remove_pool(self, pool_id: str, grace_s: float) -> None:
        pool = self.pools.pop(pool_id, None)
        for job in list(pool.jobs.values()) if pool else ():
            await self._cancel(job, grace_s)

    async def list_workers(self, pool_id: str) -> list[WorkerInfo]:
        pool = self.pools.get(pool_id)
        return [WorkerInfo(j.task_id, j.node, "stopping" if j.stopping else j.state.lower(),
                           f"job {j.job_id}") for j in (pool.jobs.values() if pool else ())]

    async def shutdown(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        ids_ = [j.job_id for p in self.pools.values() for j in p.jobs.values()]
        if ids_:  # workers of a stopped control plane would wait for it in vain
            try:
                if self.rest is not None:
                    for job_id in ids_:
                        await self.rest.signal(job_id)
                else:
                    await self._run("scancel", *ids_)
            except InvalidError as exc:
                log.warning("could not cancel jobs at shutdown: %s", exc)
        if self.rest is not None:
            await self.rest.close()

    # --- jobs ----------------------------------------------------------------------------------
    def gres_type(self, launch: LaunchSpec) -> str | None:
        if launch.gpu is None or launch.gpu.type is None:
            return None
        return self.gpu_map.get(launch.gpu.type.upper(), launch.gpu.type.lower())

    def job_script(self, launch: LaunchSpec, task_id: str) -> str:
        """The batch script a worker runs as; `mctl slurm render` prints it (no secrets in it)."""
        opts = self.options
        lines = ["#!/bin/sh", f"#SBATCH --job-name={launch.job_name}",
                 f'#SBATCH --comment="{job_comment(launch, task_id)}"',
                 f"#SBATCH --output={self.output_dir}/%j.out", "#SBATCH --ntasks=1",
                 "#SBATCH --no-requeue",  # core replaces lost workers; Slurm must not rerun one
                 f"#SBATCH --cpus-per-task={max(1, round(launch.cpu or 1))}"]
        if launch.memory_limit_mb or launch.memory_mb:  # Slurm's --mem is also the limit
            lines.append(f"#SBATCH --mem={launch.memory_limit_mb or launch.memory_mb}M")
        if launch.gpu is not None:
            gres = self.gres_type(launch)
            lines.append(f"#SBATCH --gres=gpu:{gres + ':' if gres else ''}{launch.gpu.count}")
        for key, flag in (("partition", "partition"), ("account", "account"), ("qos", "qos"),
                          ("time_limit", "time")):
            if opts.get(key):
                lines.append(f"#SBATCH --{flag}={opts[key]}")
        from mctl.core.volume_sync import sources

        copies = sources(launch.mounts, task_id)
        if copies:  # working copies (the store driver), on the node's own disk
            lines.append("mkdir -p " + " ".join(shlex.quote(d) for d in copies.values()))
        if launch.runtime != "oci":
            # Volumes at their mount paths, as on the local backend: a working copy on the node
            # (store), or a directory every node mounts (shared-path), bound in the job's
            # namespace.
            from mctl.core.mount_namespace import wrap

            argv = wrap(launch.command, launch.mounts, task_id)
            lines.append("exec " + " ".join(shlex.quote(part) for part in argv))
            return "\n".join(lines) + "\n"
        # In its image, with podman on the node. Slurm signals this shell; podman's container
        # lives under conmon, which Slurm's linuxproc tracking does not follow, so the shell
        # stops the container itself (TERM drains the worker) and removes it on the way out.
        from mctl.plugins.containers import container_name, run_argv

        name = container_name(task_id)
        argv, _ = run_argv(launch, task_id)
        if launch.gpu is not None:
            # The job's GRES decides (SLURM_JOB_GPUS): not the control plane's own
            # MCTL_GPU_DEVICES (its local GPUs), which --export=ALL brings along
            lines.append("unset MCTL_GPU_DEVICES SLURM_STEP_GPUS")
        lines += [f"trap 'podman stop --time {int(launch.timeout_s) + 5} {name} >/dev/null' TERM",
                  f"trap 'podman rm --force --ignore {name} >/dev/null 2>&1' EXIT",
                  " ".join(shlex.quote(part) for part in argv) + " &",
                  "pid=$!", "wait $pid; code=$?",
                  # interrupted by the TERM trap: wait again for the worker's own exit code
                  'if kill -0 $pid 2>/dev/null; then wait $pid; code=$?; fi', "exit $code"]
        return "\n".join(lines) + "\n"

    def worker_env(self, launch: LaunchSpec, task_id: str) -> dict[str, str]:
        """The job's environment: the server's, without its credentials, plus the worker's."""
        env = server_env_without_credentials()
        if launch.runtime == "oci":
            from mctl.plugins.containers import run_argv

            env.update(run_argv(launch, task_id)[1])  # podman passes these into the container
        else:
            env.update(launch.worker_env(task_id))
        return env

    async def _submit(self, pool: SlurmPool) -> None:
        launch = pool.launch
        task_id = ids.new_id("task")
        env = self.worker_env(launch, task_id)
        if self.rest is not None:
            job_id = await self.rest.submit(self.rest_job(launch, task_id, env),
                                            self.job_script(launch, task_id))
            pool.jobs[task_id] = Job(task_id, job_id)
            log.info("submitted job %s for %s (%s) through slurmrestd", job_id, launch.pool_id,
                     task_id)
            return
        job_id = (await self._run("sbatch", "--parsable", "--export=ALL",
                                  input_script(self.output_dir, task_id,
                                               self.job_script(launch, task_id)),
                                  env=env)).strip().split(";")[0]
        pool.jobs[task_id] = Job(task_id, job_id)
        log.info("submitted job %s for %s (%s)", job_id, launch.pool_id, task_id)

    async def _cancel(self, job: Job, grace_s: float) -> None:
        if job.stopping:
            return
        job.stopping = True
        try:  # TERM to the worker: it drains (running inputs finish, @exit runs) and exits
            if self.rest is not None:
                await self.rest.signal(job.job_id, "SIGTERM")
            else:
                await self._run("scancel", "--batch", "--signal=TERM", job.job_id)
        except InvalidError:
            pass  # pending jobs have no batch step to signal: cancelled below

        async def later() -> None:
            await asyncio.sleep(0 if job.state == "PENDING" else grace_s)
            if job.state not in FINISHED:
                try:
                    if self.rest is not None:
                        await self.rest.signal(job.job_id)
                    else:
                        await self._run("scancel", job.job_id)
                except InvalidError as exc:
                    log.warning("scancel %s: %s", job.job_id, exc)

        asyncio.get_running_loop().create_task(later())

    async def _poll(self) -> None:
        """Watch our jobs: where they run, and when they end (reported to core)."""
        while True:
            await asyncio.sleep(self.poll_interval)
            jobs = {j.job_id: (pid, j) for pid, p in self.pools.items() for j in p.jobs.values()}
            if not jobs:
                continue
            if self.rest is not None:
                await self._poll_rest(jobs)
                continue
            try:
                text = await self._run("squeue", "-h", "-o", "%i %T %N", "-j", ",".join(jobs))
            except SlurmError as exc:
                if "Invalid job id" not in str(exc):
                    log.warning("squeue failed: %s", exc)
                    continue
                text = ""
            seen = set()
            for line in text.splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0] in jobs:
                    job = jobs[parts[0]][1]
                    job.state, job.node = parts[1], parts[2] if len(parts) > 2 else ""
                    if job.state not in FINISHED:
                        seen.add(parts[0])
            for job_id, (pid, job) in jobs.items():
                if job_id not in seen:
                    await self._finished(pid, job)

    async def _poll_rest(self, jobs: dict[str, tuple[str, Job]]) -> None:
        assert self.rest is not None
        try:
            states = await self.rest.states(list(jobs))
        except InvalidError as exc:
            log.warning("slurmrestd jobs: %s", exc)
            return
        for job_id, (pid, job) in jobs.items():
            state, node, code = states.get(job_id, ("COMPLETED", "", None))
            job.state, job.node = state, node or job.node
            if state in FINISHED:
                await self._finished(pid, job, known=(state, code))

    def rest_job(self, launch: LaunchSpec, task_id: str, env: dict[str, str]) -> dict[str, Any]:
        """The job properties of `job_script`, as slurmrestd takes them."""
        job: dict[str, Any] = {
            "name": launch.job_name, "requeue": False, "tasks": 1,
            "comment": job_comment(launch, task_id),
            "standard_output": f"{self.output_dir}/%j.out",
            "current_working_directory": str(self.output_dir),
            "cpus_per_task": max(1, round(launch.cpu or 1)), "environment": env}
        if launch.memory_limit_mb or launch.memory_mb:
            job["memory_per_node"] = launch.memory_limit_mb or launch.memory_mb
        if launch.gpu is not None:
            gres = self.gres_type(launch)
            job["gres"] = f"gpu:{gres + ':' if gres else ''}{launch.gpu.count}"
        for key in ("partition", "account", "qos"):
            if self.options.get(key):
                job[key] = self.options[key]
        return job

    async def _finished(self, pool_id: str, job: Job,
                        known: tuple[str, int | None] | None = None) -> None:
        code: int | None = None
        if known is not None:
            job.state, code = known[0], known[1]
        else:
            code = await self._exit_code(job)
        pool = self.pools.get(pool_id)
        if pool is not None:
            pool.jobs.pop(job.task_id, None)
        if self.events is not None:
            clean = job.stopping or (code == 0 and job.state == "COMPLETED")
            # The job's output file: the end of what the worker printed (all of it reaches the
            # app's logs, also what it could not send before a signal killed it).
            output = OutputTail(job.task_id)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(output.add_file, self.output_dir / f"{job.job_id}.out")
            if job.state == "OUT_OF_MEMORY":
                output.oom = True
            if code is not None and 128 < code < 128 + 65 and pool is not None \
                    and pool.launch.runtime == "oci":
                code = 128 - code  # podman's 128+N: the container's process died of signal N
            detail = "" if clean else f"Slurm job {job.job_id} ended {job.state}.\n" + output.text()
            self.events.worker_exited(pool_id, job.task_id, code, detail, output=output)

    async def _exit_code(self, job: Job) -> int | None:
        """The job's exit code from `scontrol show job` (sets its final state too)."""
        code: int | None = None
        try:
            info = await self._run("scontrol", "show", "job", job.job_id, "--oneliner")
            match = re.search(r"ExitCode=(\d+):(\d+)", info)
            state = re.search(r"JobState=(\S+)", info)
            if match:
                code = int(match.group(1)) or (-int(match.group(2)) if int(match.group(2)) else 0)
            job.state = state.group(1) if state else "COMPLETED"
        except SlurmError:
            job.state = "COMPLETED"  # aged out of slurmctld's memory
        return code


def control_plane_mark(launch: LaunchSpec) -> str:
    """Which control plane a job's worker calls back to (a hash of that address)."""
    import hashlib

    url = launch.env.get("MCTL_SERVER_URL", "")
    return hashlib.sha256(url.encode()).hexdigest()[:12]


def job_comment(launch: LaunchSpec, task_id: str) -> str:
    """What `squeue -o %k` shows: app, version, function and task for an admin; pool and
    control-plane mark so a restarted control plane finds its jobs."""
    return (f"mctl app={launch.app_name} version={launch.version} function={launch.function} "
            f"task={task_id} pool={launch.pool_id} cp={control_plane_mark(launch)}")


def input_script(directory: Path, task_id: str, text: str) -> str:
    """Write the batch script to a file sbatch reads (kept beside the job's output)."""
    path = directory / f"{task_id}.sbatch"
    path.write_text(text)
    return str(path)


def place_gpu_choice(launch: LaunchSpec, nodes: list[dict[str, Any]],
                     gres_type: Any) -> tuple[LaunchSpec, str]:
    """`gpu=["H100", "A100"]`: the launch with the first GPU choice some node can offer, and ''
    (or the launch as given and why the first choice cannot be placed)."""
    problem = _unplaceable(launch, nodes, gres_type(launch))
    for fallback in launch.gpu_fallbacks if problem else ():
        choice = dataclasses.replace(launch, gpu=fallback, gpu_fallbacks=())
        if not _unplaceable(choice, nodes, gres_type(choice)):
            log.info("%s: no node has %s; using the fallback %s", launch.function,
                     launch.gpu, fallback)
            return choice, ""
    return launch, problem


def _parse_gpu_map(text: str) -> dict[str, str]:
    out = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        name, sep, gres = pair.partition("=")
        if not sep:
            raise InvalidError(f"gpu_map entry {pair!r} is not NAME=GRES_TYPE, e.g. A100=a100.")
        out[name.strip().upper()] = gres.strip()
    return out


def _parse_node(line: str) -> dict[str, Any]:
    fields = dict(re.findall(r"(\w+)=(\S*)", line))
    return {"name": fields.get("NodeName", "?"), "cpus": int(fields.get("CPUTot", 0) or 0),
            "memory_mb": int(fields.get("RealMemory", 0) or 0),
            "gpus": parse_gres(fields.get("Gres", ""))}


def _unplaceable(launch: LaunchSpec, nodes: list[dict[str, Any]], gres: str | None) -> str:
    """Why no node can ever run this launch ('' when some node can)."""
    cpus = max(1, round(launch.cpu or 1))
    fits = [n for n in nodes if n["cpus"] >= cpus]
    if not fits:
        return f"no node offers {cpus} CPUs (the largest has {max(n['cpus'] for n in nodes)})"
    memory = launch.memory_limit_mb or launch.memory_mb  # what --mem asks for
    if memory:
        fits = [n for n in fits if n["memory_mb"] >= memory]
        if not fits:
            return f"no node offers memory={memory} MiB"
    if launch.gpu is not None:
        want = launch.gpu.count

        def offered(node: dict[str, Any]) -> int:
            return sum(c for t, c in node["gpus"].items() if gres is None or t == gres)

        if not any(offered(n) >= want for n in fits):
            what = f"{want} GPU(s)" + (f" of type {gres}" if gres else "")
            have = ", ".join(f"{n['name']}: " + (", ".join(f"{c} {t or 'gpu'}" for t, c in
                                                          n["gpus"].items()) or "none")
                             for n in nodes)
            return f"no node offers {what} (nodes offer {have})"
    return ""


@mctl.hookimpl
def mctl_register_schedulers():
    yield Scheduler(name="slurm", factory=SlurmScheduler)
