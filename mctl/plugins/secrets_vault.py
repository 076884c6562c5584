"""Secrets in Vault or OpenBao (KV version 2), read by the workers themselves.

Configured from the control plane's environment:

- `VAULT_ADDR` (required; without it this backend knows no secrets), `VAULT_NAMESPACE`,
  `VAULT_CACERT` (a CA bundle to verify Vault's certificate with);
- auth: `VAULT_TOKEN`, or AppRole with `VAULT_ROLE_ID` and `VAULT_SECRET_ID` (mount
  `VAULT_APPROLE_MOUNT`, default `approle`);
- `MCTL_VAULT_MOUNT` (default `secret`) and `MCTL_VAULT_PREFIX` (default `mctl/`): secret NAME is
  `<mount>/data/<prefix>NAME`;
- `MCTL_VAULT_WORKER_ADDR`: Vault's address as workers reach it (default `VAULT_ADDR`);
- `MCTL_VAULT_TOKEN_TTL` (default `10m`) and `MCTL_VAULT_WRAP_TTL` (default `120s`).

Values never pass through the control plane on their way to a worker: at deploy the control
plane writes a policy `mctl-app-<app id>` that may read that app's secrets only; when a worker
starts it asks (with its task token) for access and gets a response-wrapped token of that policy,
usable once per secret; the worker unwraps it and reads the values from Vault itself
(`worker_read`, plain HTTP, no hvac needed in the image). The key names of a secret mctl wrote
are kept in its KV metadata (`mctl_keys`), so the deploy-time check does not read values either.
"""

from __future__ import annotations

import json
import os
import re
import threading
from typing import Any

import mctl
from mctl.core.plugin_types import SecretBackend, SecretInfo
from mctl.exception import AlreadyExistsError, InvalidError, NotFoundError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
POLICY_PREFIX = "mctl-app-"
_lock = threading.Lock()
_clients: dict[tuple[str, ...], Any] = {}


def _addr() -> str | None:
    return (os.environ.get("VAULT_ADDR") or "").rstrip("/") or None


def _mount() -> str:
    return os.environ.get("MCTL_VAULT_MOUNT", "secret").strip("/")


