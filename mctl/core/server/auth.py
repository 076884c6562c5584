"""Who may talk to the control plane: tokens, their scopes, and the permission rules.

A token is a random secret shown once (`mctl_...`); the store keeps only its sha256. User tokens
have a scope, `admin` ⊇ `deploy` ⊇ `invoke`. Task tokens belong to one function version of one app:
a worker of that function may register, read its app, move blobs and call its own app's functions,
nothing else.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mctl.core import ids
from mctl.exception import InvalidError, NotFoundError

if TYPE_CHECKING:
    from mctl.core.server.control import Conn, ControlPlane

SCOPES = ("invoke", "deploy", "admin")
_RANK = {scope: rank for rank, scope in enumerate(SCOPES, 1)}
# A proxy token only calls web endpoints declared with requires_proxy_auth=True (Modal-Key: its
# id, Modal-Secret: the token); it includes no API scope.
PROXY = "proxy"
_RANK[PROXY] = 0
TASK = "task"
PREFIX = "mctl_"
LAST_USED_EVERY = 60.0  # seconds between writes of a token's last use


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    """The holder of a verified token."""

    token_id: str
    name: str
    scope: str  # admin | deploy | invoke | task
    app_id: str = ""
    function_id: str = ""
    version: int = 0

    @property
    def is_task(self) -> bool:
        return self.scope == TASK

    def has(self, scope: str) -> bool:
        """True if this user token's scope includes `scope` (task tokens have no user scope)."""
        return not self.is_task and _RANK[self.scope] >= _RANK[scope]

    def who(self) -> str:
        return f"task:{self.function_id}" if self.is_task else f"{self.name} ({self.token_id})"


# Someone with write access to the server's state directory, e.g. `mctl token create --state-dir`.
LOCAL = Principal("local", f"local:{os.environ.get('USER', '?')}", "admin")


