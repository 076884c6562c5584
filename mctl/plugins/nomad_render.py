"""Render an app's functions as Nomad jobs: the JSON bodies of `PUT /v1/jobs` (Nomad's
`api.JobRegisterRequest`, field names exactly as its Go types define them).

Each function becomes a service job `mctl-<app>-<function>` whose one task group `workers` runs
mctl's worker runtime, with a `scaling` block for nomad-autoscaler; a `schedule=` adds a periodic
batch job `mctl-<app>-<function>-schedule` that spawns one call of the function. Durations are
integer nanoseconds, as in Nomad's JSON. Nothing here contacts anything: `mctl nomad render` and
the `nomad` scheduler backend share it, and tools/nomad-jobcheck checks its output against Nomad's
own API types.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from mctl.exception import InvalidError

if TYPE_CHECKING:
    from mctl.core.launch import LaunchSpec
    from mctl.core.spec import FunctionSpec, ScheduleSpec

NS = 1_000_000_000  # Nomad's JSON durations are nanoseconds
SPEC_META = "mctl.spec"  # job meta: spec_hash, how the backend finds a rollback's job version
GROUP = "workers"
TASK = "worker"
DRIVERS = ("docker", "podman", "exec", "raw_exec")
OPERATORS = ("=", "!=", ">", ">=", "<", "<=", "regexp", "version", "semver", "set_contains",
             "set_contains_any", "is_set", "is_not_set", "distinct_hosts", "distinct_property")
# Options a function may override: `function.<tag>.<option>=value`.
PER_FUNCTION = ("namespace", "datacenters", "node_pool", "constraints", "driver", "gpu_fallback",
                "default_max_containers", "default_image", "image_registry_secret", "mctl_source")


@dataclass(frozen=True)
class NomadOptions:
    """The nomad plugin's options (`--scheduler-option KEY=VALUE`, `mctl nomad render -o`)."""

    namespace: str = "default"
    region: str = "global"
    datacenters: tuple[str, ...] = ("*",)
    node_pool: str | None = None
    constraints: tuple[tuple[str, str, str], ...] = ()
    driver: str | None = None           # None: docker for an image reference, else raw_exec
    python: str = "python3"             # the interpreter an exec/raw_exec task runs
    image_registry: str | None = None   # where built images live: <registry>/mctl:<image id>
    default_image: str | None = None    # the image of functions with mctl's default image
    image_registry_secret: str | None = None  # a secret (Vault) with REGISTRY_USERNAME/PASSWORD
    mctl_source: str = "host"           # host: bind the node's mctl env into the container;
                                        # image: the image has mctl installed
    autoscaler: str = "mctl"            # who scales: mctl (core, through /scale) or nomad
    evaluation_interval_s: float = 10.0
    prometheus_job: str = ""            # an extra label matcher, e.g. job="mctl"
    secrets_from: str = "vault"         # vault: Vault templates; control-plane: workers fetch
    vault_role: str | None = None       # default mctl-<app>
    vault_kv_path: str = "secret/data/mctl"
    volume_type: str = "host"           # host or csi
    cpu_mhz_per_core: int = 1000
    default_cpu: float = 1.0
    default_memory_mb: int = 1024
    default_max_containers: int = 100
    gpu_fallback: tuple[str, ...] = ()
    server_url: str = "http://127.0.0.1:8600"  # used by `render` only; a backend's launch has it
    functions: dict[str, dict[str, str]] = field(default_factory=dict)

    KEYS = ("namespace", "region", "datacenters", "node_pool", "constraints", "driver", "python",
            "image_registry", "default_image", "image_registry_secret", "mctl_source",
            "autoscaler", "evaluation_interval", "prometheus_job",
            "secrets_from", "vault_role", "vault_kv_path", "volume_type", "cpu_mhz_per_core",
            "default_cpu", "default_memory_mb", "default_max_containers", "gpu_fallback",
            "server_url")

    @classmethod
    def parse(cls, options: dict[str, Any], extra: tuple[str, ...] = ()) -> NomadOptions:
        """Options as strings (from a command line or server.toml); unknown keys are refused.
        `extra`: keys the caller handles itself (the backend's connection settings)."""
        from mctl.core.plugin_types import check_options

        functions: dict[str, dict[str, str]] = {}
        plain: dict[str, Any] = {}
        for key, value in options.items():
            if key.startswith("function."):
                tag, _, name = key[len("function."):].rpartition(".")
                if not tag or name not in PER_FUNCTION:
                    raise InvalidError(f"Option {key!r} is not function.<tag>.<option> with one of "
                                       f"{', '.join(PER_FUNCTION)}.")
                functions.setdefault(tag, {})[name] = str(value)
            else:
                plain[key] = value
        check_options("nomad", plain, cls.KEYS + extra)
        return cls()._with(plain, functions)

    def _with(self, values: dict[str, Any], functions: dict[str, dict[str, str]] | None = None
              ) -> NomadOptions:
        changes: dict[str, Any] = {}
        for key, value in values.items():
            value = str(value).strip()
            if key in ("datacenters", "gpu_fallback"):
                changes[key] = tuple(p.strip() for p in value.split(",") if p.strip())
            elif key == "constraints":
                changes[key] = tuple(_constraint(c) for c in value.split(";") if c.strip())
            elif key in ("cpu_mhz_per_core", "default_memory_mb", "default_max_containers"):
                changes[key] = _number(key, value, int)
            elif key == "default_cpu":
                changes[key] = _number(key, value, float)
            elif key == "evaluation_interval":
                changes["evaluation_interval_s"] = _number(key, value, float)
            elif key in self.KEYS:
                optional = key in ("node_pool", "driver", "vault_role", "image_registry",
                                   "default_image", "image_registry_secret")
                changes[key] = (value or None) if optional else value
        if functions is not None:
            changes["functions"] = functions
        opts = replace(self, **changes)
        opts._validate()
        return opts

    def _validate(self) -> None:
        if self.driver is not None and self.driver not in DRIVERS:
            raise InvalidError(f"driver={self.driver!r} is not a Nomad task driver mctl renders; "
                               f"choose one of {', '.join(DRIVERS)}.")
        for key, value, allowed in (("autoscaler", self.autoscaler, ("mctl", "nomad")),
                                    ("secrets_from", self.secrets_from, ("vault", "control-plane")),
                                    ("volume_type", self.volume_type, ("host", "csi")),
                                    ("mctl_source", self.mctl_source, ("host", "image"))):
            if value not in allowed:
                raise InvalidError(f"{key}={value!r} is not one of {', '.join(allowed)}; "
                                   f"set {key} to one of them.")
        if not self.datacenters:
            raise InvalidError("datacenters is empty; name at least one (e.g. dc1, or * for all).")

    def for_function(self, tag: str) -> NomadOptions:
        """These options with the function's own overrides applied."""
        own = self.functions.get(tag)
        return self._with(own) if own else self


