"""Secret values for a worker, resolved through the secret backends (and checked at deploy).

A backend with `worker_access` (Vault) never hands values to the control plane: the deploy check
asks it for key names only, and a worker gets the means to read the values itself.
"""

from __future__ import annotations

from typing import Any

from mctl.core import plugins
from mctl.core.spec import AppSpec, FunctionSpec
from mctl.exception import InvalidError, NotFoundError


def _not_found(fspec: FunctionSpec, ref: dict[str, Any], backends: list[Any]) -> NotFoundError:
    name = ref["name"]
    if ref.get("inline"):
        return NotFoundError(f"The secret values given in code for {fspec.tag} (keys "
                             f"{', '.join(ref.get('keys', []))}) are no longer in the "
                             "secret store; run or deploy the app again.")
    active = [b.name for b in backends if b.configured is None or b.configured()] or \
        [b.name for b in backends]  # only those set up here (no Vault without VAULT_ADDR)
    where = (f"the {active[0]} secret backend" if len(active) == 1
             else f"the secret backends ({', '.join(active)})")
    return NotFoundError(f"Secret {name!r} (used by {fspec.tag}) was not found in {where}; "
                         f"create it with `mctl secret create {name} KEY=VALUE`.")


def _check_keys(ref: dict[str, Any], present: Any) -> None:
    missing = [k for k in [*ref.get("required_keys", []), *ref.get("keys", [])]
               if k not in present]
    if missing:
        raise InvalidError(f"Secret {ref['name']!r} lacks required keys {', '.join(missing)}; "
                           "add them to the secret.")


def _locate(fspec: FunctionSpec, want_values: bool) -> list[tuple[dict[str, Any], Any, Any]]:
    """(ref, backend, values or None) for each of the function's secrets, in order; a missing
    name or key is an error naming it. Values are read only from backends without
    `worker_access`, and only when `want_values`."""
    backends = plugins.registrations("mctl_register_secret_backends")
    found = []
    for ref in fspec.secrets:
        if "values" in ref:  # a spec stored by the previous release, which kept values inline
            found.append((ref, None, ref["values"]))
            continue
        for backend in backends:
            if backend.keys is not None and (backend.worker_access is not None
                                             or not want_values):
                present = backend.keys(ref["name"])
                values = None
            else:
                present = values = backend.resolve(ref["name"])
            if present is not None:
                break
        else:
            raise _not_found(fspec, ref, backends)
        _check_keys(ref, present)
        if values is None and want_values and backend.worker_access is None:
            values = backend.resolve(ref["name"])
        found.append((ref, backend, values))
    return found


def resolve_secrets(fspec: FunctionSpec) -> dict[str, str]:
    """Merge the values of the function's secrets held by backends that hand values out; a
    missing name or key is an error naming it. (`worker_secrets` is what workers get.)"""
    env: dict[str, str] = {}
    for _, _, values in _locate(fspec, want_values=True):
        env.update(values or {})
    return env


def worker_secrets(app_id: str, fspec: FunctionSpec) -> dict[str, Any]:
    """What a starting worker gets: `env` (values from backends that hand them out) and
    `delegated` (per backend with `worker_access`, the means to read its values itself: the
    worker applies them after `env`, in order)."""
    env: dict[str, str] = {}
    delegated: dict[str, tuple[Any, list[str]]] = {}
    for ref, backend, values in _locate(fspec, want_values=True):
        if backend is not None and backend.worker_access is not None:
            delegated.setdefault(backend.name, (backend, []))[1].append(ref["name"])
        else:
            env.update(values or {})
    return {"env": env, "delegated": [{"backend": name, **b.worker_access(app_id, names)}
                                      for name, (b, names) in delegated.items()]}


def read_delegated(answer: dict[str, Any]) -> dict[str, str]:
    """In the worker: the values of `worker_secrets`' answer, read from their backends."""
    env = dict(answer.get("env", {}))
    for access in answer.get("delegated", []):
        env.update(plugins.find("mctl_register_secret_backends",
                                access["backend"]).worker_read(access))
    return env


def check_app(spec: AppSpec) -> None:
    """Everything that can fail at deploy time, before anything is stored: every secret exists
    and has its required keys (without reading values from backends that can tell keys)."""
    for fspec in spec.functions.values():
        _locate(fspec, want_values=False)


def grant_app(app_id: str, spec: AppSpec) -> None:
    """Let the app's workers read its secrets in each backend that delegates reads (and only
    those): called at deploy, before any worker starts."""
    names: dict[str, tuple[Any, set[str]]] = {}
    for fspec in spec.functions.values():
        for ref, backend, _ in _locate(fspec, want_values=False):
            if backend is not None and backend.grant is not None:
                names.setdefault(backend.name, (backend, set()))[1].add(ref["name"])
    for backend, wanted in names.values():
        backend.grant(app_id, sorted(wanted))


def revoke_app(app_id: str) -> None:
    """The app stopped: withdraw what `grant_app` allowed, in every backend that can."""
    import logging

    for backend in plugins.registrations("mctl_register_secret_backends"):
        if backend.revoke is not None:
            try:
                backend.revoke(app_id)
            except Exception:  # a stop must not fail on cleanup; the policy is harmless alone
                logging.getLogger("mctl.secrets").warning(
                    "could not revoke app %s in secret backend %s", app_id, backend.name)