class TokenStore:
    """Issue, verify, list and revoke tokens in the control plane's SQLite database."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self._task_tokens: dict[tuple[str, str, int], str] = {}  # plaintext lives in memory only
        self._used: dict[str, float] = {}

    # --- user tokens ---------------------------------------------------------------------------
    def issue(self, name: str | None = None, scope: str = "invoke") -> tuple[dict[str, Any], str]:
        """A new token: (its record, the secret, to be shown once)."""
        token = new_secret()
        return self.register(token, name, scope), token

    def register(self, token: str, name: str | None, scope: str) -> dict[str, Any]:
        """Store a token whose secret the caller chose (MCTL_TOKEN at bootstrap, or `issue`)."""
        if scope not in _RANK:
            raise InvalidError(f"Unknown token scope {scope!r}; use one of "
                               f"{', '.join((*SCOPES, PROXY))}.")
        token_id = ids.new_id("token", 12)
        name = name or token_id
        if self.db.execute("SELECT 1 FROM tokens WHERE name = ? AND revoked IS NULL AND "
                           "scope != ?", (name, TASK)).fetchone():
            raise InvalidError(f"A token named {name!r} exists; pick another name or revoke it "
                               f"with `mctl token revoke {name}`.")
        now = time.time()
        self.db.execute("INSERT INTO tokens (token_id, name, scope, hash, created) "
                        "VALUES (?,?,?,?,?)", (token_id, name, scope, hash_token(token), now))
        return {"token_id": token_id, "name": name, "scope": scope, "created": now,
                "last_used": None, "revoked": None}

    def has_user_tokens(self) -> bool:
        """False until the first user token exists (revoked ones count: they were chosen)."""
        return self.db.execute("SELECT 1 FROM tokens WHERE scope != ? LIMIT 1",
                               (TASK,)).fetchone() is not None

    def list(self, include_tasks: bool = False) -> list[dict[str, Any]]:
        where = "" if include_tasks else f"WHERE scope != '{TASK}'"
        cur = self.db.execute("SELECT token_id, name, scope, created, last_used, revoked, app_id, "
                              f"function_id, version FROM tokens {where} ORDER BY created")
        cols = [c[0] for c in cur.description]
        rows = [dict(zip(cols, row)) for row in cur.fetchall()]
        for row in rows:
            row["last_used"] = self._used.get(row["token_id"], row["last_used"])
            if row["scope"] != TASK:
                for key in ("app_id", "function_id", "version"):
                    del row[key]
        return rows

    def revoke(self, ref: str) -> dict[str, Any]:
        """Revoke the user token with id or name `ref`; returns its record."""
        rows = self.db.execute("SELECT token_id, name, scope FROM tokens WHERE (token_id = ? OR "
                               "name = ?) AND revoked IS NULL AND scope != ?",
                               (ref, ref, TASK)).fetchall()
        if not rows:
            raise NotFoundError(f"No active token with id or name {ref!r}; `mctl token list` "
                                "shows them.")
        if len(rows) > 1:
            raise InvalidError(f"{len(rows)} tokens are named {ref!r}; revoke one by its id.")
        token_id, name, scope = rows[0]
        self.db.execute("UPDATE tokens SET revoked = ? WHERE token_id = ?", (time.time(), token_id))
        return {"token_id": token_id, "name": name, "scope": scope}

    def was_revoked(self, token: str | None) -> bool:
        """True for a token that was valid and has been revoked. Saying so tells the caller only
        about a token it already holds, so it gives a guesser nothing."""
        if not token or not token.startswith(PREFIX):
            return False
        return self.db.execute("SELECT 1 FROM tokens WHERE hash = ? AND revoked IS NOT NULL",
                               (hash_token(token),)).fetchone() is not None

    # --- verification --------------------------------------------------------------------------
    def verify(self, token: str | None) -> Principal | None:
        """The principal of a valid, unrevoked token; None otherwise."""
        if not token or not token.startswith(PREFIX):
            return None
        row = self.db.execute("SELECT token_id, name, scope, app_id, function_id, version "
                              "FROM tokens WHERE hash = ? AND revoked IS NULL",
                              (hash_token(token),)).fetchone()
        if row is None:
            return None
        token_id, name, scope, app_id, function_id, version = row
        now = time.time()
        if now - self._used.get(token_id, 0.0) > LAST_USED_EVERY:
            self.db.execute("UPDATE tokens SET last_used = ? WHERE token_id = ?", (now, token_id))
        self._used[token_id] = now
        return Principal(token_id, name, scope, app_id or "", function_id or "", version or 0)

    # --- task tokens ---------------------------------------------------------------------------
    def task_token(self, app_id: str, function_id: str, version: int) -> str:
        """The task token of one function version: created on first call, the same after."""
        key = (app_id, function_id, version)
        token = self._task_tokens.get(key)
        if token is None:
            token = new_secret()
            self.db.execute(
                "INSERT INTO tokens (token_id, name, scope, hash, created, app_id, function_id, "
                "version) VALUES (?,?,?,?,?,?,?,?)",
                (ids.new_id("token", 12), f"task:{function_id}", TASK, hash_token(token),
                 time.time(), app_id, function_id, version))
            self._task_tokens[key] = token
        return token

    def revoke_task_tokens(self, app_id: str, keep_version: int | None = None) -> int:
        """Revoke the app's task tokens, except those of version `keep_version`."""
        keep = -1 if keep_version is None else keep_version
        for key in [k for k in self._task_tokens if k[0] == app_id and k[2] != keep]:
            del self._task_tokens[key]
        return self.db.execute("UPDATE tokens SET revoked = ? WHERE scope = ? AND app_id = ? AND "
                               "version != ? AND revoked IS NULL",
                               (time.time(), TASK, app_id, keep)).rowcount


def bootstrap_local_token(tokens: TokenStore, token_file: Path | None) -> str:
    """On first start (no user token yet), make an admin token so that a single user needs no
    set-up: MCTL_TOKEN if set, else the one in `token_file` (written 0600 if new). Returns what
    it did, for the server's log."""
    from mctl.core.config import write_private

    if tokens.has_user_tokens():
        return ""
    if os.environ.get("MCTL_TOKEN"):
        tokens.register(os.environ["MCTL_TOKEN"].strip(), "bootstrap", "admin")
        return "registered MCTL_TOKEN as the first admin token"
    if token_file is None:
        return ("no tokens exist yet: create an admin token with `mctl token create --scope "
                "admin --state-dir STATE_DIR` on this machine")
    try:
        token = token_file.read_text().strip()
    except OSError:
        token = ""
    if not token.startswith(PREFIX):
        token = new_secret()
        write_private(token_file, token + "\n")
    tokens.register(token, "local", "admin")
    return f"created an admin token for the local user in {token_file}"


