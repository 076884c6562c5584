"""Secrets through the secret backend plugins: the CLI's create/list/delete, and inline secrets.

Values given in code (`Secret.from_dict`, `from_local_environ`, `from_dotenv`) are *inline*
secrets. They never enter an app spec: compile records a reference `{"name": "inline.<app id>.
<digest>", "inline": true, "keys": [...]}`, the client sends the values beside the spec, and the
control plane writes them to the secret backend before it stores the spec. Workers resolve them
by name like any other secret. An ephemeral app's inline secrets are deleted when it stops; a
deployed app's stay while its versions do (a rollback needs them).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from typing import TYPE_CHECKING, Any, Iterable

from mctl.exception import InvalidError

if TYPE_CHECKING:
    from mctl.core.plugin_types import SecretBackend, SecretInfo
    from mctl.core.server.store import Store

log = logging.getLogger("mctl.secrets")

INLINE_PREFIX = "inline."
_INLINE = re.compile(r"^inline\.(ap-[A-Za-z0-9]+)\.[0-9a-f]{16}$")
# The digest names a set of values without revealing it; the slow hash makes guessing a weak
# value from the name costly, and the app id salts it.
_KDF_ROUNDS = 100_000


_configured: str | None = None  # the server's setting (`mctl server --secret-backend`)


def use_backend(name: str | None) -> None:
    """The server's secret backend setting; an unknown name is an error naming the plugins."""
    global _configured
    if name:
        backend(name)
    _configured = name or None


def backend(name: str | None = None) -> SecretBackend:
    """The backend `mctl secret` and inline secrets write to: the server's setting
    (`--secret-backend`, `[secrets] backend` in server.toml), else `MCTL_SECRET_BACKEND`, else
    local."""
    from mctl.core import plugins

    return plugins.find("mctl_register_secret_backends",
                        name or _configured or os.environ.get("MCTL_SECRET_BACKEND", "local"))


def _capable(b: SecretBackend, operation: str) -> Any:
    fn = getattr(b, operation)
    if fn is None:
        raise InvalidError(f"Secret backend {b.name!r} cannot {operation} secrets; manage them "
                           "with that backend's own tools, or choose another with "
                           "`mctl server --secret-backend`.")
    return fn


# --- named secrets (the CLI) ---------------------------------------------------------------------
def create(name: str, values: dict[str, str], overwrite: bool = False) -> None:
    if name.startswith(INLINE_PREFIX):
        raise InvalidError(f"Secret names starting with {INLINE_PREFIX!r} are reserved for values "
                           "given in code; choose another name.")
    b = backend()
    _capable(b, "create")(name, values, overwrite)
    log.info("secret created: %s (backend %s)", name, b.name)  # the HTTP route audits it


def delete(name: str) -> bool:
    b = backend()
    found = _capable(b, "delete")(name)
    if found:
        log.info("secret deleted: %s (backend %s)", name, b.name)
    return found


def list_secrets(include_inline: bool = False) -> list[SecretInfo]:
    infos = _capable(backend(), "list")()
    return [i for i in infos if include_inline or not is_inline(i.name)]


# --- inline secrets ------------------------------------------------------------------------------
def is_inline(name: str) -> bool:
    return bool(_INLINE.match(name))


def inline_name(app_id: str, values: dict[str, str]) -> str:
    """The reserved name of these values for this app: the same values give the same name, so a
    redeploy with unchanged values reuses the stored secret."""
    return _inline_name(app_id, json.dumps(sorted(values.items())))


@functools.lru_cache(maxsize=64)  # one Secret is often shared by all functions of an app
def _inline_name(app_id: str, data: str) -> str:
    digest = hashlib.pbkdf2_hmac("sha256", data.encode(), f"mctl-inline/{app_id}".encode(),
                                 _KDF_ROUNDS)
    return f"{INLINE_PREFIX}{app_id}.{digest.hex()[:16]}"


def inline_refs(spec_dict: dict[str, Any]) -> set[str]:
    """Names of the inline secrets a stored spec (as JSON) refers to."""
    return {ref["name"] for f in spec_dict.get("functions", {}).values()
            for ref in f.get("secrets", []) if ref.get("inline")}


def refuse_values_in_spec(spec: Any) -> None:
    for fspec in spec.functions.values():
        if any("values" in ref for ref in fspec.secrets):
            raise InvalidError(f"Function {fspec.tag} carries secret values in its spec; upgrade "
                               "the mctl client, which sends them beside the spec.")


def store_inline(spec: Any, values_by_name: dict[str, dict[str, str]]) -> list[str]:
    """Write an app's inline secret values to the backend, before its spec is stored.

    Each name must be one the spec refers to and must match its values (so a request cannot
    overwrite another secret). Returns the names created now, for `forget` if the deploy fails.
    """
    wanted = {ref["name"] for f in spec.functions.values() for ref in f.secrets
              if ref.get("inline")}
    for name, values in values_by_name.items():
        match = _INLINE.match(name)
        if (name not in wanted or match is None or not isinstance(values, dict)
                or inline_name(match.group(1), values) != name):
            raise InvalidError(f"Inline secret {name!r} does not match the app's spec; deploy "
                               "again with an unmodified mctl client.")
    b = backend()
    create_fn = _capable(b, "create")
    created = []
    exists = b.keys or b.resolve  # key names suffice: no need to read values back
    for name, values in values_by_name.items():
        if exists(name) is None:
            create_fn(name, values, True)
            created.append(name)
    return created


def forget(names: Iterable[str]) -> None:
    """Delete inline secrets (names only; a missing one is fine)."""
    b = backend()
    if b.delete is None:
        return
    for name in names:
        if is_inline(name):
            try:
                b.delete(name)
            except Exception:  # cleanup must not fail the stop that triggered it
                log.exception("could not delete inline secret %s", name)


def forget_app(store: Store, app_id: str) -> None:
    """Delete the inline secrets that the stored versions of `app_id` refer to."""
    names: set[str] = set()
    for version in store.versions(app_id):
        names |= inline_refs(store.version_spec(app_id, version["version"]) or {})
    forget(names)
