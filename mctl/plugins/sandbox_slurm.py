"""Sandboxes as Slurm jobs: when the control plane's scheduler is `slurm`, `Sandbox.create` submits
one batch job that runs the sandbox's container on a node, isolated exactly as the local backend
isolates it (`core/sandbox_runtime.run_argv`: podman with gVisor's runsc, or runc with a user
namespace; no network unless asked, every capability dropped, a non-root user).

- Resources: cpu → `--cpus-per-task`, memory → `--mem`, gpu → `--gres=gpu:TYPE:N` (the
  scheduler's `gpu_map`; the container gets the job's GPUs by CDI through
  `containers.gpu_argv`, as a GPU function's does), timeout → `--time` (whole minutes, rounded up, plus one: Slurm's own
  backstop; the control plane ends the sandbox at its exact timeout with return code -1).
- The job's shell runs the container in the foreground (its output is the job's output) and
  removes it on every way out: exit, `scancel` (TERM), the time limit. With a `cidr_allowlist`
  it creates and initialises the container, loads the allowlist's firewall into its network
  namespace on the node (`sandbox_runtime.allowlist_script`; the node needs iptables and
  nsenter) and only then starts it.
- Everything after the start happens on the node, through Slurm: the control plane runs
  `srun --jobid=<job> --overlap podman ...` (exec, logs, kill, rm), as an operator would. gVisor's
  control sockets live in the node's network namespace, so even a node sharing the control plane's
  file system needs this. Clients reach it through the control plane's relay WebSocket
  (`core/server/sandbox_relay`), never the node.
- Each job's comment (`mctl sandbox=sb-... app=... cp=...`) lets a restarted control plane find
  its sandboxes that still run.
- `snapshot_filesystem()` is made on the node, and pushed to MCTL_IMAGE_REGISTRY when there is
  one (any node then pulls it); ports are published on the node and reached through a TCP relay
  on the control plane (`core/server/tunnel_relay`), the address `sb.tunnels()` gives.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import shlex
import time
from typing import TYPE_CHECKING, Any

from mctl.core import sandbox_runtime
from mctl.core.sandbox_runtime import SandboxConfig
from mctl.exception import InvalidError

if TYPE_CHECKING:
    from mctl.core.server.sandboxes import Sandboxes
    from mctl.plugins.scheduler_slurm import SlurmScheduler

log = logging.getLogger("mctl.sandboxes.slurm")

POLL_S = 1.0
START_TIMEOUT_S = 300.0  # a job still pending after this long is cancelled and create fails


def job_time(timeout_s: int) -> int:
    """The job's time limit in minutes: the sandbox's timeout rounded up, plus one."""
    return math.ceil(timeout_s / 60) + 1


def foreground(argv: list[str]) -> list[str]:
    """`podman run -d ...` → `podman run ...`: the job's shell waits for the container."""
    out = list(argv)
    if out[:3] == ["podman", "run", "-d"]:
        del out[2]
    return out


def pull_from_registry(argv: list[str], image: str) -> list[str]:
    """An image from a registry (a snapshot a sandbox on another node pushed to
    MCTL_IMAGE_REGISTRY) is pulled by the node that lacks it; a `localhost/` one must be there
    already (podman cannot pull it), as for workers' images."""
    from mctl.plugins.registry_v2 import insecure

    out = list(argv)
    if image.startswith("localhost/") or "--pull" not in out:
        return out
    at = out.index("--pull")
    out[at + 1] = "missing"
    if insecure(image.split("/", 1)[0]):
        out.insert(at + 2, "--tls-verify=false")
    return out


def publish_on_node(argv: list[str]) -> list[str]:
    """Published ports on the node's addresses (`-p 0.0.0.0::PORT`), not its loopback: the
    control plane's tunnel relay connects to them from outside the node."""
    out = list(argv)
    for i, part in enumerate(out[:-1]):
        if part == "-p" and out[i + 1].startswith("127.0.0.1::"):
            out[i + 1] = "0.0.0.0::" + out[i + 1].split("::", 1)[1]
    return out


