"""`Secret`: environment variables injected into a function's containers.

Values are resolved by a secret backend plugin when the app is deployed, never at import time.
Values given in code travel beside the app's spec to the secret backend, never inside it.
"""

from __future__ import annotations

import os
from typing import Any

from mctl.exception import InvalidError


def _in_worker() -> bool:
    """Inside a container the app's module is imported again, but its secrets were resolved at
    deploy and arrive as environment variables: the local file or variables need not exist."""
    return "MCTL_TASK_ID" in os.environ


class Secret:
    def __init__(self, *, name: str | None = None, values: dict[str, str] | None = None,
                 required_keys: tuple[str, ...] = (), environment_name: str | None = None) -> None:
        self.name = name
        self.values = values
        self.required_keys = tuple(required_keys)
        self.environment_name = environment_name

    @staticmethod
    def from_dict(env_dict: dict[str, str | None]) -> Secret:
        if not isinstance(env_dict, dict):
            raise InvalidError(f"Secret.from_dict takes a dict of str to str, not "
                               f"{type(env_dict).__name__}.")
        for key, value in env_dict.items():  # refused here, not when a worker starts (as Modal)
            if not isinstance(key, str):
                raise InvalidError(f"Secret.from_dict: the key {key!r} is a "
                                   f"{type(key).__name__}; names must be str.")
            if value is not None and not isinstance(value, str):
                raise InvalidError(f"Secret.from_dict: the value of {key!r} is a "
                                   f"{type(value).__name__} ({value!r}); values must be str "
                                   f"(or None to leave it out), e.g. {key!r}: {str(value)!r}.")
        return Secret(values={k: v for k, v in env_dict.items() if v is not None})

    @staticmethod
    def from_name(name: str, *, environment_name: str | None = None,
                  required_keys: list[str] | tuple[str, ...] = ()) -> Secret:
        if not isinstance(name, str) or not name:
            raise InvalidError("Secret.from_name needs the secret's name.")
        return Secret(name=name, required_keys=tuple(required_keys),
                      environment_name=environment_name)

    @staticmethod
    def from_local_environ(env_keys: list[str]) -> Secret:
        missing = [k for k in env_keys if k not in os.environ]
        if missing and _in_worker():  # the deployer's values already reached this container
            return Secret(values={})
        if missing:
            raise InvalidError(f"Secret.from_local_environ: {', '.join(missing)} not set in the "
                               "local environment; export them first.")
        return Secret(values={k: os.environ[k] for k in env_keys})

    @staticmethod
    def from_dotenv(path: str | None = None, *, filename: str = ".env") -> Secret:
        file = os.path.join(path or os.getcwd(), filename)
        values: dict[str, str] = {}
        if _in_worker() and not os.path.exists(file):
            return Secret(values={})  # the file stayed on the deployer's machine; its values came
        with open(file) as fh:
            for line in fh:
                line = line.strip()
                if line and not line.startswith("#") and "=" in line:
                    key, _, value = line.removeprefix("export ").partition("=")
                    values[key.strip()] = value.strip().strip("'\"")
        return Secret(values=values)

    def ref(self, app_id: str) -> dict[str, Any]:
        """What the spec records: a name to resolve later. Values given in code become an inline
        secret of the app, stored apart from the spec (see `mctl.core.secret_store`)."""
        if self.name is not None:
            return {"name": self.name, "required_keys": list(self.required_keys)}
        from mctl.core.secret_store import inline_name

        values = dict(self.values or {})
        return {"name": inline_name(app_id, values), "inline": True, "keys": sorted(values)}

    def __repr__(self) -> str:
        return f"Secret.from_name({self.name!r})" if self.name else "Secret(<values>)"
