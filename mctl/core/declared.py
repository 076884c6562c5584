"""What core needs from the SDK's objects, written down as protocols.

`compile` and the worker's loader read an app through these, so `mctl.core` never imports
`mctl.sdk` (the SDK depends on core, not the other way round). `mctl.sdk` implements them:
`App`, the `Function`/`Cls` handles, `Image`, `Secret`, `Period`/`Cron`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol

# Set to True on the App class: how the loader and the CLI recognise an app without importing it.
APP_MARKER = "__mctl_app__"


class ImportStopped(BaseException):
    """Raised by `app.run()` (and `app.deploy()`) inside a worker while the worker imports the user's file: the rest
    of a script written with a module-level `with app.run():` is the caller's, not the worker's.
    The loader keeps what the file defined up to there. A BaseException, so the user's `except
    Exception` does not catch it."""


def is_app(value: Any) -> bool:
    return getattr(type(value), APP_MARKER, False) is True


class DeclaredImage(Protocol):
    @property
    def object_id(self) -> str: ...

    def recipe(self) -> dict[str, Any]: ...

    def blobs(self) -> dict[str, bytes]: ...  # zipped files the recipe adds, by blob id


class DeclaredSecret(Protocol):
    name: Optional[str]
    values: Optional[dict[str, str]]

    def ref(self, app_id: str) -> dict[str, Any]:
        """What the spec records: a name to resolve later (values given in code are stored under
        a reserved name derived from `app_id`, never in the spec)."""


class DeclaredHandle(Protocol):
    """What `@app.function` and `@app.cls` return."""

    tag: str
    # The validated decorator options: timeout, min_containers, ..., image, secrets, volumes
    # ({path: volume name}), retries (None, or an object whose `policy()` is a RetryPolicy),
    # serialized, ...
    options: dict[str, Any]

    @property
    def raw_object(self) -> Any:
        """The user's function or class."""

    def spec_fields(self) -> dict[str, Any]:
        """FunctionSpec fields that depend on the kind: `kind`, and `is_generator`, `is_async`,
        `schedule` (ScheduleSpec fields) for a function, `methods` for a class."""

    def remote_object(self) -> Any:
        """What a container runs: the function itself, or for a class a `ClassRunner`."""

    def _hydrate(self, function_id: str, server_url: str) -> None: ...


class ClassRunner(Protocol):
    """A class's lifecycle inside a container, reached through its handle."""

    def new_instance(self, params: dict[str, Any]) -> Any:
        """The user's object with its parameters set and its @enter methods run."""

    def close_instance(self, obj: Any) -> None:
        """Run the object's @exit methods."""


class DeclaredApp(Protocol):
    name: Optional[str]
    image: DeclaredImage
    secrets: list[DeclaredSecret]
    volume_mounts: dict[str, str]  # mount path -> volume name, for every function
    registered_functions: Mapping[str, DeclaredHandle]

    def _hydrate(self, app_id: str, server_url: str) -> None:
        """Give every handle its function id on the control plane at `server_url`."""

    def _hydrate_in_worker(self, app_id: str) -> None: ...