def _number(key: str, value: str, kind: type) -> Any:
    try:
        number = kind(value)
    except ValueError:
        raise InvalidError(f"{key}={value!r} is not a number; give e.g. {key}=2.") from None
    if number <= 0:
        raise InvalidError(f"{key}={value!r} must be positive.")
    return number


def _constraint(text: str) -> tuple[str, str, str]:
    """`${attr.kernel.name} = linux` -> (attribute, operator, value)."""
    parts = text.strip().split(None, 2)
    if len(parts) == 2 and parts[1] in ("is_set", "is_not_set", "distinct_hosts"):
        parts.append("")
    if len(parts) != 3 or parts[1] not in OPERATORS:
        raise InvalidError(f"Constraint {text.strip()!r} is not 'ATTRIBUTE OPERATOR VALUE'; write "
                           "e.g. '${attr.kernel.name} = linux' (separate several with ';').")
    return parts[0], parts[1], parts[2]


# --- names ---------------------------------------------------------------------------------------
def job_id(app_name: str, tag: str) -> str:
    """`mctl-<app>-<function>`, lowercased, in the characters Nomad accepts in an ID. A name that
    had to change beyond case and '_' gets a short hash, so two odd names cannot collide."""
    natural = f"mctl-{app_name}-{tag}".replace("_", "-").lower()
    clean = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9.-]+", "-", natural)).strip("-.")
    if clean != natural or len(clean) > 90:
        clean = f"{clean[:80].rstrip('-.')}-{hashlib.sha256(natural.encode()).hexdigest()[:6]}"
    return clean


