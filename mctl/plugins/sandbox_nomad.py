"""Sandboxes as Nomad jobs: when the control plane's scheduler is `nomad`, `Sandbox.create`
registers one batch job through the scheduler's Nomad client (`NomadSandboxes`), and the
sandbox's commands travel over Nomad's alloc exec WebSocket through the control plane's relay.
Contract-level: Nomad cannot be obtained on the project's machines, so every job rendered here
is checked against Nomad's Go API types and the drivers' documented config keys by
tools/nomad-jobcheck (tests/test_sandbox_nomad.py), the exec frames against
`api.ExecStreamingInput` / `api.ExecStreamingOutput`, and the requests a real control plane
sends are recorded in tests/test_sandbox_nomad_requests.py; no Nomad agent has run them.

One sandbox is one batch job (`mctl-sb-<id>`, `job_id`), one group, one task `sandbox`:
- driver `docker` (default) with `runtime = "runsc"` for gVisor or `"runc"`; driver `podman`
  has no per-task runtime, so a gVisor job is constrained to nodes whose operator set podman's
  default runtime to runsc and says so in the node's meta (`mctl_sandbox_runtime = "runsc"`);
- `network_mode = "none"` unless the sandbox asked for network or ports (then a bridge with the
  ports mapped); a `cidr_allowlist` is refused (the drivers have no egress filter); every
  capability dropped, `no-new-privileges`, user 65534, `init`, a pids limit; cpu (MHz),
  memory and GPUs (`nvidia/gpu` devices) as the task's resources;
- no restarts or reschedules (a sandbox that ends has ended), `kill_timeout` short: terminate
  is a kill; the control plane ends it at its timeout (Nomad has no run-time limit for a task);
- secrets by name from Vault templates, as workers get them, other secret values from the job's
  Nomad Variable through a template; never values in the job.

The backend: create = register, then read the job's allocations until one runs (none within
`sandbox_start_timeout`: the evaluation's placement failure, and the job is purged); the
allocation's task state gives the exit code; terminate and the control plane's timeout purge
the job; logs come from the client fs API; a restarted control plane lists its `mctl-sb-` jobs
by their meta (`mctl.cp`, this control plane's mark) and watches them again.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import secrets
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from mctl.core import sandbox_runtime
from mctl.core.sandbox_runtime import SandboxConfig
from mctl.exception import InvalidError
from mctl.plugins.nomad_api import NomadError

if TYPE_CHECKING:
    from aiohttp import web

    from mctl.core.server.sandboxes import Sandboxes
    from mctl.plugins.scheduler_nomad import NomadScheduler

log = logging.getLogger("mctl.sandboxes.nomad")

TASK = "sandbox"
KILL_TIMEOUT_S = 5
NS = 1_000_000_000
RUNTIME_META = "mctl_sandbox_runtime"


def job_id(sandbox_id: str) -> str:
    return "mctl-" + sandbox_id.lower().replace("_", "-")


def render_sandbox(cfg: SandboxConfig, isolation: str, *, app_id: str, options: Any = None,
                   gpu: str | None = None, secret_names: tuple[str, ...] = (),
                   driver: str | None = None, variable: bool = False,
                   meta: dict[str, str] | None = None,
                   volumes: tuple[tuple[str, str, bool], ...] = ()) -> dict[str, Any]:
    """The job register request (`{"Job": ...}`) of one sandbox. `options`: NomadOptions.
    `secret_names`: secrets read from Vault by the task's templates; `variable`: the task also
    reads environment values from the job's Nomad Variable (`nomad/jobs/<job id>`, which only
    this job's tasks may read: the values never appear in the job); `meta`: more job meta;
    `volumes`: (mount path, mctl volume name, read-only) mounted from the Nomad host or CSI
    volume named after mctl's, as functions' volumes are (`cfg.mounts`, host paths of the
    control plane, are for a sandbox on its own host)."""
    from mctl.core.spec import GpuRequest
    from mctl.plugins.nomad_render import NomadOptions, _secret_templates

    opts = options or NomadOptions()
    driver = driver or opts.driver or "docker"
    if driver not in ("docker", "podman"):
        raise InvalidError(f"A sandbox needs a container driver (docker or podman), not "
                           f"{driver!r}: exec and raw_exec cannot isolate untrusted code.")
    if isolation not in sandbox_runtime.PODMAN_ISOLATIONS:
        raise InvalidError(f"Unknown isolation {isolation!r} for a Nomad sandbox; use one of "
                           f"{', '.join(sandbox_runtime.PODMAN_ISOLATIONS)}.")
    if cfg.cidr_allowlist is not None:
        raise InvalidError("cidr_allowlist is not supported for sandboxes on Nomad: its docker "
                           "and podman drivers have no per-task egress filter (only all or no "
                           "network); use block_network=True or False there, or the local or "
                           "Slurm backend for an allowlist.")
    try:
        request = GpuRequest.parse(gpu)
    except ValueError as exc:
        raise InvalidError(str(exc)) from None
    if request is not None and isolation == "gvisor":
        raise InvalidError("A GPU sandbox on Nomad cannot use gVisor (runsc's nvproxy cannot be "
                           "passed through Nomad's drivers); use isolation='runc'.")
    needs_network = bool(cfg.ports) or not cfg.block_network
    pids = cfg.pids or sandbox_runtime.DEFAULT_PIDS
    command = cfg.command or ["sleep", "infinity"]
    config: dict[str, Any] = {
        "image": cfg.image, "command": command[0], "args": list(command[1:]),
        "cap_drop": ["ALL"], "security_opt": ["no-new-privileges"], "init": True,
        "hostname": "sandbox", "network_mode": "bridge" if needs_network else "none"}
    constraints = []
    if driver == "docker" and request is None:
        config["runtime"] = "runsc" if isolation == "gvisor" else "runc"
    # A GPU task names no runtime: the docker driver then uses its gpu_runtime (nvidia: runc
    # plus NVIDIA's hook, which passes the devices the nvidia/gpu plugin assigned) and refuses
    # any other one ("conflicting runtime requests")
    if driver == "docker":
        config["pids_limit"] = pids if isolation == "runc" else (
            2 * pids + sandbox_runtime.GVISOR_PIDS_SLACK)
        if isolation == "gvisor":
            config["ulimit"] = {"nproc": f"{pids}:{pids}"}
    elif isolation == "gvisor":
        constraints.append({"LTarget": f"${{meta.{RUNTIME_META}}}", "Operand": "=",
                            "RTarget": "runsc"})
    if cfg.workdir:
        config["work_dir" if driver == "docker" else "working_dir"] = cfg.workdir
    if cfg.mounts:
        config["volumes"] = [f"{m['host_path']}:{m['path']}" + (":ro" if m.get("read_only", True)
                                                                   else "")
                             for m in cfg.mounts]
    group: dict[str, Any] = {"Name": TASK, "Count": 1,
                             "RestartPolicy": {"Attempts": 0, "Mode": "fail"},
                             "ReschedulePolicy": {"Attempts": 0, "Unlimited": False}}
    if cfg.ports:
        labels = [f"port{int(p)}" for p in cfg.ports]
        group["Networks"] = [{"Mode": "bridge", "DynamicPorts": [
            {"Label": label, "To": int(p)} for label, p in zip(labels, cfg.ports)]}]
        config["ports"] = labels
    cpu = cfg.cpu or sandbox_runtime.DEFAULT_CPU
    resources: dict[str, Any] = {
        "CPU": max(1, round(cpu * opts.cpu_mhz_per_core)),
        "MemoryMB": cfg.memory_mb or sandbox_runtime.DEFAULT_MEMORY_MB}
    if request is not None:
        device: dict[str, Any] = {"Name": "nvidia/gpu", "Count": request.count}
        if request.type:
            pattern = "(?i)" + ".*".join(re.escape(p) for p in request.type.split("-"))
            device["Constraints"] = [{"LTarget": "${device.model}", "Operand": "regexp",
                                      "RTarget": pattern}]
        resources["Devices"] = [device]
    task: dict[str, Any] = {
        "Name": TASK, "Driver": driver, "Config": config, "User": sandbox_runtime.SANDBOX_USER,
        "Env": {"HOME": "/tmp", **{k: v for k, v in cfg.env.items()}},
        "Resources": resources, "KillSignal": "SIGKILL", "KillTimeout": KILL_TIMEOUT_S * NS,
        "Meta": {"mctl.sandbox": cfg.sandbox_id, "mctl.isolation": isolation}}
    jid = job_id(cfg.sandbox_id)
    if secret_names:
        task["Vault"] = {"Role": opts.vault_role or "mctl-sandboxes", "ChangeMode": "noop"}
        task["Templates"] = _secret_templates(tuple(secret_names), opts)
    if variable:
        task.setdefault("Templates", []).append({
            "EmbeddedTmpl": f'{{{{ with nomadVar "nomad/jobs/{jid}" }}}}{{{{ range .Tuples }}}}'
                            '{{ .K }}={{ .V | toJSON }}\n{{ end }}{{ end }}',
            "DestPath": "secrets/mctl-sandbox.env", "Envvars": True, "ChangeMode": "noop"})
    if volumes:
        group["Volumes"], task["VolumeMounts"] = _nomad_volumes(volumes, opts)
    group["Tasks"] = [task]
    job: dict[str, Any] = {
        "ID": jid, "Name": jid, "Type": "batch", "Namespace": opts.namespace,
        "Region": opts.region, "Datacenters": list(opts.datacenters),
        "Meta": {"mctl.sandbox": cfg.sandbox_id, "mctl.app_id": app_id, **(meta or {})},
        "TaskGroups": [group]}
    if opts.node_pool:
        job["NodePool"] = opts.node_pool
    all_constraints = [{"LTarget": a, "Operand": o, "RTarget": v}
                       for a, o, v in opts.constraints] + constraints
    if all_constraints:
        job["Constraints"] = all_constraints
    return {"Job": job}


def _nomad_volumes(volumes: tuple[tuple[str, str, bool], ...], opts: Any
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The group's volume requests and the task's mounts, as `nomad_render` makes them for a
    function: a volume is claimed read-only when every mount of it is (CSI:
    `multi-node-reader-only`)."""
    from mctl.plugins.nomad_render import _volume_key

    requests: dict[str, Any] = {}
    for name in sorted({name for _, name, _ in volumes}):
        key = _volume_key(name)
        read_only = all(ro for _, n, ro in volumes if n == name)
        volume = {"Name": key, "Type": opts.volume_type, "Source": name, "ReadOnly": read_only}
        if opts.volume_type == "csi":
            volume.update(AccessMode="multi-node-reader-only" if read_only
                          else "multi-node-multi-writer", AttachmentMode="file-system")
        requests[key] = volume
    mounts = [{"Volume": _volume_key(name), "Destination": path, "ReadOnly": ro}
              for path, name, ro in sorted(volumes)]
    return requests, mounts