# --- permission rules ------------------------------------------------------------------------------
def scope_denial(principal: Principal, scope: str) -> str:
    if principal.is_task:
        return (f"A task token cannot do this (it needs scope {scope}); a worker may only read its "
                f"own app, move blobs and call its own app's functions. {OTHER_APP_HINT}")
    return (f"This token has scope {principal.scope}; this needs scope {scope}. Ask an admin for "
            f"one with `mctl token create --scope {scope}`.")


# What a function that must reach beyond its own app does (transport.caller_headers).
OTHER_APP_HINT = ("To call another app's functions (or do more) from a function, give it a "
                  "token: `mctl token create --scope invoke --name NAME`, then `mctl secret "
                  "create NAME MCTL_TOKEN=<that token>`, and `secrets=[mctl.Secret.from_name("
                  "\"NAME\")]` on the function; its calls then use that token (docs/guide.md, "
                  "\"Task tokens\").")

RESTRICTED = ("This function is declared with restrict_modal_access=True: its worker may serve "
              "its own inputs only, not call functions or use Dicts, Queues or other apps' "
              "objects.")


def restricted(principal: Principal, control: ControlPlane) -> bool:
    """A task token of a function declared `restrict_modal_access=True`."""
    if not principal.is_task:
        return False
    fs = control.functions.get(principal.function_id)
    return fs is not None and bool(getattr(fs.spec, "restrict_modal_access", False))


def ws_denial(principal: Principal, conn: Conn, header: dict[str, Any],
              control: ControlPlane) -> str | None:
    """Why `principal` may not send this WebSocket message on `conn`, or None if it may."""
    kind = header.get("type")
    if kind == "outputs":
        if conn.role != "worker":
            return "Only a worker may post outputs; connect as a worker with a task token."
        live = control.live
        for item in header.get("items", ()):
            rec = live.get(item.get("id"))
            if rec is not None and rec.function_id != conn.function_id:
                return f"Input {item.get('id')} belongs to another function."
        return None
    if kind in ("exec_output", "exec_exit"):  # `mctl container exec`; the control plane
        # delivers them only to the session it started on this very worker connection
        return None if conn.role == "worker" else "Only a worker may answer an exec."
    if kind == "unsubscribe":
        return None
    if kind == "hello":
        if header.get("role", "client") == "worker":
            if principal.is_task:
                if header.get("function_id") != principal.function_id:
                    return (f"This task token belongs to {principal.function_id}; it cannot "
                            f"register as a worker of {header.get('function_id')}.")
                return None
            if principal.has("admin"):
                return None
            return ("Registering as a worker needs the function's task token; a user token "
                    f"with scope {principal.scope} cannot.")
        if restricted(principal, control):
            return RESTRICTED
        if principal.is_task:
            others = [a for a in header.get("apps", ()) if a != principal.app_id]
            return f"A task token cannot claim app {others[0]}." if others else None
        return None
    if not principal.is_task:
        return None  # invoke ⊆ every user scope: put_inputs, subscribe, cancel
    if kind in ("put_inputs", "subscribe", "cancel") and restricted(principal, control):
        return RESTRICTED
    if kind == "put_inputs":
        fs = control.functions.get(header.get("function_id", ""))
        if fs is None or fs.app_id != principal.app_id:
            return "A task token may only call functions of its own app."
        return None
    if kind in ("subscribe", "cancel"):
        row = control.store.call(header.get("call_id", ""))
        fs = control.functions.get(row[0]) if row else None
        if fs is None or fs.app_id != principal.app_id:
            return "A task token may only follow calls of its own app's functions."
        return None
    return None  # unknown kinds are answered by the control plane
