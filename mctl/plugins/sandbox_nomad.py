"""Sandboxes as Nomad jobs: what a sandbox looks like on a Nomad cluster, and the alloc exec
protocol its commands would travel over. Contract-level: Nomad cannot be obtained on the
project's machines, so every job rendered here is checked against Nomad's Go API types and the
drivers' documented config keys by tools/nomad-jobcheck (tests/test_sandbox_nomad.py), and the exec
frames against `api.ExecStreamingInput` / `api.ExecStreamingOutput`. The control plane does not
submit these jobs yet (the Slurm backend, plugins/sandbox_slurm, is the one that runs).

One sandbox is one batch job (`mctl-sandbox-<id>`), one group, one task `sandbox`:
- driver `docker` (default) with `runtime = "runsc"` for gVisor or `"runc"`; driver `podman`
  has no per-task runtime, so a gVisor job is constrained to nodes whose operator set podman's
  default runtime to runsc and says so in the node's meta (`mctl_sandbox_runtime = "runsc"`);
- `network_mode = "none"` unless the sandbox asked for network or ports (then a bridge with the
  ports mapped); a `cidr_allowlist` is refused (the drivers have no egress filter); every capability dropped, `no-new-privileges`, user 65534, `init`, a pids
  limit; cpu (MHz), memory and GPUs (`nvidia/gpu` devices) as the task's resources;
- no restarts or reschedules (a sandbox that ends has ended), `kill_timeout` short: terminate
  is a kill; the control plane ends it at its timeout (Nomad has no run-time limit for a task);
- secrets by name from Vault templates, as workers get them; never values in the job.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any
from urllib.parse import quote

from mctl.core import sandbox_runtime
from mctl.core.sandbox_runtime import SandboxConfig
from mctl.exception import InvalidError

TASK = "sandbox"
KILL_TIMEOUT_S = 5
NS = 1_000_000_000
RUNTIME_META = "mctl_sandbox_runtime"


def job_id(sandbox_id: str) -> str:
    return "mctl-" + sandbox_id.lower().replace("_", "-")


def render_sandbox(cfg: SandboxConfig, isolation: str, *, app_id: str, options: Any = None,
                   gpu: str | None = None, secret_names: tuple[str, ...] = (),
                   driver: str | None = None) -> dict[str, Any]:
    """The job register request (`{"Job": ...}`) of one sandbox. `options`: NomadOptions."""
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
    needs_network = bool(cfg.ports) or not cfg.block_network
    pids = cfg.pids or sandbox_runtime.DEFAULT_PIDS
    command = cfg.command or ["sleep", "infinity"]
    config: dict[str, Any] = {
        "image": cfg.image, "command": command[0], "args": list(command[1:]),
        "cap_drop": ["ALL"], "security_opt": ["no-new-privileges"], "init": True,
        "hostname": "sandbox", "network_mode": "bridge" if needs_network else "none"}
    constraints = []
    if driver == "docker":
        config["runtime"] = "runsc" if isolation == "gvisor" else "runc"
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
    try:
        request = GpuRequest.parse(gpu)
    except ValueError as exc:
        raise InvalidError(str(exc)) from None
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
    if secret_names:
        task["Vault"] = {"Role": opts.vault_role or "mctl-sandboxes", "ChangeMode": "noop"}
        task["Templates"] = _secret_templates(tuple(secret_names), opts)
    group["Tasks"] = [task]
    jid = job_id(cfg.sandbox_id)
    job: dict[str, Any] = {
        "ID": jid, "Name": jid, "Type": "batch", "Namespace": opts.namespace,
        "Region": opts.region, "Datacenters": list(opts.datacenters),
        "Meta": {"mctl.sandbox": cfg.sandbox_id, "mctl.app_id": app_id},
        "TaskGroups": [group]}
    if opts.node_pool:
        job["NodePool"] = opts.node_pool
    all_constraints = [{"LTarget": a, "Operand": o, "RTarget": v}
                       for a, o, v in opts.constraints] + constraints
    if all_constraints:
        job["Constraints"] = all_constraints
    return {"Job": job}


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
