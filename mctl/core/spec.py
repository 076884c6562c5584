"""Pydantic models of an app: everything a scheduler needs, validated once, serialisable to JSON."""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any, Literal, Optional, TypeVar

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

MIN_TIMEOUT, MAX_TIMEOUT = 1, 24 * 3600

# The bounds of what a user declares, each with the rule a user reads when breaking it. The spec
# models below use them, and the SDK checks decorator arguments against `DeclaredOptions` and
# `RetryPolicy` (see `validate_declared`), so each bound is written once.
Timeout = Annotated[float, Field(ge=MIN_TIMEOUT, le=MAX_TIMEOUT, description=(
    f"must be between {MIN_TIMEOUT} second and {MAX_TIMEOUT} seconds (24 hours)"))]
ContainerCount = Annotated[int, Field(ge=0, description="must be a non-negative int")]
MaxContainers = Annotated[Optional[int], Field(ge=1, description="must be a positive int")]
ScaledownWindow = Annotated[float, Field(ge=1, le=MAX_TIMEOUT, description=(
    f"must be between 1 and {MAX_TIMEOUT} seconds"))]
Cpu = Annotated[Optional[float], Field(gt=0, le=512, description=(
    "must be a positive number of cores, at most 512"))]
MemoryMb = Annotated[Optional[int], Field(ge=1, description="must be a positive number of MiB")]
Env = Annotated[dict[str, str], Field(description="must be a dict of str to str")]


def _check_container_bounds(min_containers: int, max_containers: int | None) -> None:
    if max_containers is not None and min_containers > max_containers:
        raise ValueError(f"min_containers={min_containers} is greater than "
                         f"max_containers={max_containers}; raise max_containers or lower "
                         "min_containers")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


M = TypeVar("M", bound=BaseModel)


def validate_declared(model: type[M], values: dict[str, Any]) -> M:
    """Build `model` from a user's own arguments, strictly (no "10" for 10); a broken bound
    raises ValueError with one sentence naming the argument: `timeout=0 must be between ...`."""
    try:
        return model.model_validate(values, strict=True)
    except ValidationError as exc:
        error = exc.errors()[0]
        if error["type"] == "value_error":  # a model validator's own sentence
            raise ValueError(str(error["ctx"]["error"])) from None
        name = str(error["loc"][0])
        field = model.model_fields.get(name)
        rule = field.description if field is not None and field.description else error["msg"]
        if name in values and len(error["loc"]) == 1:
            raise ValueError(f"{name}={values[name]!r} {rule}") from None
        raise ValueError(f"{name} {rule}") from None