def job_script(cfg: SandboxConfig, isolation: str, *, name: str, comment: str, output: str,
               timeout_s: int, gres: str | None = None,
               options: dict[str, Any] | None = None) -> str:
    """The batch script of one sandbox (no secret values in it: podman reads them from the job's
    environment by name)."""
    opts = options or {}
    container = sandbox_runtime.container_name(cfg.sandbox_id)
    memory = cfg.memory_mb or sandbox_runtime.DEFAULT_MEMORY_MB
    lines = ["#!/bin/sh", f"#SBATCH --job-name=mctl-{cfg.sandbox_id.lower()}",
             f'#SBATCH --comment="{comment}"', f"#SBATCH --output={output}",
             "#SBATCH --ntasks=1", "#SBATCH --no-requeue",
             f"#SBATCH --cpus-per-task={max(1, math.ceil(cfg.cpu or sandbox_runtime.DEFAULT_CPU))}",
             # the container's limit plus room for podman and conmon on the node
             f"#SBATCH --mem={memory + 256}M",
             f"#SBATCH --time={job_time(timeout_s)}"]
    if gres is not None:
        lines.append(f"#SBATCH --gres={gres}")
    for key in ("partition", "account", "qos"):
        if opts.get(key):
            lines.append(f"#SBATCH --{key}={opts[key]}")
    argv = publish_on_node(pull_from_registry(
        foreground(sandbox_runtime.run_argv(cfg, isolation, name=container,
                                            runsc="__MCTL_RUNSC__")), cfg.image))
    # GPUs: the devices Slurm assigned to the job (SLURM_JOB_GPUS), passed by CDI through the
    # same wrapper as function containers' (containers.gpu_argv: the CDI-spec check, its error
    # naming `nvidia-ctk cdi generate`); the container sees exactly those, numbered from 0
    gpus = sandbox_runtime.gpu_count(cfg) if cfg.gpu else (
        int(gres.rsplit(":", 1)[1]) if gres else 0)

    def with_gpus(parts: list[str]) -> list[str]:
        from mctl.plugins.containers import gpu_argv

        return gpu_argv(parts, gpus, "sandbox") if gpus else parts

    check = ["command -v podman >/dev/null || { echo \"mctl: podman is not installed on "
             "$(hostname); sandboxes on Slurm need podman on every node\" >&2; exit 125; }"]
    if isolation == "gvisor":
        check.append(f"[ -x {sandbox_runtime.RUNSC} ] || {{ echo \"mctl: {sandbox_runtime.RUNSC}"
                     " (gVisor) is not installed on $(hostname); install runsc there or create "
                     "the sandbox with isolation='runc'\" >&2; exit 125; }")
        if gpus:  # GPUs under gVisor: only a runsc with nvproxy (the node's, checked there)
            check.append(f"{sandbox_runtime.nvproxy_check()} || {{ echo \"mctl: "
                         f"{sandbox_runtime.gvisor_gpu_problem('$(hostname)')}\" >&2; "
                         "exit 125; }")
    if gpus:
        # The job's GRES decides (SLURM_JOB_GPUS, set by Slurm): not the sandbox's env= nor
        # the control plane's own MCTL_GPU_DEVICES, which --export=ALL brings along
        check.append("unset MCTL_GPU_DEVICES SLURM_STEP_GPUS")

    def quoted(parts: list[str]) -> str:
        return " ".join(shlex.quote(p) for p in parts).replace("__MCTL_RUNSC__", '"$runsc"')

    stdin_lines: list[str] = []
    redirect = " </dev/null"
    if cfg.command:  # the main command's stdin, fed from a FIFO (sandbox_runtime, stdin_fifo)
        fifo = sandbox_runtime.stdin_fifo(container)
        stdin_lines = [
            f"f={shlex.quote(fifo)}",
            'if mkdir -p -m 700 "${f%/*}" && rm -f "$f" "$f.pid" "$f.writers" && '
            'mkfifo -m 600 "$f"; then stdin=$f; fifo=$f',
            # the holder keeps it open: writers come and go; write_eof ends the holder
            '  sleep infinity 3<>"$fifo" & echo $! > "$fifo.pid"',
            # never a failed start for it: the command then reads an empty stdin
            'else echo "mctl: no stdin for the main command: cannot make $f on $(hostname)" >&2',
            "fi"]
        redirect = ' <"$stdin"'
    wrapper_lines: list[str] = []
    if isolation == "gvisor":
        # gVisor's runtime as podman calls it (sandbox_runtime, RUNSC_TTY_SCRIPT), written on
        # the node; plain runsc where it cannot be (all but a terminal works then)
        wrapper_lines = [
            f"runsc={shlex.quote(sandbox_runtime.runsc_tty_path())}",
            f'[ -x "$runsc" ] || {{ mkdir -p "${{runsc%/*}}" && printf %s '
            f'{shlex.quote(sandbox_runtime.runsc_tty_script())} > "$runsc.$$" && '
            f'chmod 755 "$runsc.$$" && mv -f "$runsc.$$" "$runsc"; }} 2>/dev/null || '
            f"runsc={shlex.quote(sandbox_runtime.RUNSC)}"]
    if cfg.cidr_allowlist is None:
        start = [quoted(with_gpus(argv)) + redirect + " &"]
    else:
        # The same firewall as on the control plane's host (sandbox_runtime.apply_allowlist),
        # loaded into the container's network namespace on the node between `podman init` and
        # `podman start`: no code of the sandbox runs before it holds; any failure ends the job.
        create = ["podman", "create", *argv[2:]]
        start = [quoted(with_gpus(create)) + " </dev/null >/dev/null || exit 125",
                 'podman init "$name" >/dev/null || exit 125',
                 *sandbox_runtime.allowlist_script(cfg.cidr_allowlist, '"$name"'),
                 "podman start --attach " + ("--interactive " if cfg.command else "")
                 + '"$name"' + redirect + " &"]
    lines += [
        f"name={container}",
        # TERM (scancel, the time limit) and every other way out remove the container: it lives
        # under conmon, which Slurm's process tracking does not follow
        "cleanup() { podman rm --force --time 0 --ignore \"$name\" >/dev/null 2>&1; "
        '[ -n "$fifo" ] && { kill "$(cat "$fifo.pid" 2>/dev/null)" 2>/dev/null; '
        'rm -f "$fifo" "$fifo.pid" "$fifo.writers"; }; }',
        "stdin=/dev/null; fifo=",
        "trap 'cleanup; exit 143' TERM INT",
        "trap cleanup EXIT",
        *check,
        *wrapper_lines,
        *stdin_lines,
        *start,
        "pid=$!",
        "wait $pid; code=$?",
        # The relay's `podman logs -f` (a step of this job) ends by itself once it has read the
        # container's last lines; the job's end would kill it first and lose them (a main
        # command's buffered stdout comes at its exit). Wait for it, 10 s at most.
        'i=0; while [ "$i" -lt 100 ] && pgrep -f "podman logs -f $name" >/dev/null 2>&1; '
        "do sleep 0.1; i=$((i + 1)); done",
        "exit $code"]
    return "\n".join(lines) + "\n"