# --- exec through Nomad's alloc exec API (a WebSocket) ------------------------------------------
def exec_path(alloc_id: str, cmd: list[str], task: str = TASK) -> str:
    """The path of Nomad's alloc exec WebSocket for one command in the sandbox's task
    (`GET /v1/client/allocation/<alloc>/exec?task=...&command=<JSON list>&tty=false`)."""
    if not cmd:
        raise InvalidError("exec needs a command.")
    return (f"/v1/client/allocation/{quote(alloc_id)}/exec?task={quote(task)}&tty=false"
            f"&command={quote(json.dumps(list(cmd)))}")


def stdin_frame(data: bytes | None) -> str:
    """A client frame: stdin bytes, or (None) stdin's end."""
    if data is None:
        return json.dumps({"stdin": {"close": True}})
    return json.dumps({"stdin": {"data": base64.b64encode(data).decode()}})


def read_frame(text: str) -> tuple[str, bytes | int | None]:
    """A frame from Nomad: ("stdout"|"stderr", bytes), ("exit", code) or ("", None)."""
    frame = json.loads(text)
    for name in ("stdout", "stderr"):
        part = frame.get(name)
        if part and part.get("data"):
            return name, base64.b64decode(part["data"])
    if frame.get("exited"):
        return "exit", int((frame.get("result") or {}).get("exit_code", 0))
    return "", None