def vault_role(app_name: str) -> str:
    """The per-app Vault role (and policy) whose tokens read only this app's secrets."""
    return "mctl-" + (re.sub(r"[^a-z0-9-]+", "-", app_name.lower()).strip("-") or "app")


def _volume_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "volume"


# --- schedules -----------------------------------------------------------------------------------
def cron_for(schedule: ScheduleSpec) -> tuple[str, str]:
    """(cron spec, time zone) for Nomad's periodic block. A Period becomes the cron expression that
    fires at the same interval (on the clock, not counted from the deploy); a Period no cron
    expression can express is refused."""
    if schedule.kind == "cron":
        assert schedule.cron is not None
        return schedule.cron, schedule.timezone
    seconds = float(schedule.seconds or 0)
    whole = int(seconds)
    spec = None
    if whole == seconds and whole > 0:
        minutes, hours, days = whole / 60, whole / 3600, whole / 86400
        if whole < 60 and 60 % whole == 0:
            spec = f"*/{whole} * * * * * *"  # cronexpr's seven fields: seconds first, year last
        elif minutes.is_integer() and minutes < 60 and 60 % minutes == 0:
            spec = f"*/{int(minutes)} * * * *" if minutes > 1 else "* * * * *"
        elif hours.is_integer() and hours < 24 and 24 % hours == 0:
            spec = f"0 */{int(hours)} * * *" if hours > 1 else "0 * * * *"
        elif days == 1:
            spec = "0 0 * * *"
        elif days == 7:
            spec = "0 0 * * 0"
    if spec is None:
        raise InvalidError(
            f"A Period of {seconds:g} seconds cannot be written as a cron expression, which "
            "Nomad's periodic jobs need; use Cron(...) instead, e.g. Cron('0 */6 * * *') for "
            "every six hours.")
    return spec, "UTC"


# --- the jobs ------------------------------------------------------------------------------------
def _ns(seconds: float) -> int:
    return int(round(seconds * NS))


