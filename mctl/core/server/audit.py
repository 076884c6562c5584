"""The audit log: one JSON object per line in `<state_dir>/audit.log`, append-only.

Each entry says when, who (a token's name and id, or `task:<function_id>`), what (`app.deploy`,
`app.stop`, `app.rollback`, `token.create`, `token.revoke`, ...), on what, and from which address.
Details never hold secret values: callers pass names and ids only.
"""

from __future__ import annotations

import collections
import json
import os
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from mctl.core.server.auth import Principal

# Where the auth middleware leaves a request's principal (a typed key where aiohttp has them).
PRINCIPAL_KEY: Any = (web.RequestKey("mctl_principal", Principal) if hasattr(web, "RequestKey")
                      else "mctl_principal")


class Audit:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __call__(self, actor: Any, action: str, target: str, **details: Any) -> dict[str, Any]:
        """Record `action` on `target` by `actor`: an aiohttp request (its principal and remote
        address), a Principal, or a plain string such as "system"."""
        principal, remote = actor, "local"
        if hasattr(actor, "remote") and hasattr(actor, "get"):  # an aiohttp request
            principal, remote = actor.get(PRINCIPAL_KEY), actor.remote or ""
        entry: dict[str, Any] = {"ts": time.time()}
        if isinstance(principal, Principal):
            entry["who"] = principal.who()
            entry["token_id"] = principal.token_id
        else:
            entry["who"] = str(principal or "unknown")
        entry.update({"action": action, "target": target, "from": remote,
                      "details": details})
        line = json.dumps(entry, sort_keys=False, default=str) + "\n"
        # One write on an O_APPEND descriptor: concurrent writers never interleave within a line.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        return entry

    def read(self, limit: int = 100) -> list[dict[str, Any]]:
        """The last `limit` entries, oldest first."""
        try:
            with open(self.path) as fh:
                lines = collections.deque(fh, maxlen=max(limit, 0))
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]