def exec_command(cmd: list[str], *, marker: str, kill_marker: str,
                 workdir: str | None = None) -> list[str]:
    """The command a relayed exec runs through Nomad's alloc exec, which has no environment or
    working directory of its own: a shell reads `export K='v'` lines from stdin up to `marker`
    (so values travel in the stream, never in the exec URL), exports `kill_marker` as
    MCTL_EXEC_ID (for a timeout's kill, sandbox_runtime.kill_marked_command; no file is left),
    enters `workdir` and execs the command, which then reads stdin itself."""
    script = ('m=$1; k=$2; w=$3; shift 3; e=; '
              'while IFS= read -r l; do [ "$l" = "$m" ] && break; e="$e$l\n"; done; '
              f'eval "$e"; {sandbox_runtime.MARKER_ENV}=$k; export {sandbox_runtime.MARKER_ENV}; '
              'if [ -n "$w" ]; then cd "$w" || exit 126; fi; exec "$@"')
    return ["/bin/sh", "-c", script, "sh", marker, kill_marker, workdir or "", *cmd]


def env_preamble(env: dict[str, str], marker: str) -> bytes:
    """The stdin lines `exec_command`'s shell reads before the command's own stdin."""
    import shlex

    lines = []
    for key, value in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise InvalidError(f"Environment variable name {key!r} is not valid in a shell; use "
                               "letters, digits and _.")
        lines.append(f"export {key}={shlex.quote(str(value))}")
    return ("\n".join([*lines, marker]) + "\n").encode()


def placement_reason(evaluation: dict[str, Any] | None) -> str:
    """Why Nomad could not place the sandbox's group, from an `api.Evaluation`'s
    `FailedTGAllocs` (`api.AllocationMetric` per group), in the words `nomad job run` prints."""
    parts = []
    for group, metric in ((evaluation or {}).get("FailedTGAllocs") or {}).items():
        metric = metric or {}
        bits = []
        if not metric.get("NodesEvaluated") and not metric.get("NodesAvailable"):
            bits.append("no nodes were eligible for evaluation")
        for dc, count in (metric.get("NodesAvailable") or {}).items():
            if not count:
                bits.append(f"no nodes are available in datacenter {dc!r}")
        for what, count in (metric.get("ConstraintFiltered") or {}).items():
            bits.append(f"constraint {what!r}: {count} node(s) excluded by filter")
        for what, count in (metric.get("ClassFiltered") or {}).items():
            bits.append(f"class {what!r}: {count} node(s) excluded by filter")
        if metric.get("NodesExhausted"):
            bits.append(f"resources exhausted on {metric['NodesExhausted']} node(s)")
        for what, count in (metric.get("DimensionExhausted") or {}).items():
            bits.append(f"dimension {what!r} exhausted on {count} node(s)")
        for quota in metric.get("QuotaExhausted") or []:
            bits.append(f"quota limit hit {quota!r}")
        parts.append(f"task group {group!r}: " + ("; ".join(bits) or "not placed"))
    return ". ".join(parts)