class RetryPolicy(_Model):
    max_retries: Annotated[int, Field(ge=0, le=10, description="must be an int from 0 to 10")] = 0
    backoff_coefficient: Annotated[float, Field(ge=1.0, le=10.0, description=(
        "must be between 1.0 and 10.0"))] = 2.0
    initial_delay: Annotated[float, Field(ge=0, le=60, description=(
        "must be between 0 and 60 seconds"))] = 1.0
    max_delay: Annotated[float, Field(ge=1, le=60, description=(
        "must be between 1 and 60 seconds"))] = 60.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (1-based)."""
        return min(self.initial_delay * self.backoff_coefficient ** (attempt - 1), self.max_delay)


class DeclaredOptions(_Model):
    """The numeric options of `@app.function(...)` and `@app.cls(...)`, as the user wrote them."""

    timeout: Timeout
    min_containers: ContainerCount
    max_containers: MaxContainers = None
    buffer_containers: ContainerCount = 0
    scaledown_window: ScaledownWindow
    cpu: Cpu = None
    memory: MemoryMb = None
    env: Env = {}

    @model_validator(mode="after")
    def _bounds(self) -> DeclaredOptions:
        _check_container_bounds(self.min_containers, self.max_containers)
        return self


class ScheduleSpec(_Model):
    kind: Literal["cron", "period"]
    cron: Optional[str] = None
    timezone: str = "UTC"
    seconds: Optional[float] = None

    @model_validator(mode="after")
    def _one_of(self) -> ScheduleSpec:
        if self.kind == "cron" and not self.cron:
            raise ValueError("a cron schedule needs a cron string")
        if self.kind == "period" and not (self.seconds and self.seconds > 0):
            raise ValueError("a period schedule needs positive seconds")
        return self


class AutoscalingSpec(_Model):
    min_containers: ContainerCount = 0
    max_containers: MaxContainers = None
    buffer_containers: ContainerCount = 0
    scaledown_window: ScaledownWindow = 60.0

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        _check_container_bounds(self.min_containers, self.max_containers)
        return self


_GPU = re.compile(r"^(?P<type>[A-Za-z0-9][A-Za-z0-9_-]*?)(?::(?P<count>\d+))?$")


class GpuRequest(_Model):
    """`gpu="A100"`, `"A100-80GB:2"` or `"any"`: a device type (None = any) and a count."""

    type: Optional[str] = None
    count: int = Field(1, ge=1, le=16)

    @classmethod
    def parse(cls, value: str | None) -> GpuRequest | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError(f"gpu must be a string such as 'A100' or 'H100:2', not {value!r}")
        match = _GPU.match(value.strip())
        if not match:
            raise ValueError(f"invalid gpu {value!r}; write a type and optional count, "
                             "e.g. 'A100' or 'H100:2'")
        gpu_type = match["type"].upper()
        return cls(type=None if gpu_type == "ANY" else gpu_type, count=int(match["count"] or 1))


# Modal's GPU type names (its GPU guide, 2026); mctl takes any name (a cluster's GRES names are its
# own), and says when one is neither these nor a name the operator mapped (see unknown_gpu).
MODAL_GPU_TYPES = ("T4", "L4", "A10", "A10G", "L40S", "A100", "A100-40GB", "A100-80GB",
                   "RTX-PRO-6000", "H100", "H100!", "H200", "B200", "B200+")


def unknown_gpu(gpu_type: str | None, known: tuple[str, ...] = ()) -> str:
    """A warning for a GPU type that is neither Modal's nor in `known` (a scheduler's own names,
    such as Slurm's gpu_map keys), with the nearest name; '' when the type is known or any."""
    import difflib

    if gpu_type is None:
        return ""
    names = {n.upper() for n in (*MODAL_GPU_TYPES, *known)}
    if gpu_type.upper() in names:
        return ""
    close = difflib.get_close_matches(gpu_type.upper(), sorted(names), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return (f"gpu type {gpu_type!r} is not one of Modal's ({', '.join(MODAL_GPU_TYPES)}) nor a "
            f"name this control plane maps; {hint}mctl passes it on as it is (a cluster may have "
            "its own GPU names)")


class ResourcesSpec(_Model):
    cpu: Cpu = None                  # the request (Modal's `cpu=` or the first of `cpu=(r, l)`)
    memory_mb: MemoryMb = None
    gpu: Optional[GpuRequest] = None  # the first choice of `gpu=` (a str or a list)
    cpu_limit: Cpu = None            # `cpu=(request, limit)`: the most a worker may use
    memory_limit_mb: MemoryMb = None  # `memory=(request, limit)`, MiB
    gpu_fallbacks: list[GpuRequest] = []  # `gpu=["H100", "A100"]`: the later choices, in order

    @model_validator(mode="after")
    def _limits(self) -> ResourcesSpec:
        for name, request, limit in (("cpu", self.cpu, self.cpu_limit),
                                     ("memory", self.memory_mb, self.memory_limit_mb)):
            if limit is not None and request is not None and limit < request:
                raise ValueError(f"{name}=({request:g}, {limit:g}): the limit is less than the "
                                 "request")
        return self


def parse_request_limit(name: str, value: Any) -> tuple[Any, Any]:
    """Modal's `cpu=2` or `cpu=(1, 4)` (request, limit): (request, limit or None)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name}={value!r} must be one number or a (request, limit) pair")
        request, limit = value
        if isinstance(request, (int, float)) and isinstance(limit, (int, float)) \
                and not isinstance(limit, bool) and limit < request:
            raise ValueError(f"{name}={tuple(value)!r}: the limit {limit:g} is less than the "
                             f"request {request:g}")
        return request, limit
    return value, None


def parse_gpus(value: Any) -> tuple[GpuRequest | None, list[GpuRequest]]:
    """`gpu="A100"` or Modal's fallback list `gpu=["H100", "A100-80GB:2"]`: the first choice
    and the rest, in order."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("gpu=[] is empty; name at least one GPU type, e.g. ['H100', 'A100']")
        parsed = [GpuRequest.parse(v) for v in value]
        return parsed[0], [g for g in parsed[1:] if g is not None]
    return GpuRequest.parse(value), []


class WebSpec(_Model):
    """How a web function is served: `@fastapi_endpoint`, `@asgi_app`, `@wsgi_app`, `@web_server`."""

    kind: Literal["fastapi", "asgi", "wsgi", "server"]
    method: str = "GET"              # fastapi_endpoint's HTTP method
    label: Optional[str] = None      # the endpoint's name in its URL instead of the function's
    docs: bool = False               # fastapi_endpoint: serve /docs
    requires_proxy_auth: bool = False
    port: Optional[int] = None       # web_server: the port the user's server listens on
    startup_timeout: float = 5.0     # web_server: seconds to wait for that port

    @field_validator("label")
    @classmethod
    def _label(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$", value):
            raise ValueError(f"invalid web label {value!r}: use letters, digits, '_' and '-'")
        return value


class MethodSpec(_Model):
    is_generator: bool = False
    is_async: bool = False
    web: Optional[WebSpec] = None


class FunctionSpec(_Model):
    tag: str                       # name inside the app ("f" or "Model" for a class)
    function_id: str
    kind: Literal["function", "class"] = "function"
    module: str                    # module name the worker imports from the bundle
    qualname: str
    serialized: bool = False       # function travels as cloudpickle (blob id in pickled_blob)
    pickled_blob: Optional[str] = None
    is_generator: bool = False
    is_async: bool = False
    methods: dict[str, MethodSpec] = {}
    web: Optional[WebSpec] = None  # a web function; for a class, each method says its own
    timeout: Timeout = 300
    retries: Optional[RetryPolicy] = None
    schedule: Optional[ScheduleSpec] = None
    autoscaling: AutoscalingSpec = AutoscalingSpec()
    resources: ResourcesSpec = ResourcesSpec()
    image_id: str
    secrets: list[dict[str, Any]] = []
    volumes: dict[str, str] = {}   # mount path -> volume name
    read_only_volumes: list[str] = []  # the mount paths of `vol.read_only()` volumes
    env: Env = {}
    max_inputs: int = Field(1, ge=1, le=1000)
    target_inputs: Optional[int] = None
    batch_max_size: Optional[int] = None
    batch_wait_ms: Optional[int] = None
    # Modal's `max_inputs=N` / `single_use_containers=True`: a container exits after N inputs.
    container_max_inputs: Optional[int] = Field(None, ge=1)
    # Modal's `restrict_modal_access=True`: the worker's task token may not call functions or
    # reach Dicts, Queues or other objects; it only serves its own inputs.
    restrict_modal_access: bool = False
    # Modal's `block_network=True`: the worker has no network but its path to the control plane.
    block_network: bool = False
    # Set on a variant made by `Cls.with_options`/`with_concurrency`/`with_batching`: the tag of
    # the class it runs (the user's code is found under that tag). See `variant_spec`.
    variant_of: Optional[str] = None

    @property
    def target_per_container(self) -> int:
        return self.target_inputs or self.max_inputs


class ImageSpec(_Model):
    image_id: str
    recipe: dict[str, Any]


class AppSpec(_Model):
    name: str
    module: str
    bundle_blob: Optional[str] = None   # content-addressed source bundle
    source_root: Optional[str] = None   # the bundle's directory on the deployer's machine, for
                                        # tracebacks that name the user's own files
    functions: dict[str, FunctionSpec]
    images: dict[str, ImageSpec] = {}

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", value):
            raise ValueError(f"invalid app name {value!r}: use letters, digits, '.', '_' and '-'")
        return value


def function_id(app_id: str, tag: str) -> str:
    """Stable across versions of a deployed app, so queued inputs survive a redeploy."""
    return "fu-" + hashlib.sha256(f"{app_id}/{tag}".encode()).hexdigest()[:22]


# The FunctionSpec fields a variant (`Cls.with_options(...)`, `with_concurrency`,
# `with_batching`) may override; `resources`, `autoscaling` and `env` are merged key by key, the
# others replace the class's (`secrets` and `volumes` too, as Modal's with_options does).
VARIANT_FIELDS = frozenset({"resources", "autoscaling", "timeout", "retries", "secrets", "volumes",
                            "read_only_volumes", "env", "max_inputs", "target_inputs",
                            "batch_max_size", "batch_wait_ms"})


def variant_spec(base: FunctionSpec, app_id: str, overrides: dict[str, Any]) -> FunctionSpec:
    """The spec of `base` run with `overrides`: its own function id (so its own pool of workers,
    as Modal runs a distinct variant of the class), derived from the overrides so that the same
    options reuse one variant. Web endpoints and schedules stay with the class itself.
    Raises ValueError naming a bad option."""
    import json

    unknown = sorted(set(overrides) - VARIANT_FIELDS)
    if unknown:
        raise ValueError(f"a variant cannot set {', '.join(unknown)}")
    if base.variant_of is not None:
        raise ValueError(f"{base.tag} is itself a variant of {base.variant_of}")
    data = base.model_dump(mode="json")
    for key, value in overrides.items():
        if key in ("resources", "autoscaling", "env"):
            if not isinstance(value, dict):
                raise ValueError(f"{key} must be an object")
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    digest = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:10]
    tag = f"{base.tag}~{digest}"
    data.update(tag=tag, function_id=function_id(app_id, tag), variant_of=base.tag,
                schedule=None, web=None,
                methods={name: {**m, "web": None} for name, m in data["methods"].items()})
    try:
        return FunctionSpec.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        model: Any = FunctionSpec
        field = None
        for part in error["loc"]:  # e.g. ("resources", "cpu"): the field's own rule
            field = getattr(model, "model_fields", {}).get(str(part))
            model = getattr(field, "annotation", None) if field is not None else None
        rule = field.description if field is not None and field.description else error["msg"]
        where = ".".join(str(p) for p in error["loc"])
        raise ValueError(f"{where}={error.get('input')!r} {rule}") from None
