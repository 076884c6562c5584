"""Secret values for a worker, resolved through the secret backends (and checked at deploy)."""

from __future__ import annotations

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
            raise NotFoundError(f"Secret {name!r} (used by {fspec.tag}) was not found in the "
                                f"secret backends ({', '.join(b.name for b in backends)}); "
                                "create it with "
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