def _task_state(alloc: dict[str, Any]) -> dict[str, Any]:
    return (alloc.get("TaskStates") or {}).get(TASK) or {}


def _started(alloc: dict[str, Any]) -> bool:
    return any(e.get("Type") == "Started" for e in _task_state(alloc).get("Events") or [])


def _ended(alloc: dict[str, Any]) -> bool:
    return alloc.get("ClientStatus") in ("complete", "failed", "lost") or \
        _task_state(alloc).get("State") == "dead"


def exit_code(alloc: dict[str, Any]) -> int | None:
    """The sandbox task's return code from its `api.TaskState` events: the `Terminated` event's
    ExitCode, 128+n after signal n; None when it never said (a lost node)."""
    code = None
    for event in _task_state(alloc).get("Events") or []:
        if event.get("Type") == "Terminated":
            signal = int(event.get("Signal") or 0)
            code = 128 + signal if signal and not event.get("ExitCode") else \
                int(event.get("ExitCode") or 0)
    return code


def _why(alloc: dict[str, Any]) -> str:
    """The task's last words, from its events (`DisplayMessage`, or `DriverError`)."""
    words = []
    for event in _task_state(alloc).get("Events") or []:
        text = event.get("DriverError") or event.get("DisplayMessage") or ""
        if text and text not in words:
            words.append(text)
    return "; ".join(words[-3:]) or "no reason given"


def _newest(allocs: list[dict[str, Any]], alloc_id: str | None = None) -> dict[str, Any] | None:
    if alloc_id is not None:
        return next((a for a in allocs if a.get("ID") == alloc_id), None)
    return max(allocs, key=lambda a: a.get("CreateIndex", 0)) if allocs else None


