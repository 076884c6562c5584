"""Routes for `mctl secret create` when the client writes the values to the secret backend itself
(Vault, with the user's own credentials), so they never pass through the control plane: the
client asks where to write (`GET /api/secrets/backend`), writes, then has the control plane check
the secret's key names (from Vault's metadata, no values) and record the creation in the audit
log (`POST /api/secrets/recorded`)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from aiohttp import web


async def backend_info(request: web.Request) -> web.Response:
    """Which backend `mctl secret create` writes to, and for Vault where (no credentials)."""
    from mctl.core import secret_store

    b = secret_store.backend()
    answer: dict[str, Any] = {"backend": b.name, "client_writes": False}
    if b.name == "vault":
        answer.update(client_writes=True, vault={
            "addr": (os.environ.get("VAULT_ADDR") or "").rstrip("/"),
            "mount": os.environ.get("MCTL_VAULT_MOUNT", "secret").strip("/"),
            "prefix": os.environ.get("MCTL_VAULT_PREFIX", "mctl/"),
            "namespace": os.environ.get("VAULT_NAMESPACE", "")})
    return web.json_response(answer)


async def recorded(request: web.Request) -> web.Response:
    """A secret the client wrote itself: check it is there with those keys, and audit it."""
    from mctl.core import secret_store
    from mctl.core.server.http import _control, _json_error

    body = await request.json()
    name, keys = body.get("name"), body.get("keys")
    if not isinstance(name, str) or not isinstance(keys, list):
        return _json_error(400, "Record a secret with its name and its key names.")
    b = secret_store.backend()
    if b.keys is None:
        return _json_error(400, f"Secret backend {b.name!r} is written through the control "
                                "plane; use POST /api/secrets.")
    found = await asyncio.to_thread(b.keys, name)
    if found is None or sorted(found) != sorted(keys):
        addr = os.environ.get("VAULT_ADDR", "?")
        return _json_error(400, f"The control plane does not find secret {name!r} with keys "
                                f"{', '.join(sorted(keys))} in its {b.name} at {addr}: write it "
                                "to the same Vault (VAULT_ADDR, VAULT_NAMESPACE) the control "
                                "plane uses.")
    _control(request).audit(request, "secret.create", name, keys=sorted(keys),
                            replaced=bool(body.get("replaced")), written_by="client")
    return web.json_response({"name": name, "keys": sorted(keys)})


def routes() -> list[tuple[str, str, Any, str, str]]:
    """(method, path, handler, scope, task rule) rows for http.ROUTES."""
    return [("GET", "/api/secrets/backend", backend_info, "deploy", "no"),
            ("POST", "/api/secrets/recorded", recorded, "deploy", "no")]
