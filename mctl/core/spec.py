"""Pydantic models of an app: everything a scheduler needs, validated once, serialisable to JSON."""

from __future__ import annotations

import hashlib
import re
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MIN_TIMEOUT, MAX_TIMEOUT = 1, 24 * 3600


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryPolicy(_Model):
    max_retries: int = Field(0, ge=0, le=10)
    backoff_coefficient: float = Field(2.0, ge=1.0, le=10.0)
    initial_delay: float = Field(1.0, ge=0, le=60)
    max_delay: float = Field(60.0, ge=1, le=60)

    def delay(self, attempt: int) -> float:
        return min(self.initial_delay * self.backoff_coefficient ** (attempt - 1), self.max_delay)


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
    min_containers: int = Field(0, ge=0)
    max_containers: Optional[int] = Field(None, ge=1)
    buffer_containers: int = Field(0, ge=0)
    scaledown_window: float = Field(60.0, ge=1, le=24 * 3600)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.max_containers is not None and self.min_containers > self.max_containers:
            raise ValueError(f"min_containers={self.min_containers} is above "
                             f"max_containers={self.max_containers}")
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


class ResourcesSpec(_Model):
    cpu: Optional[float] = Field(None, gt=0, le=512)
    memory_mb: Optional[int] = Field(None, ge=1)
    gpu: Optional[GpuRequest] = None


class MethodSpec(_Model):
    is_generator: bool = False
    is_async: bool = False


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
    timeout: float = Field(300, ge=MIN_TIMEOUT, le=MAX_TIMEOUT)
    retries: Optional[RetryPolicy] = None
    schedule: Optional[ScheduleSpec] = None
    autoscaling: AutoscalingSpec = AutoscalingSpec()
    resources: ResourcesSpec = ResourcesSpec()
    image_id: str
    secrets: list[dict[str, Any]] = []
    volumes: dict[str, str] = {}   # mount path -> volume name
    env: dict[str, str] = {}
    max_inputs: int = Field(1, ge=1, le=1000)
    target_inputs: Optional[int] = None
    batch_max_size: Optional[int] = None
    batch_wait_ms: Optional[int] = None

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