def _path(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidError(f"Invalid secret name {name!r}: use up to 64 letters, digits, '.', '_' "
                           "and '-', starting with a letter or digit.")
    return os.environ.get("MCTL_VAULT_PREFIX", "mctl/") + name


def _unreachable(exc: BaseException) -> InvalidError:
    return InvalidError(f"Cannot reach Vault at VAULT_ADDR={_addr()} ({type(exc).__name__}). "
                        "Start Vault, or set VAULT_ADDR to its address.")


def _client() -> Any:
    """An authenticated hvac client for the current settings (cached; AppRole logs in once)."""
    import hvac

    addr = _addr()
    if addr is None:
        raise InvalidError("The vault secret backend needs VAULT_ADDR (and VAULT_TOKEN or "
                           "VAULT_ROLE_ID/VAULT_SECRET_ID); set them in the server's environment.")
    key = tuple(os.environ.get(k, "") for k in (
        "VAULT_ADDR", "VAULT_TOKEN", "VAULT_NAMESPACE", "VAULT_CACERT", "VAULT_ROLE_ID",
        "VAULT_SECRET_ID", "VAULT_APPROLE_MOUNT"))
    with _lock:
        client = _clients.get(key)
        if client is not None:
            return client
        cacert = os.environ.get("VAULT_CACERT")
        client = hvac.Client(url=addr, namespace=os.environ.get("VAULT_NAMESPACE") or None,
                             verify=cacert if cacert else True, timeout=10)
        if os.environ.get("VAULT_ROLE_ID"):
            import hvac.exceptions

            try:
                _call(lambda: client.auth.approle.login(
                    role_id=os.environ["VAULT_ROLE_ID"],
                    secret_id=os.environ.get("VAULT_SECRET_ID"),
                    mount_point=os.environ.get("VAULT_APPROLE_MOUNT", "approle")))
            except hvac.exceptions.VaultError as exc:
                raise InvalidError(f"Vault at VAULT_ADDR={addr} refused the AppRole login "
                                   f"({str(exc).splitlines()[0]}); check VAULT_ROLE_ID, "
                                   "VAULT_SECRET_ID and VAULT_APPROLE_MOUNT.") from None
        elif os.environ.get("VAULT_TOKEN"):
            client.token = os.environ["VAULT_TOKEN"]
        else:
            raise InvalidError(f"No Vault credentials for VAULT_ADDR={addr}: set VAULT_TOKEN, or "
                               "VAULT_ROLE_ID and VAULT_SECRET_ID for AppRole.")
        _clients[key] = client
        return client


def _call(fn: Any) -> Any:
    """Run one hvac call; connection and permission failures become one-line errors."""
    import hvac.exceptions
    import requests

    try:
        return fn()
    except requests.exceptions.RequestException as exc:
        raise _unreachable(exc) from None
    except hvac.exceptions.VaultDown as exc:
        raise _unreachable(exc) from None
    except hvac.exceptions.Forbidden:
        raise InvalidError(f"Vault at VAULT_ADDR={_addr()} refused mctl's credentials (permission "
                           "denied); give the control plane's token or AppRole the policy shown "
                           "in docs/guide.md (Secrets from Vault).") from None


def _missing(fn: Any) -> Any:
    """`_call`, but None where Vault answers 404."""
    import hvac.exceptions

    try:
        return _call(fn)
    except hvac.exceptions.InvalidPath:
        return None


def _kv() -> Any:
    return _client().secrets.kv.v2


# --- the backend's operations (control plane) ----------------------------------------------------
def resolve(name: str) -> dict[str, str] | None:
    if _addr() is None:
        return None
    path = _path(name)
    answer = _missing(lambda: _kv().read_secret_version(path=path, mount_point=_mount(),
                                                        raise_on_deleted_version=True))
    return None if answer is None else dict(answer["data"]["data"])


def _metadata(name: str) -> dict[str, Any] | None:
    path = _path(name)
    answer = _missing(lambda: _kv().read_secret_metadata(path=path, mount_point=_mount()))
    return None if answer is None else answer["data"]


def _keys_of(name: str, meta: dict[str, Any]) -> list[str] | None:
    """Key names from mctl's metadata when it describes the current version; else (a secret
    written with Vault's own tools) from the data."""
    custom = meta.get("custom_metadata") or {}
    if custom.get("mctl_keys_version") == str(meta.get("current_version")):
        return sorted(k for k in custom.get("mctl_keys", "").split(",") if k)
    values = resolve(name)
    return None if values is None else sorted(values)


def keys(name: str) -> list[str] | None:
    if _addr() is None:
        return None
    meta = _metadata(name)
    return None if meta is None else _keys_of(name, meta)


def list_secrets() -> list[SecretInfo]:
    from datetime import datetime

    prefix = os.environ.get("MCTL_VAULT_PREFIX", "mctl/")
    answer = _missing(lambda: _kv().list_secrets(path=prefix, mount_point=_mount()))
    out = []
    for name in sorted((answer or {}).get("data", {}).get("keys", [])):
        if name.endswith("/") or not _NAME.match(name):
            continue
        meta = _metadata(name)
        if meta is None:
            continue

        def stamp(text: str) -> float:
            return datetime.fromisoformat(text[:26].rstrip("Z") + "+00:00").timestamp() \
                if text else 0.0

        out.append(SecretInfo(name=name, keys=tuple(_keys_of(name, meta) or ()),
                              created=stamp(meta.get("created_time", "")),
                              updated=stamp(meta.get("updated_time", ""))))
    return out


def create(name: str, values: dict[str, str], overwrite: bool = False) -> None:
    import hvac.exceptions

    if not all(isinstance(k, str) and isinstance(v, str) for k, v in values.items()):
        raise InvalidError(f"Secret {name!r} must map names to strings.")
    path = _path(name)
    try:
        # cas=0: written only if the path has no version yet (no race with a concurrent create).
        answer = _call(lambda: _kv().create_or_update_secret(
            path=path, secret=dict(values), mount_point=_mount(), cas=None if overwrite else 0))
    except hvac.exceptions.InvalidRequest as exc:
        if "check-and-set" in str(exc):
            raise AlreadyExistsError(f"Secret {name!r} exists; pass --force to replace it.") \
                from None
        raise
    version = answer["data"]["version"]
    _call(lambda: _kv().update_metadata(path=path, mount_point=_mount(), custom_metadata={
        "mctl_keys": ",".join(sorted(values)), "mctl_keys_version": str(version)}))


def delete(name: str) -> bool:
    if _metadata(name) is None:
        return False
    path = _path(name)
    _call(lambda: _kv().delete_metadata_and_all_versions(path=path, mount_point=_mount()))
    return True


def _policy_name(app_id: str) -> str:
    return POLICY_PREFIX + app_id


def grant(app_id: str, names: list[str]) -> None:
    """Write the app's policy: read on exactly its secrets' current data, nothing else."""
    rules = "\n".join(f'path "{_mount()}/data/{_path(n)}" {{\n  capabilities = ["read"]\n}}'
                      for n in sorted(set(names)))
    _call(lambda: _client().sys.create_or_update_acl_policy(name=_policy_name(app_id),
                                                            policy=rules))


def revoke(app_id: str) -> None:
    if _addr() is None:
        return
    _missing(lambda: _client().sys.delete_acl_policy(name=_policy_name(app_id)))


def worker_access(app_id: str, names: list[str]) -> dict[str, Any]:
    """A response-wrapped, short-lived token of the app's policy, usable once per secret: the
    control plane sees only the wrapping token, never the values or the inner token."""
    answer = _call(lambda: _client().auth.token.create(
        policies=[_policy_name(app_id)], no_default_policy=True, no_parent=True,
        renewable=False, ttl=os.environ.get("MCTL_VAULT_TOKEN_TTL", "10m"),
        num_uses=len(names), wrap_ttl=os.environ.get("MCTL_VAULT_WRAP_TTL", "120s"),
        meta={"mctl_app": app_id}))
    return {"addr": os.environ.get("MCTL_VAULT_WORKER_ADDR") or _addr(),
            "namespace": os.environ.get("VAULT_NAMESPACE") or None,
            "mount": _mount(), "paths": {n: _path(n) for n in names},
            "wrapped_token": answer["wrap_info"]["token"]}


# --- in the worker -------------------------------------------------------------------------------
def _request(access: dict[str, Any], method: str, path: str, token: str) -> dict[str, Any]:
    import ssl
    import urllib.error
    import urllib.request

    headers = {"X-Vault-Token": token}
    if access.get("namespace"):
        headers["X-Vault-Namespace"] = access["namespace"]
    cacert = os.environ.get("VAULT_CACERT")  # the CA's path on this host, if Vault uses TLS
    context = ssl.create_default_context(cafile=cacert) if cacert else None
    request = urllib.request.Request(f"{access['addr']}/v1/{path}", method=method,
                                     headers=headers, data=b"{}" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=15, context=context) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise
    except OSError as exc:
        raise InvalidError(f"This worker cannot reach Vault at {access['addr']} ({exc}); make "
                           "Vault reachable from the workers' hosts, or set "
                           "MCTL_VAULT_WORKER_ADDR on the control plane.") from None


def worker_read(access: dict[str, Any]) -> dict[str, str]:
    """Unwrap the worker's token, then read each secret in order (later names win)."""
    import urllib.error

    try:
        token = _request(access, "POST", "sys/wrapping/unwrap",
                         access["wrapped_token"])["auth"]["client_token"]
    except urllib.error.HTTPError as exc:
        raise InvalidError(f"Vault refused this worker's wrapped token (HTTP {exc.code}): it "
                           "expired or was already used. Restart the worker; if it keeps "
                           "failing, raise MCTL_VAULT_WRAP_TTL.") from None
    env: dict[str, str] = {}
    for name, path in access["paths"].items():
        try:
            answer = _request(access, "GET", f"{access['mount']}/data/{path}", token)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise NotFoundError(f"Secret {name!r} is no longer in Vault; create it again "
                                    f"with `mctl secret create {name} KEY=VALUE`.") from None
            raise InvalidError(f"Vault refused to let this app read secret {name!r} (HTTP "
                               f"{exc.code}); deploy the app again to renew its policy.") from None
        env.update(answer["data"]["data"])
    return env


@mctl.hookimpl
def mctl_register_secret_backends():
    yield SecretBackend(name="vault", resolve=resolve, list=list_secrets, create=create,
                        delete=delete, keys=keys, grant=grant, revoke=revoke,
                        worker_access=worker_access, worker_read=worker_read,
                        configured=lambda: _addr() is not None)