def _driver(launch: LaunchSpec, image_ref: str | None, opts: NomadOptions,
            pull_secret: str | None) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(driver, its config, extra task env). In a container, mctl's worker runs with the image's
    Python: from the node's own mctl environment bound read-only at the control plane's paths
    (mctl_source=host, as the local and Slurm backends do), or from the image
    (mctl_source=image)."""
    command, args = launch.command[0], list(launch.command[1:])
    driver = opts.driver or ("docker" if image_ref else "raw_exec")
    if driver not in ("docker", "podman"):
        python = opts.python if image_ref else command
        return driver, {"command": python, "args": args}, {}
    if not image_ref:
        raise InvalidError(f"driver={driver} needs a container image, but function "
                           f"{launch.function} has none; set image_registry, give it an "
                           "Image.from_registry(...) image, or use driver=raw_exec.")
    config: dict[str, Any] = {"image": image_ref, "command": opts.python, "args": args}
    env: dict[str, str] = {}
    if opts.mctl_source == "host":
        import json

        from mctl.plugins.containers import BOOT, host_python_dirs

        dirs = host_python_dirs()
        config["args"] = ["-c", BOOT]
        config["volumes"] = [f"{d}:{d}:ro" for d in dirs] + [
            f"{host}:{inside}:ro" for host, inside in launch.files]
        env["MCTL_HOST_SITE"] = json.dumps(dirs)
    if pull_secret:  # the values come from Vault at start (template env), never in the job
        config["auth"] = [{"username": "${REGISTRY_USERNAME}",
                           "password": "${REGISTRY_PASSWORD}"}]
    return driver, config, env


def _gpu_device(launch: LaunchSpec, opts: NomadOptions) -> dict[str, Any] | None:
    gpu = launch.gpu
    if gpu is None:
        return None
    device: dict[str, Any] = {"Name": "nvidia/gpu", "Count": gpu.count}
    types = [t for t in (gpu.type, *opts.gpu_fallback) if t]
    patterns = ["(?i)" + ".*".join(re.escape(p) for p in t.split("-")) for t in types]
    if len(patterns) == 1:
        device["Constraints"] = [{"LTarget": "${device.model}", "Operand": "regexp",
                                  "RTarget": patterns[0]}]
    elif patterns:  # any of them may run it; the first named is preferred, then the next, ...
        device["Constraints"] = [{"LTarget": "${device.model}", "Operand": "regexp",
                                  "RTarget": "(?i)(" + "|".join(p[4:] for p in patterns) + ")"}]
        device["Affinities"] = [{"LTarget": "${device.model}", "Operand": "regexp",
                                 "RTarget": p, "Weight": max(1, 100 - 100 * i // len(patterns))}
                                for i, p in enumerate(patterns)]
    return device


def _token_template(job_ids: tuple[str, ...], version_from_variable: bool) -> dict[str, Any]:
    """The worker's task token comes from the job's Nomad Variable (written by the backend), never
    from the job itself: job specs are readable by anyone who may read the job. So does the app
    version the backend runs (`version_from_variable`), which keeps the job's spec the same for
    the same function spec: a rollback can revert to the job version that ran it."""
    version = "MCTL_APP_VERSION={{ .app_version }}\n" if version_from_variable else ""
    return {"EmbeddedTmpl": f'{{{{ with nomadVar "nomad/jobs/{job_ids[0]}" }}}}'
                            f"MCTL_TASK_TOKEN={{{{ .task_token }}}}\n{version}{{{{ end }}}}\n",
            "DestPath": "secrets/mctl-task.env", "Envvars": True, "ChangeMode": "noop"}


def spec_hash(job: dict[str, Any]) -> str:
    """What makes two job versions run the same function spec: the job without its counts (the
    scale API changes them) and without the app version it was registered for."""
    import json

    def without(d: dict[str, Any] | None, *keys: str) -> dict[str, Any] | None:
        return None if d is None else {k: v for k, v in d.items() if k not in keys}

    groups = []
    for group in job.get("TaskGroups", []):
        tasks = [{**task, "Env": without(task.get("Env"), "MCTL_APP_VERSION")}
                 for task in group.get("Tasks", [])]
        groups.append({**without(group, "Count"), "Tasks": tasks,
                       "Meta": without(group.get("Meta"), "mctl.version")})
    plain = {**job, "TaskGroups": groups,
             "Meta": without(job.get("Meta"), "mctl.version", SPEC_META)}
    text = json.dumps(plain, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _secret_templates(names: tuple[str, ...], opts: NomadOptions) -> list[dict[str, Any]]:
    out = []
    for name in names:
        path = f"{opts.vault_kv_path.rstrip('/')}/{name}"
        out.append({"EmbeddedTmpl": f'{{{{ with secret "{path}" }}}}{{{{ range $k, $v := '
                                    '.Data.data }}{{ $k }}={{ $v | toJSON }}\n{{ end }}{{ end }}',
                    "DestPath": f"secrets/{_volume_key(name)}.env", "Envvars": True,
                    "ChangeMode": "restart"})
    return out


def _task(launch: LaunchSpec, fspec: FunctionSpec, opts: NomadOptions, image_ref: str | None,
          jid: str, pull_secret: str | None, version_from_variable: bool, *,
          trigger: bool = False) -> dict[str, Any]:
    driver, config, extra_env = _driver(launch, image_ref, opts, pull_secret)
    # Nomad mounts volumes itself (host or CSI volumes named after mctl's): no working copies.
    hidden = ("MCTL_TASK_TOKEN", "MCTL_VOLUMES", "MCTL_VOLUME_SYNC") + (
        ("MCTL_APP_VERSION",) if version_from_variable else ())
    env = {k: v for k, v in launch.env.items() if k not in hidden}
    env.update(extra_env)
    if trigger:  # a periodic run spawns one call; the service job's workers run it
        spawn = f"mctl.Function.from_name({launch.app_name!r}, {fspec.tag!r}).spawn()"
        if "MCTL_HOST_SITE" in env:  # in an image, with the node's mctl on sys.path
            config["args"] = ["-c", "import json, os, site; [site.addsitedir(d) for d in "
                              "json.loads(os.environ.pop('MCTL_HOST_SITE'))]; import mctl; "
                              + spawn]
        else:
            config["args"] = ["-c", "import mctl; " + spawn]
        cpu, memory = 100, 256
    else:
        env["MCTL_TASK_ID"] = env["MODAL_TASK_ID"] = "ta-${NOMAD_ALLOC_ID}"
        cpu = max(1, round((launch.cpu or opts.default_cpu) * opts.cpu_mhz_per_core))
        memory = max(10, launch.memory_mb or opts.default_memory_mb)
    resources: dict[str, Any] = {"CPU": cpu, "MemoryMB": memory}
    device = None if trigger else _gpu_device(launch, opts)
    if device:
        resources["Devices"] = [device]
    task: dict[str, Any] = {
        "Name": "trigger" if trigger else TASK, "Driver": driver, "Config": config, "Env": env,
        "Resources": resources, "KillSignal": "SIGTERM",
        # a worker drains on SIGTERM: its running inputs may take up to the function's timeout
        "KillTimeout": _ns(min(launch.timeout_s + 5, 3600)),
        "Templates": [_token_template((jid,), version_from_variable)],
        "Meta": {"mctl.task": "trigger" if trigger else "worker"}}
    secrets = launch.secret_refs if opts.secrets_from == "vault" and not trigger else ()
    if pull_secret and pull_secret not in secrets:
        secrets += (pull_secret,)
    if secrets:
        task["Vault"] = {"Role": opts.vault_role or vault_role(launch.app_name),
                         "ChangeMode": "restart"}
        task["Templates"] += _secret_templates(secrets, opts)
    if fspec.volumes and not trigger:
        task["VolumeMounts"] = [{"Volume": _volume_key(name), "Destination": path,
                                 "ReadOnly": _read_only(fspec, path)}
                                for path, name in sorted(fspec.volumes.items())]
    return task


def _read_only(fspec: FunctionSpec, path: str) -> bool:
    """`vol.read_only()` at this mount path."""
    return path.rstrip("/") in {p.rstrip("/") for p in fspec.read_only_volumes}


def _volumes(fspec: FunctionSpec, opts: NomadOptions) -> dict[str, Any]:
    """The group's volume requests: read-only when every mount of the volume is (a CSI volume
    is then claimed `multi-node-reader-only`, which Nomad allows only read-only), so a node
    never gets write access the function did not ask for."""
    out = {}
    for name in sorted(set(fspec.volumes.values())):
        key = _volume_key(name)
        read_only = all(_read_only(fspec, path) for path, n in fspec.volumes.items() if n == name)
        volume = {"Name": key, "Type": opts.volume_type, "Source": name, "ReadOnly": read_only}
        if opts.volume_type == "csi":
            volume.update(AccessMode="multi-node-reader-only" if read_only
                          else "multi-node-multi-writer", AttachmentMode="file-system")
        out[key] = volume
    return out


def _meta(launch: LaunchSpec, image_ref: str | None) -> dict[str, str]:
    return {"mctl.app": launch.app_name, "mctl.app_id": launch.app_id,
            "mctl.version": str(launch.version), "mctl.function": launch.function,
            "mctl.function_id": launch.function_id, "mctl.image_id": launch.image_id,
            "mctl.image": image_ref or launch.command[0]}


def _job(launch: LaunchSpec, opts: NomadOptions, jid: str, kind: str) -> dict[str, Any]:
    job: dict[str, Any] = {"ID": jid, "Name": jid, "Type": kind, "Namespace": opts.namespace,
                           "Region": opts.region, "Datacenters": list(opts.datacenters)}
    if opts.node_pool:
        job["NodePool"] = opts.node_pool
    if opts.constraints:
        job["Constraints"] = [{"LTarget": a, "Operand": o, "RTarget": v}
                              for a, o, v in opts.constraints]
    return job


def _scaling(launch: LaunchSpec, fspec: FunctionSpec, opts: NomadOptions, count: int,
             maximum: int) -> dict[str, Any]:
    """The group's scaling block: a nomad-autoscaler policy whose metric is core's own rule —
    inputs waiting and running per worker, with the function's target per worker as target."""
    matcher = f'function_id="{launch.function_id}"' + (
        f",{opts.prometheus_job}" if opts.prometheus_job else "")
    query = (f"(sum(mctl_queue_depth{{{matcher}}}) + sum(mctl_inputs_running{{{matcher}}})) / "
             f"clamp_min(sum(mctl_containers{{{matcher}}}), 1)")
    policy = {"cooldown": f"{int(fspec.autoscaling.scaledown_window)}s",
              "evaluation_interval": f"{opts.evaluation_interval_s:g}s",
              "check": [{"queue_depth": [{"source": "prometheus", "query": query,
                                          "strategy": [{"target-value": [{
                                              "target": fspec.target_per_container}]}]}]}]}
    return {"Enabled": opts.autoscaler == "nomad", "Min": count, "Max": maximum,
            "Type": "horizontal", "Policy": policy}


