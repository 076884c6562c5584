"""The environment a worker starts with: runtime variables, secrets, volumes, image settings."""

from __future__ import annotations

import json
import os
from typing import Any

from mctl.core import plugins
from mctl.core.spec import AppSpec, FunctionSpec
from mctl.exception import InvalidError, NotFoundError


def resolve_secrets(fspec: FunctionSpec) -> dict[str, str]:
    """Merge the function's secrets in order; a missing name or key is an error naming it."""
    backends = plugins.registrations("mctl_register_secret_backends")
    env: dict[str, str] = {}
    for ref in fspec.secrets:
        if "values" in ref:  # a spec stored by the previous release, which kept values inline
            env.update(ref["values"])
            continue
        name = ref["name"]
        for backend in backends:
            values = backend.resolve(name)
            if values is not None:
                break
        else:
            if ref.get("inline"):
                raise NotFoundError(f"The secret values given in code for {fspec.tag} (keys "
                                    f"{', '.join(ref.get('keys', []))}) are no longer in the "
                                    "secret store; run or deploy the app again.")
            raise NotFoundError(f"Secret {name!r} (used by {fspec.tag}) was not found in "
                                f"{', '.join(b.name for b in backends)}; create it with "
                                f"`mctl secret create {name} KEY=VALUE`.")
        missing = [k for k in [*ref.get("required_keys", []), *ref.get("keys", [])]
                   if k not in values]
        if missing:
            raise InvalidError(f"Secret {name!r} lacks required keys {', '.join(missing)}; "
                               "add them to the secret.")
        env.update(values)
    return env


def check_app(spec: AppSpec) -> None:
    """Everything that can fail at deploy time, before anything is stored."""
    for fspec in spec.functions.values():
        resolve_secrets(fspec)


def runtime_variables(*, task_id: str, image_id: str, environment: str, region: str,
                      provider: str) -> dict[str, str]:
    """Modal's runtime variables under MCTL_ names, and the MODAL_ names for code written for Modal."""
    values = {"TASK_ID": task_id, "IMAGE_ID": image_id, "ENVIRONMENT": environment,
              "REGION": region, "CLOUD_PROVIDER": provider, "IS_REMOTE": "1"}
    env = {}
    for key, value in values.items():
        env[f"MCTL_{key}"] = value
        env[f"MODAL_{key}"] = value
    return env


def volume_paths(fspec: FunctionSpec, driver_name: str = "local") -> dict[str, str]:
    driver = plugins.find("mctl_register_volume_drivers", driver_name)
    return {path: driver.mount(name, True) for path, name in fspec.volumes.items()}


def worker_env(app: AppSpec, fspec: FunctionSpec, *, app_id: str, task_id: str, server_url: str,
               environment: str, region: str, provider: str,
               image_env: dict[str, str] | None = None) -> dict[str, str]:
    env: dict[str, Any] = {}
    env.update(image_env or {})
    env.update(resolve_secrets(fspec))
    env.update(fspec.env)
    env.update(runtime_variables(task_id=task_id, image_id=fspec.image_id, environment=environment,
                                 region=region, provider=provider))
    env.update({"MCTL_SERVER_URL": server_url, "MCTL_APP_ID": app_id, "MCTL_APP_NAME": app.name,
                "MCTL_FUNCTION_ID": fspec.function_id, "PYTHONUNBUFFERED": "1"})
    if fspec.volumes:
        env["MCTL_VOLUMES"] = json.dumps(volume_paths(fspec))
    if os.environ.get("MCTL_CA_FILE"):  # workers verify an https control plane as clients do
        env["MCTL_CA_FILE"] = os.environ["MCTL_CA_FILE"]
    return env