class NomadSandboxes:
    """The Nomad sandbox backend: one batch job per sandbox (`render_sandbox`), through the
    Nomad scheduler's client, namespace, token and Vault settings."""

    name = "nomad"

    def __init__(self, scheduler: NomadScheduler, control: Any) -> None:
        self.scheduler = scheduler
        self.control = control
        self.api = scheduler.api
        self.allocs: dict[str, str] = {}  # sandbox id -> allocation id, while it runs
        self.recovered: asyncio.Event | None = None

    @property
    def namespace(self) -> str:
        return self.scheduler.render.namespace

    async def ready(self) -> None:
        """Wait (a little) for `recover`: the HTTP routes answer before it has run."""
        if self.recovered is None:
            self.recovered = asyncio.Event()
        try:
            await asyncio.wait_for(self.recovered.wait(), 60)
        except asyncio.TimeoutError:
            pass

    def isolation(self, cfg: SandboxConfig) -> str:
        """What the sandbox gets on the node: gVisor unless runc was asked for (the node's
        runtime, not this host's: Nomad places the job where the driver can run it); runc for
        a GPU sandbox (gVisor's nvproxy cannot be turned on through Nomad's drivers)."""
        import os

        asked = cfg.isolation or os.environ.get("MCTL_SANDBOX_ISOLATION")
        wanted = asked or ("runc" if cfg.gpu else "gvisor")
        if wanted not in sandbox_runtime.PODMAN_ISOLATIONS:
            raise InvalidError(f"Unknown sandbox isolation {wanted!r} on Nomad; use one of "
                               f"{', '.join(sandbox_runtime.PODMAN_ISOLATIONS)}.")
        if cfg.gpu and wanted == "gvisor":
            # Nomad's docker and podman drivers name a runtime but pass it no flags, so
            # runsc's `--nvproxy` (gVisor's GPU support) cannot be set per task
            raise InvalidError(
                "A GPU sandbox on Nomad cannot use gVisor: GPUs under gVisor need runsc's "
                "nvproxy flag, which Nomad's docker and podman drivers cannot pass per task. "
                "Use isolation='runc' (the default for gpu= on Nomad)"
                + (" and unset MCTL_SANDBOX_ISOLATION=gvisor" if not cfg.isolation else "")
                + ".")
        return wanted

    def _alloc(self, sbs: Sandboxes, sandbox_id: str) -> str | None:
        return self.allocs.get(sandbox_id) or sbs._row(sandbox_id).get("container_id")

    # --- life ----------------------------------------------------------------------------------
    async def create(self, sbs: Sandboxes, cfg: SandboxConfig, isolation: str,
                     body: dict[str, Any], app_id: str, name: str | None,
                     timeout: int) -> dict[str, Any]:
        import dataclasses

        from mctl.plugins.sandbox_slurm import control_plane_mark
        from mctl.plugins.scheduler_nomad import register_body

        opts = self.scheduler.render
        # volumes: Nomad's host or CSI volumes named after mctl's, as for functions
        volumes = tuple((path.rstrip("/"), v["name"], bool(v.get("read_only")))
                        for path, v in (body.get("volumes") or {}).items())
        image = cfg.image
        if image == await asyncio.to_thread(sbs._base):
            if not opts.default_image:
                raise InvalidError(
                    "A sandbox on Nomad needs an image its nodes can pull: pass image= (built "
                    "with MCTL_IMAGE_BUILDER=oci and MCTL_IMAGE_REGISTRY set), or start the "
                    "control plane with --scheduler-option default_image=REF (an image with "
                    "python in it).")
            image = opts.default_image
        if image.startswith("localhost/"):
            raise InvalidError(f"The sandbox's image {image} exists only on the control plane's "
                               "host, where Nomad's nodes cannot pull it. Set "
                               "MCTL_IMAGE_REGISTRY=host:port on the control plane so images "
                               "are pushed where the nodes pull.")
        # The job's env holds the plain values only; secret values go to the job's Variable
        # (or, with secrets_from=vault, named secrets to Vault templates): never into the job.
        plain = {str(k): str(v) for k, v in (body.get("env") or {}).items()}
        secret = {k: v for k, v in cfg.env.items() if plain.get(k) != v}
        names = tuple(body.get("secret_names") or ())
        if opts.secrets_from == "vault" and names:
            given: dict[str, str] = {}
            for values in body.get("secret_values") or []:
                given.update({str(k): str(v) for k, v in values.items()})
            variable = {k: v for k, v in secret.items() if k in given}
        else:
            names, variable = (), secret
        job_cfg = dataclasses.replace(cfg, image=image, mounts=[],
                                      env={k: v for k, v in plain.items() if k not in secret})
        driver = opts.driver if opts.driver in ("docker", "podman") else "docker"
        doc = render_sandbox(job_cfg, isolation, app_id=app_id, options=opts,
                             gpu=body.get("gpu"), secret_names=names, driver=driver,
                             variable=bool(variable),
                             meta={"mctl.cp": control_plane_mark(sbs.control)},
                             volumes=volumes)
        jid, ns = doc["Job"]["ID"], doc["Job"]["Namespace"]
        now = time.time()  # the timeout counts from here
        stored = sbs.insert(cfg, app_id, name, body.get("tags"), isolation, timeout, host="",
                            backend="nomad", container=jid, gpu=body.get("gpu"),
                            nomad_job=jid, nomad_namespace=ns, nomad_variable=bool(variable),
                            image=image)
        try:
            if variable:
                await self.api.put_variable(jid, {"Namespace": ns, "Path": f"nomad/jobs/{jid}",
                                                  "Items": variable}, ns)
            answer = await self.api.register(jid, register_body(doc, self.scheduler.conn), ns)
            log.info("sandbox %s: Nomad job %s (evaluation %s)", cfg.sandbox_id, jid,
                     (answer or {}).get("EvalID"))
            alloc = await self._wait_running(cfg.sandbox_id, jid, (answer or {}).get("EvalID"),
                                             ns)
        except BaseException:
            sbs._update(cfg.sandbox_id, state="failed", ended=time.time())
            await self._purge(jid, ns, bool(variable))
            raise
        self.allocs[cfg.sandbox_id] = alloc["ID"]
        stored.update(nomad_alloc=alloc["ID"], nomad_node=alloc.get("NodeName", ""))
        ports = await self._ports(alloc["ID"], ns) if cfg.ports else {}
        sbs._update(cfg.sandbox_id, state="running", host=alloc.get("NodeName", ""),
                    container_id=alloc["ID"], ports=json.dumps(ports), config=json.dumps(stored))
        self._watch(sbs, cfg.sandbox_id, max(0.0, now + timeout - time.time()))
        return sbs._row(cfg.sandbox_id)

    async def _wait_running(self, sandbox_id: str, jid: str, eval_id: str | None,
                            ns: str) -> dict[str, Any]:
        """Until the job's allocation runs its task (or ran it: a short command may be done by
        the first look); the allocation. No allocation within the start timeout: create fails
        with Nomad's placement failure; an allocation that fails before its task started fails
        it with the task's events."""
        limit = self.scheduler.sandbox_start_timeout
        deadline = time.monotonic() + limit
        reason = ""
        while True:
            alloc = _newest(await self.api.allocations(jid, ns) or [])
            if alloc is not None:
                if (alloc.get("ClientStatus") == "running"
                        and _task_state(alloc).get("State", "running") == "running") \
                        or (_ended(alloc) and _started(alloc)):
                    return alloc
                if _ended(alloc):
                    raise InvalidError(
                        f"The sandbox's Nomad allocation {alloc.get('ID')} on node "
                        f"{alloc.get('NodeName') or '?'} ended {alloc.get('ClientStatus')} before "
                        f"its task started: {_why(alloc)}. Its job {jid} was deregistered.")
            elif eval_id:
                reason = placement_reason(await self.api.evaluation(eval_id, ns)) or reason
            if time.monotonic() >= deadline:
                what = (f"Nomad could not place it: {reason}" if reason and alloc is None
                        else f"its allocation is still {alloc.get('ClientStatus')}: {_why(alloc)}"
                        if alloc is not None else "no allocation was made")
                raise InvalidError(
                    f"The sandbox's Nomad job {jid} did not start within {limit:g}s ({what}); "
                    "it was deregistered. Check `nomad job status` for free nodes, ask for "
                    "less, or raise --scheduler-option sandbox_start_timeout=SECONDS.")
            await asyncio.sleep(min(self.scheduler.poll_interval, 0.5))

    async def _ports(self, alloc_id: str, ns: str) -> dict[int, list[Any]]:
        """{container port: [host, port]} from the allocation's `AllocatedResources.Shared.Ports`
        (`api.PortMapping`: Label, Value, To, HostIP)."""
        alloc = await self.api.allocation(alloc_id, ns) or {}
        shared = (alloc.get("AllocatedResources") or {}).get("Shared") or {}
        out: dict[int, list[Any]] = {}
        for port in shared.get("Ports") or []:
            label = str(port.get("Label", ""))
            if label.startswith("port") and label[4:].isdigit() and port.get("Value"):
                out[int(label[4:])] = [port.get("HostIP") or "127.0.0.1", int(port["Value"])]
        return out

    def _watch(self, sbs: Sandboxes, sandbox_id: str, timeout: float) -> None:
        sbs.done[sandbox_id] = asyncio.Event()
        loop = asyncio.get_running_loop()
        sbs.tasks[sandbox_id] = [loop.create_task(self._wait_alloc(sbs, sandbox_id)),
                                 loop.create_task(self._expire(sbs, sandbox_id, timeout))]

    async def _wait_alloc(self, sbs: Sandboxes, sandbox_id: str) -> None:
        """Poll the allocation; its task's end is the sandbox's end, its exit code the return
        code. The finished job is purged after MCTL_SANDBOX_KEEP_S (its logs with it)."""
        alloc_id = self.allocs[sandbox_id]
        jid, ns = self._job(sbs, sandbox_id)
        try:
            while True:
                try:
                    allocs = await self.api.allocations(jid, ns)
                except NomadError as exc:
                    log.warning("sandbox %s: listing allocations of %s: %s", sandbox_id, jid, exc)
                    await asyncio.sleep(self.scheduler.poll_interval)
                    continue
                alloc = _newest(allocs or [], alloc_id)
                if alloc is None or _ended(alloc):
                    break
                await asyncio.sleep(self.scheduler.poll_interval)
        except asyncio.CancelledError:
            return
        code = exit_code(alloc) if alloc is not None else None
        self.allocs.pop(sandbox_id, None)
        log.info("sandbox %s: Nomad allocation %s ended %s (exit code %s)", sandbox_id, alloc_id,
                 (alloc or {}).get("ClientStatus", "gone"), code)
        sbs._finish(sandbox_id, "finished", code)
        self._purge_later(sbs, sandbox_id)

    def _purge_later(self, sbs: Sandboxes, sandbox_id: str) -> None:
        from mctl.core.server.sandboxes import KEEP_FINISHED_S

        jid, ns = self._job(sbs, sandbox_id)
        variable = self._has_variable(sbs, sandbox_id)
        loop = asyncio.get_running_loop()
        loop.call_later(KEEP_FINISHED_S,
                        lambda: loop.create_task(self._purge(jid, ns, variable)))

    async def _expire(self, sbs: Sandboxes, sandbox_id: str, timeout: float) -> None:
        await asyncio.sleep(timeout)
        if sbs._state(sandbox_id) == "running":
            sbs._finish(sandbox_id, "timeout", -1)
            await self._cancel(sandbox_id, sbs)

    def _job(self, sbs: Sandboxes, sandbox_id: str) -> tuple[str, str]:
        config = sbs.config(sandbox_id)
        return (config.get("nomad_job") or job_id(sandbox_id),
                config.get("nomad_namespace") or self.namespace)

    def _has_variable(self, sbs: Sandboxes, sandbox_id: str) -> bool:
        return bool(sbs.config(sandbox_id).get("nomad_variable"))

    async def _purge(self, jid: str, ns: str, variable: bool) -> None:
        try:
            await self.api.purge(jid, ns)
            if variable:
                await self.api.delete_variable(jid, ns)
        except NomadError as exc:
            log.warning("could not deregister the sandbox job %s: %s", jid, exc)

    async def _cancel(self, sandbox_id: str, sbs: Sandboxes | None = None) -> None:
        """Stop the sandbox: deregister its job with purge (Nomad kills the task, SIGKILL)."""
        if sbs is None:
            from mctl.core.server.sandboxes import sandboxes

            sbs = sandboxes(self.control)
        self.allocs.pop(sandbox_id, None)
        jid, ns = self._job(sbs, sandbox_id)
        await self._purge(jid, ns, self._has_variable(sbs, sandbox_id))

    async def terminate(self, sbs: Sandboxes, sandbox_id: str) -> dict[str, Any]:
        await self.ready()
        rec = sbs._row(sandbox_id)
        if rec["state"] == "running":
            sbs._finish(sandbox_id, "terminated", 137)
        await self._cancel(sandbox_id, sbs)
        return sbs._row(sandbox_id)

    async def logs(self, sbs: Sandboxes, sandbox_id: str) -> dict[str, str]:
        """The task's stdout and stderr through Nomad's client fs API, while its allocation is
        kept (a terminated sandbox's job is purged, its logs with it)."""
        from mctl.exception import NotFoundError

        sbs._row(sandbox_id)
        await self.ready()
        alloc_id = self._alloc(sbs, sandbox_id)
        _, ns = self._job(sbs, sandbox_id)
        out: dict[str, str] = {}
        try:
            if not alloc_id:
                raise LookupError("no allocation")
            for kind in ("stdout", "stderr"):
                data = b""
                async for chunk in self.api.read_log(alloc_id, TASK, kind, ns):
                    data += chunk
                out[kind] = data.decode(errors="replace")
        except LookupError:
            raise NotFoundError(f"The logs of sandbox {sandbox_id} are gone (Nomad no longer "
                                f"has its allocation {alloc_id or '(none)'}).") from None
        return out

    async def recover(self, sbs: Sandboxes, records: list[dict[str, Any]]) -> None:
        """After a restart: running sandboxes whose job's allocation still runs are watched
        again; one that ended meanwhile gets its exit code; the rest are lost."""
        try:
            await self._recover(sbs, records)
        finally:
            if self.recovered is None:
                self.recovered = asyncio.Event()
            self.recovered.set()

    async def _recover(self, sbs: Sandboxes, records: list[dict[str, Any]]) -> None:
        from mctl.plugins.sandbox_slurm import control_plane_mark

        mark = control_plane_mark(sbs.control)
        jobs: dict[str, dict[str, Any]] = {}
        for ns in sorted({self._job(sbs, r["sandbox_id"])[1] for r in records}):
            try:
                listed = await self.api.jobs("mctl-sb-", ns) or []
            except NomadError as exc:
                log.warning("could not list Nomad jobs to recover sandboxes: %s", exc)
                listed = []
            for job in listed:
                meta = job.get("Meta") or {}
                if meta.get("mctl.sandbox") and meta.get("mctl.cp") == mark:
                    jobs[meta["mctl.sandbox"]] = job
        for rec in records:
            sandbox_id = rec["sandbox_id"]
            jid, ns = self._job(sbs, sandbox_id)
            alloc = None
            if sandbox_id in jobs:
                try:
                    alloc = _newest(await self.api.allocations(jid, ns) or [],
                                    rec.get("container_id"))
                except NomadError as exc:
                    log.warning("sandbox %s: %s", sandbox_id, exc)
            if alloc is not None and not _ended(alloc):
                self.allocs[sandbox_id] = alloc["ID"]
                left = rec["created"] + rec["timeout"] - time.time()
                self._watch(sbs, sandbox_id, max(0.0, left))
                log.info("sandbox %s: adopted Nomad allocation %s", sandbox_id, alloc["ID"])
            elif alloc is not None:
                timed_out = time.time() >= rec["created"] + rec["timeout"]
                sbs._update(sandbox_id, state="timeout" if timed_out else "finished",
                            returncode=-1 if timed_out else exit_code(alloc), ended=time.time())
                self._purge_later(sbs, sandbox_id)
            else:
                sbs._update(sandbox_id, state="lost", ended=time.time())
                await self._purge(jid, ns, self._has_variable(sbs, sandbox_id))

    # --- commands: Nomad's alloc exec WebSocket ------------------------------------------------
    async def _exec(self, sbs: Sandboxes, sandbox_id: str, cmd: list[str]) -> Any:
        alloc_id = self.allocs.get(sandbox_id)
        if alloc_id is None:
            raise InvalidError(f"Sandbox {sandbox_id} has no running Nomad allocation.")
        _, ns = self._job(sbs, sandbox_id)
        return await self.api.exec_socket(exec_path(alloc_id, cmd), ns)

    async def run_in(self, sbs: Sandboxes, sandbox_id: str, cmd: list[str],
                     timeout: float = 60) -> tuple[int, str, str]:
        """Run a command in the sandbox (no stdin) and collect it: (exit code, stdout,
        stderr); 124 when it did not finish within `timeout`."""
        from aiohttp import WSMsgType

        out, err = bytearray(), bytearray()
        code = None

        async def run() -> None:
            nonlocal code
            ws = await self._exec(sbs, sandbox_id, cmd)
            try:
                await ws.send_str(stdin_frame(None))
                async for msg in ws:
                    if msg.type != WSMsgType.TEXT:
                        continue
                    kind, data = read_frame(msg.data)
                    if kind == "stdout":
                        out.extend(data)  # type: ignore[arg-type]
                    elif kind == "stderr":
                        err.extend(data)  # type: ignore[arg-type]
                    elif kind == "exit":
                        code = data  # type: ignore[assignment]
                        break
            finally:
                await ws.close()

        try:
            await asyncio.wait_for(run(), timeout)
        except asyncio.TimeoutError:
            return 124, out.decode(errors="replace"), f"no exit within {timeout:g}s"
        if code is None:
            return 1, out.decode(errors="replace"), "Nomad closed the exec without an exit code"
        return int(code), out.decode(errors="replace"), err.decode(errors="replace")

    async def relay(self, sbs: Sandboxes, rec: dict[str, Any], req: dict[str, Any],
                    env: dict[str, str], ws: web.WebSocketResponse) -> None:
        """The relay's work for a sandbox on Nomad (core/server/sandbox_relay): `{"logs":
        true}` follows the task's logs; an exec runs through Nomad's alloc exec WebSocket."""
        from aiohttp import WSMsgType

        from mctl.core.server.sandbox_relay import STDERR, STDOUT, _send

        sandbox_id = rec["sandbox_id"]
        if req.get("logs"):
            await self._follow(sbs, rec, ws)
            return
        marker = f"mctl-env-{secrets.token_hex(8)}"
        kill_marker = sandbox_runtime.exec_marker()
        cmd = exec_command(list(req["exec"]), marker=marker, kill_marker=kill_marker,
                           workdir=req.get("workdir"))
        preamble = env_preamble(env, marker)
        nomad = await self._exec(sbs, sandbox_id, cmd)
        code: int | None = None

        async def from_nomad() -> None:
            nonlocal code
            async for msg in nomad:
                if msg.type != WSMsgType.TEXT:
                    continue
                kind, data = read_frame(msg.data)
                if kind in ("stdout", "stderr"):
                    await _send(ws, bytes([STDOUT if kind == "stdout" else STDERR]),
                                data)  # type: ignore[arg-type]
                elif kind == "exit":
                    code = data  # type: ignore[assignment]
                    return

        async def from_client() -> None:
            await nomad.send_str(stdin_frame(preamble))
            async for msg in ws:
                if nomad.closed:
                    break
                if msg.type == WSMsgType.BINARY:
                    await nomad.send_str(stdin_frame(msg.data))
                elif msg.type == WSMsgType.TEXT and json.loads(msg.data).get("eof"):
                    await nomad.send_str(stdin_frame(None))

        reader = asyncio.ensure_future(from_nomad())
        feeder = asyncio.ensure_future(from_client())
        timeout = req.get("timeout")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(timeout) if timeout is not None else None
        timed_out = kill = False
        try:
            done, _ = await asyncio.wait([reader, feeder], return_when=asyncio.FIRST_COMPLETED,
                                         timeout=float(timeout) if timeout is not None else None)
            if reader not in done and feeder in done and feeder.exception() is not None:
                # Nomad's socket failed under a write: what it said last is on its way
                left = None if deadline is None else max(0.0, deadline - loop.time())
                done, _ = await asyncio.wait([reader], timeout=left)
            if reader in done:
                reader.result()
            else:  # the timeout, or the client went away: the command goes either way
                timed_out = feeder not in done
                kill = True
        finally:
            feeder.cancel()
            reader.cancel()
            await nomad.close()
        if kill:
            await self.run_in(sbs, sandbox_id, sandbox_runtime.kill_marked_command(kill_marker), timeout=30)
        if not timed_out and code is None:
            if kill or ws.closed:
                return
            raise InvalidError(f"Nomad closed the exec in sandbox {sandbox_id} without an exit "
                               "code (its allocation may have stopped).")
        if not ws.closed:
            await ws.send_json({"exit": -1 if timed_out else code})

    async def _follow(self, sbs: Sandboxes, rec: dict[str, Any],
                      ws: web.WebSocketResponse) -> None:
        """The main command's stdout and stderr as they come, until its allocation ends."""
        from mctl.core.server.sandbox_relay import STDERR, STDOUT, _send

        sandbox_id = rec["sandbox_id"]
        alloc_id = self._alloc(sbs, sandbox_id)
        _, ns = self._job(sbs, sandbox_id)

        async def pump(kind: str, channel: int) -> None:
            try:
                async for chunk in self.api.read_log(alloc_id or "", TASK, kind, ns,
                                                     follow=True):
                    await _send(ws, bytes([channel]), chunk)
            except LookupError:
                return

        pumps = [asyncio.ensure_future(pump("stdout", STDOUT)),
                 asyncio.ensure_future(pump("stderr", STDERR))]
        done = sbs.done.setdefault(sandbox_id, asyncio.Event())
        ended = asyncio.ensure_future(done.wait())
        try:
            await asyncio.wait([asyncio.gather(*pumps), ended],
                               return_when=asyncio.FIRST_COMPLETED)
            if ended.done():  # what Nomad still has to send, briefly
                await asyncio.wait(pumps, timeout=2)
        finally:
            for task in (*pumps, ended):
                task.cancel()
        if not ws.closed:
            await ws.send_json({"exit": 0})


def backend_for(control: Any) -> NomadSandboxes | None:
    """A Nomad sandbox backend when the control plane schedules on Nomad, else None
    (`Sandboxes.cluster` makes it once, unless MCTL_SANDBOX_BACKEND is `local`)."""
    from mctl.plugins.scheduler_nomad import NomadScheduler

    scheduler = getattr(control, "scheduler", None)
    if not isinstance(scheduler, NomadScheduler):
        return None
    return NomadSandboxes(scheduler, control)