def render_function(launch: LaunchSpec, fspec: FunctionSpec, options: NomadOptions,
                    image_ref: str | None = None, pull_secret: str | None = None, *,
                    version_from_variable: bool = False) -> list[dict[str, Any]]:
    """The register requests of one function version: its service job, then its periodic job if
    it has a schedule. `image_ref`: the container image to run, None for a Python environment;
    `pull_secret`: the secret whose REGISTRY_USERNAME/PASSWORD pull it (default: the
    image_registry_secret option, for images in image_registry); `version_from_variable`: the
    worker's app version comes from the job's Nomad Variable (the backend writes it), not the
    job, so the same function spec renders the same job at every app version."""
    opts = options.for_function(fspec.tag)
    if image_ref and pull_secret is None:
        pull_secret = opts.image_registry_secret
    jid = job_id(launch.app_name, fspec.tag)
    scaling = fspec.autoscaling
    count = scaling.min_containers
    maximum = max(count, scaling.max_containers or opts.default_max_containers)
    retries = fspec.retries
    attempts = retries.max_retries if retries else 0
    delay = retries.initial_delay if retries else 1.0
    max_delay = retries.max_delay if retries else 60.0
    group = {
        "Name": GROUP, "Count": count, "Scaling": _scaling(launch, fspec, opts, count, maximum),
        # a crashed worker restarts in place `retries` times, then Nomad places it elsewhere
        "RestartPolicy": {"Attempts": attempts, "Interval": _ns(max(60.0, 10 * max_delay)),
                          "Delay": _ns(max(delay, 1.0)), "Mode": "fail"},
        "ReschedulePolicy": {"Unlimited": True, "Delay": _ns(max(delay, 5.0)),
                             "DelayFunction": "exponential", "MaxDelay": _ns(max(max_delay, 60.0)),
                             "Interval": 0, "Attempts": 0},
        "Meta": _meta(launch, image_ref),
        "Tasks": [_task(launch, fspec, opts, image_ref, jid, pull_secret,
                        version_from_variable)]}
    if fspec.volumes:
        group["Volumes"] = _volumes(fspec, opts)
    service = _job(launch, opts, jid, "service")
    service.update(Meta=_meta(launch, image_ref), TaskGroups=[group],
                   Update={"MaxParallel": 1, "Stagger": _ns(10), "HealthCheck": "task_states",
                           "MinHealthyTime": _ns(5), "HealthyDeadline": _ns(300),
                           "ProgressDeadline": _ns(600), "AutoRevert": True})
    jobs = [{"Job": service}]
    if fspec.schedule is not None:
        spec, zone = cron_for(fspec.schedule)
        pid = f"{jid}-schedule"
        periodic = _job(launch, opts, pid, "batch")
        periodic.update(
            Meta=_meta(launch, image_ref),
            Periodic={"Enabled": True, "SpecType": "cron", "Specs": [spec], "TimeZone": zone,
                      "ProhibitOverlap": True},
            TaskGroups=[{"Name": "trigger", "Count": 1,
                         "RestartPolicy": {"Attempts": 2, "Interval": _ns(300),
                                           "Delay": _ns(10), "Mode": "fail"},
                         "Tasks": [_task(launch, fspec, opts, image_ref, pid, pull_secret,
                                          version_from_variable, trigger=True)]}])
        jobs.append({"Job": periodic})
    for doc in jobs:
        doc["Job"]["Meta"][SPEC_META] = spec_hash(doc["Job"])
    return jobs