def control_plane_mark(control: Any) -> str:
    """Which control plane owns a sandbox job: a hash of its state directory and host."""
    import socket

    state = str(getattr(control.store, "state_dir", ""))
    return hashlib.sha256(f"{socket.gethostname()}:{state}".encode()).hexdigest()[:12]


class SlurmSandboxes:
    """The Slurm sandbox backend; it uses the Slurm scheduler's commands and options."""

    name = "slurm"

    def __init__(self, scheduler: SlurmScheduler) -> None:
        self.scheduler = scheduler
        self.jobs: dict[str, str] = {}  # sandbox id -> job id
        self.nodes: dict[str, str] = {}  # sandbox id -> node
        self.recovered: asyncio.Event | None = None  # set once a restart found its jobs again

    async def ready(self) -> None:
        """Wait (a little) for `recover`: the HTTP routes answer before it has run."""
        if self.recovered is None:
            self.recovered = asyncio.Event()
        try:
            await asyncio.wait_for(self.recovered.wait(), 60)
        except asyncio.TimeoutError:
            pass

    # --- Slurm -------------------------------------------------------------------------------
    def relay_prefix(self, sandbox_id: str) -> list[str]:
        """Put before a `podman ...` argv to run it on the sandbox's node, inside its job."""
        job = self.jobs.get(sandbox_id)
        if job is None:
            raise InvalidError(f"Sandbox {sandbox_id} has no running Slurm job.")
        return ["srun", f"--jobid={job}", "--overlap", "--quiet", "--nodes=1", "--ntasks=1"]

    async def _on_node(self, sandbox_id: str, *args: str, timeout: float = 60
                       ) -> tuple[int, str, str]:
        """`podman ARGS` on the sandbox's node, as a step of its job."""
        return await self._on_node_argv(sandbox_id, ["podman", *args], timeout=timeout)

    async def _on_node_argv(self, sandbox_id: str, command: list[str], *, timeout: float = 60
                            ) -> tuple[int, str, str]:
        argv = self.relay_prefix(sandbox_id) + command
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            return 124, "", f"`{' '.join(argv[:6])}` did not finish within {timeout:g}s"
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

    async def _state(self, job_id: str) -> tuple[str, str, int | None, str]:
        """(state, node, exit code, reason) from `scontrol show job`."""
        try:
            info = await self.scheduler._run("scontrol", "show", "job", job_id, "--oneliner")
        except InvalidError:
            return "COMPLETED", "", None, ""  # aged out of slurmctld's memory
        fields = dict(re.findall(r"(\w+)=(\S*)", info))
        code = None
        match = re.search(r"ExitCode=(\d+):(\d+)", info)
        if match:
            code = int(match.group(1)) or (128 + int(match.group(2)) if int(match.group(2))
                                           else 0)
        node = fields.get("BatchHost") or fields.get("NodeList") or ""
        return fields.get("JobState", "UNKNOWN"), "" if node == "(null)" else node, code, \
            fields.get("Reason", "")

    def _output(self, sandbox_id: str) -> str:
        return str(self.scheduler.output_dir / f"sandbox-{sandbox_id.lower()}.out")

    def _tail(self, sandbox_id: str) -> str:
        from pathlib import Path

        try:
            text = Path(self._output(sandbox_id)).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-20:])

    # --- life ----------------------------------------------------------------------------------
    async def create(self, sbs: Sandboxes, cfg: SandboxConfig, isolation: str,
                     body: dict[str, Any], app_id: str, name: str | None,
                     timeout: int) -> dict[str, Any]:
        from mctl.core.spec import GpuRequest
        from mctl.plugins.scheduler_slurm import input_script, server_env_without_credentials

        try:
            gpu = GpuRequest.parse(body.get("gpu"))
        except ValueError as exc:
            raise InvalidError(str(exc)) from None
        gres = None
        if gpu is not None:
            gtype = (self.scheduler.gpu_map.get(gpu.type.upper(), gpu.type.lower())
                     if gpu.type else None)
            gres = f"gpu:{gtype + ':' if gtype else ''}{gpu.count}"
        sandbox_id = cfg.sandbox_id
        sched = self.scheduler
        sched.output_dir.mkdir(parents=True, exist_ok=True)
        comment = (f"mctl sandbox={sandbox_id} app={app_id} "
                   f"cp={control_plane_mark(sbs.control)}")
        script = job_script(cfg, isolation, name=sandbox_runtime.container_name(sandbox_id),
                            comment=comment, output=self._output(sandbox_id),
                            timeout_s=timeout, gres=gres,
                            options=sched.options)
        now = time.time()  # the timeout counts from here
        stored = sbs.insert(cfg, app_id, name, body.get("tags"), isolation, timeout, host="",
                            backend="slurm", container=sandbox_runtime.container_name(sandbox_id),
                            gpu=body.get("gpu"))
        env = server_env_without_credentials()  # the sandbox's values, not the server's rights
        env.update(cfg.env)
        try:
            out = await sched._run("sbatch", "--parsable", "--export=ALL",
                                   input_script(sched.output_dir, f"sandbox-{sandbox_id.lower()}",
                                                script), env=env)
        except InvalidError as exc:
            sbs._update(sandbox_id, state="failed", ended=time.time())
            raise InvalidError(f"The sandbox could not be submitted to Slurm: {exc}") from None
        job_id = out.strip().split(";")[0]
        self.jobs[sandbox_id] = job_id
        stored["slurm_job"] = job_id
        sbs._update(sandbox_id, config=json.dumps(stored))
        log.info("sandbox %s: Slurm job %s", sandbox_id, job_id)
        try:
            node = await self._wait_running(sandbox_id, job_id)
        except BaseException:
            await self._cancel(sandbox_id)
            sbs._update(sandbox_id, state="failed", ended=time.time())
            raise
        self.nodes[sandbox_id] = node
        sbs._update(sandbox_id, state="running", host=node)
        self._watch(sbs, sandbox_id, max(0.0, now + timeout - time.time()))
        if cfg.ports:
            try:
                await self._tunnels(sbs, sandbox_id, node, cfg.ports)
            except BaseException:
                await self.terminate(sbs, sandbox_id)
                raise
        return sbs._row(sandbox_id)

    # --- tunnels -------------------------------------------------------------------------------
    async def _tunnels(self, sbs: Sandboxes, sandbox_id: str, node: str, ports: list[int],
                       node_ports: dict[str, list[Any]] | None = None) -> None:
        """Find where the node published each port (`podman port` on it, and the node's
        address from Slurm), then open a relay on the control plane for each: the sandbox's
        `ports` record is the relays' (the control plane's address), `node_ports` in its config
        the node's. The relays close with the sandbox (a task of its own in `sbs.tasks`)."""
        from mctl.core.server.tunnel_relay import TcpRelay

        if node_ports is None:
            node_ports = {}
            addr = await self._node_addr(node)
            container = sandbox_runtime.container_name(sandbox_id)
            for port in ports:
                rc, out, err = await self._on_node(sandbox_id, "port", container, f"{port}/tcp",
                                                   timeout=30)
                published = out.strip().splitlines()[0] if rc == 0 and out.strip() else ""
                if not published:
                    raise InvalidError(f"Sandbox {sandbox_id} did not publish port {port} on "
                                       f"{node}: {err.strip()[-300:]}")
                node_ports[str(port)] = [addr, int(published.rpartition(":")[2])]
        host = self._relay_host(sbs)
        relays, public = [], {}
        for port, (addr, node_port) in node_ports.items():
            relay = TcpRelay(addr, int(node_port))
            public[port] = [host, await relay.start(host)]
            relays.append(relay)
        sbs._set_config(sandbox_id, node_ports=node_ports)
        sbs._update(sandbox_id, ports=json.dumps(public))
        log.info("sandbox %s: tunnels %s -> %s", sandbox_id, public, node_ports)

        async def hold() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                for relay in relays:
                    relay.close()

        if sbs._state(sandbox_id) != "running":  # it ended meanwhile
            for relay in relays:
                relay.close()
            return
        sbs.tasks.setdefault(sandbox_id, []).append(asyncio.get_running_loop().create_task(hold()))

    @staticmethod
    def _relay_host(sbs: Sandboxes) -> str:
        """The control plane's own host, as its clients address it."""
        from urllib.parse import urlsplit

        url = getattr(getattr(sbs.control, "autoscaler", None), "server_url", "") or ""
        return urlsplit(url).hostname or "127.0.0.1"

    async def _node_addr(self, node: str) -> str:
        """The node's address as Slurm reaches it (NodeAddr), else its name."""
        try:
            info = await self.scheduler._run("scontrol", "show", "node", node, "--oneliner")
        except InvalidError:
            return node
        match = re.search(r"NodeAddr=(\S+)", info)
        return match.group(1) if match else node

    async def _wait_running(self, sandbox_id: str, job_id: str) -> str:
        """Until the container runs on its node; its node's name. A job that ends first fails
        `create` with the job's own words."""
        deadline = time.monotonic() + START_TIMEOUT_S
        container = sandbox_runtime.container_name(sandbox_id)
        reason = ""
        while time.monotonic() < deadline:
            state, node, code, reason = await self._state(job_id)
            if state in ("COMPLETED", "FAILED") and code is not None and code != 125 and node:
                # the container ran and its command already ended (a short command): a
                # sandbox that finished, as locally; the job script's own failures exit 125
                return node
            if state in _finished():
                raise InvalidError(
                    f"The sandbox's Slurm job {job_id} ended {state} (exit code {code}) before "
                    f"its container ran. {self._tail(sandbox_id)}".strip())
            if state == "RUNNING":
                rc, out, _ = await self._on_node(sandbox_id, "container", "inspect", "-f",
                                                 "{{.State.Running}}", container, timeout=30)
                if rc == 0 and out.strip() == "true":
                    return node
            await asyncio.sleep(0.1 if state == "RUNNING" else 0.5)
        raise InvalidError(f"The sandbox's Slurm job {job_id} did not start within "
                           f"{START_TIMEOUT_S:g}s (Slurm's reason: {reason or 'none'}); it was "
                           "cancelled. Check `sinfo` for free nodes or ask for less.")

    def _watch(self, sbs: Sandboxes, sandbox_id: str, timeout: float) -> None:
        sbs.done[sandbox_id] = asyncio.Event()
        loop = asyncio.get_running_loop()
        sbs.tasks[sandbox_id] = [loop.create_task(self._wait_job(sbs, sandbox_id)),
                                 loop.create_task(self._expire(sbs, sandbox_id, timeout))]

    async def _wait_job(self, sbs: Sandboxes, sandbox_id: str) -> None:
        """Poll the job; its end is the sandbox's end, its exit code the return code."""
        job_id = self.jobs[sandbox_id]
        try:
            while True:
                await asyncio.sleep(POLL_S)
                state, _, code, _ = await self._state(job_id)
                if state in _finished():
                    break
        except asyncio.CancelledError:
            return
        self.jobs.pop(sandbox_id, None)
        log.info("sandbox %s: Slurm job %s ended %s (exit code %s)", sandbox_id, job_id, state,
                 code)
        sbs._finish(sandbox_id, "finished", code)

    async def _expire(self, sbs: Sandboxes, sandbox_id: str, timeout: float) -> None:
        await asyncio.sleep(timeout)
        if sbs._state(sandbox_id) == "running":
            sbs._finish(sandbox_id, "timeout", -1)
            await self._cancel(sandbox_id)

    async def _cancel(self, sandbox_id: str) -> None:
        """Remove the container on its node, then cancel the job (whose shell removes it too)."""
        job_id = self.jobs.get(sandbox_id)
        if job_id is None:
            return
        try:
            await self._on_node(sandbox_id, "rm", "--force", "--time", "0", "--ignore",
                                sandbox_runtime.container_name(sandbox_id), timeout=60)
        finally:
            self.jobs.pop(sandbox_id, None)
            try:
                await self.scheduler._run("scancel", job_id)
            except InvalidError as exc:
                log.warning("scancel %s: %s", job_id, exc)

    async def terminate(self, sbs: Sandboxes, sandbox_id: str) -> dict[str, Any]:
        await self.ready()
        rec = sbs._row(sandbox_id)
        if rec["state"] == "running":
            sbs._finish(sandbox_id, "terminated", 137)
        await self._cancel(sandbox_id)
        return sbs._row(sandbox_id)

    async def logs(self, sbs: Sandboxes, sandbox_id: str) -> dict[str, str]:
        """While it runs: `podman logs` on the node; afterwards the job's output file, where the
        control plane can read it (stdout and stderr together there)."""
        sbs._row(sandbox_id)
        await self.ready()
        if sandbox_id in self.jobs:
            rc, out, err = await self._on_node(sandbox_id, "logs",
                                               sandbox_runtime.container_name(sandbox_id))
            if rc == 0:
                return {"stdout": out, "stderr": err}
        try:
            # newline="": a terminal's "\r\n" stays as it was written (create(pty=True))
            with open(self._output(sandbox_id), errors="replace", newline="") as fh:
                text = fh.read()
            # what podman says of a terminal with a FIFO for stdin (create(pty=True)) is not
            # the command's output
            text = "".join(line for line in text.splitlines(keepends=True)
                           if "The input device is not a TTY" not in line)
            return {"stdout": text,
                    "stderr": ""}
        except OSError:
            from mctl.exception import NotFoundError

            raise NotFoundError(f"The logs of sandbox {sandbox_id} are gone (its Slurm job "
                                "ended and its output file is not readable here).") from None

    async def snapshot(self, sbs: Sandboxes, rec: dict[str, Any]) -> dict[str, str]:
        """snapshot_filesystem() on the node, in one step of the sandbox's job (the script of
        core/sandbox_snapshot, as locally: the node needs podman, no buildah). With
        MCTL_IMAGE_REGISTRY the node pushes the image there and the snapshot is that reference,
        so a sandbox (or a function) on any node can pull it; without, it is
        `localhost/mctl/snapshot:<id>` in the node's podman storage: usable on nodes that share
        it (as the development cluster's do)."""
        import os

        from mctl.core import sandbox_snapshot
        from mctl.plugins.registry_v2 import insecure

        sandbox_id = rec["sandbox_id"]
        await self.ready()
        tag = sandbox_snapshot.tag(sandbox_id)
        q = shlex.quote
        script = sbs.snapshot_script(rec, tag)
        ref = tag
        registry = os.environ.get("MCTL_IMAGE_REGISTRY", "").rstrip("/")
        if registry:
            ref = f"{registry}/mctl/snapshot:{sandbox_id.lower()}"
            tls = " --tls-verify=false" if insecure(registry.split("/", 1)[0]) else ""
            script += (f"podman tag {q(tag)} {q(ref)}; podman push -q{tls} {q(ref)}; "
                       f"podman rmi {q(tag)} >/dev/null\n")
        from mctl.core.server.sandboxes import SNAPSHOT_TIMEOUT_S

        rc, _, err = await self._on_node_argv(sandbox_id, ["/bin/sh", "-c", script],
                                              timeout=SNAPSHOT_TIMEOUT_S)
        if rc != 0:
            raise InvalidError(f"Could not snapshot sandbox {sandbox_id} on its node "
                               f"{rec['host']}: {err.strip()[-400:]}")
        log.info("sandbox %s: snapshot %s made on %s", sandbox_id, ref, rec["host"])
        return {"image": ref}

    async def recover(self, sbs: Sandboxes, records: list[dict[str, Any]]) -> None:
        """After a restart: running sandboxes whose job still runs are watched again."""
        try:
            await self._recover(sbs, records)
        finally:
            if self.recovered is None:
                self.recovered = asyncio.Event()
            self.recovered.set()

    async def _recover(self, sbs: Sandboxes, records: list[dict[str, Any]]) -> None:
        mark = control_plane_mark(sbs.control)
        try:
            text = await self.scheduler._run("squeue", "-h", "-o", "%i|%T|%N|%k")
        except InvalidError as exc:
            log.warning("could not list Slurm jobs to recover sandboxes: %s", exc)
            text = ""
        alive: dict[str, tuple[str, str]] = {}
        for line in text.splitlines():
            parts = line.split("|", 3)
            if len(parts) < 4 or not parts[3].startswith("mctl sandbox="):
                continue
            fields = dict(p.split("=", 1) for p in parts[3].split() if "=" in p)
            if fields.get("cp") == mark and parts[1] not in _finished():
                alive[fields["sandbox"]] = (parts[0], parts[2])
        for rec in records:
            sandbox_id = rec["sandbox_id"]
            if sandbox_id in alive:
                self.jobs[sandbox_id], self.nodes[sandbox_id] = alive[sandbox_id]
                left = rec["created"] + rec["timeout"] - time.time()
                self._watch(sbs, sandbox_id, max(0.0, left))
                log.info("sandbox %s: adopted Slurm job %s", sandbox_id, alive[sandbox_id][0])
                node_ports = sbs.config(sandbox_id).get("node_ports")
                if node_ports:  # the relays died with the old control plane: new ones
                    try:
                        await self._tunnels(sbs, sandbox_id, alive[sandbox_id][1],
                                            [int(p) for p in node_ports], node_ports)
                    except (OSError, InvalidError) as exc:
                        log.warning("sandbox %s: its tunnels could not be opened again: %s",
                                    sandbox_id, exc)
            else:
                sbs._update(sandbox_id, state="lost", ended=time.time())


def _finished() -> set[str]:
    from mctl.plugins.scheduler_slurm import FINISHED

    return FINISHED


def backend_for(control: Any) -> SlurmSandboxes | None:
    """A Slurm sandbox backend when the control plane schedules on Slurm through its commands,
    else None (`Sandboxes.cluster` makes it once, unless MCTL_SANDBOX_BACKEND is `local`)."""
    from mctl.plugins.scheduler_slurm import SlurmScheduler

    scheduler = getattr(control, "scheduler", None)
    if not isinstance(scheduler, SlurmScheduler):
        return None
    if scheduler.rest is not None:
        return None  # every operation on a running sandbox is an srun step: no REST counterpart
    return SlurmSandboxes(scheduler)