# --- from an app spec (no control plane, no builder) -------------------------------------------
def image_ref_for(recipe: dict[str, Any], image_id: str, opts: NomadOptions
                  ) -> tuple[str | None, str | None]:
    """(the container image nodes pull, the secret that pulls it) for a recipe, as the `oci`
    builder would name it: a registry base without build steps runs as is (with its own
    secret); anything else is `<registry>/mctl/<image id>:latest` in image_registry (default
    MCTL_IMAGE_REGISTRY); None runs in a Python environment."""
    import os

    base = recipe.get("base") or {}
    steps = [s for s in recipe.get("steps", []) if s.get("kind") != "env"]
    if base.get("kind") == "registry" and not steps and not base.get("setup"):
        return base["tag"], base.get("secret")
    registry = (opts.image_registry or os.environ.get("MCTL_IMAGE_REGISTRY") or "").rstrip("/")
    if (base or steps) and registry:
        return f"{registry}/mctl/{image_id}:latest", None
    return (None if base or steps else opts.default_image), None


def render_app(app: Any, app_id: str, options: NomadOptions) -> list[dict[str, Any]]:
    """Every job of an `AppSpec`, as `mctl nomad render` and `mctl deploy --dry-run` print them.
    The task token is not in them: the backend writes it to each job's Nomad Variable."""
    from mctl.core.launch import build_launch

    jobs: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for tag, fspec in app.functions.items():
        recipe = app.images[fspec.image_id].recipe if fspec.image_id in app.images else {}
        opts = options.for_function(tag)
        ref, pull_secret = image_ref_for(recipe, fspec.image_id, opts)
        env = {k: v for step in recipe.get("steps", []) if step.get("kind") == "env"
               for k, v in step["vars"].items()}
        launch = build_launch(app_id, app, fspec, 1, server_url=options.server_url,
                              built_image={"python": opts.python, "env": env, "image": ref,
                                           "runtime": "oci" if ref else "process"},
                              task_token=None, environment="main", region=options.region,
                              provider="nomad")
        jid = job_id(app.name, tag)
        if jid in seen:
            raise InvalidError(f"Functions {seen[jid]!r} and {tag!r} would both be Nomad job "
                               f"{jid!r}; rename one of them.")
        seen[jid] = tag
        try:
            jobs.extend(render_function(launch, fspec, options, ref, pull_secret))
        except InvalidError as exc:
            raise InvalidError(f"Function {tag}: {exc}") from None
    return jobs
