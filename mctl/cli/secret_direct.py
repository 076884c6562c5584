"""`mctl secret create` with the Vault backend: the CLI writes the values to Vault itself, with
the user's own Vault credentials (`VAULT_ADDR` and `VAULT_TOKEN`, or AppRole), so they never pass
through the control plane; the control plane then checks the key names (Vault metadata) and
records the creation. Without Vault credentials here, or with another backend, the values go
through the control plane as before."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import click


def _has_vault_credentials() -> bool:
    return bool(os.environ.get("VAULT_ADDR") and (
        os.environ.get("VAULT_TOKEN") or os.environ.get("VAULT_ROLE_ID")))


@contextmanager
def _server_layout(vault: dict[str, Any]) -> Iterator[None]:
    """The control plane's KV mount and prefix (and namespace, unless set here) while writing."""
    wanted = {"MCTL_VAULT_MOUNT": vault.get("mount") or "secret",
              "MCTL_VAULT_PREFIX": vault.get("prefix", "mctl/")}
    if vault.get("namespace") and not os.environ.get("VAULT_NAMESPACE"):
        wanted["VAULT_NAMESPACE"] = vault["namespace"]
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def create(admin: Callable[..., Any], name: str, values: dict[str, str], force: bool) -> str:
    """Create the secret; returns "client" when this process wrote it to Vault itself, "server"
    when its values went through the control plane."""
    from mctl.exception import Error

    try:
        info = admin("GET", "/api/secrets/backend", start=True)
    except click.ClickException:  # an older control plane: no such route
        info = {}
    if info.get("client_writes") and info.get("backend") == "vault":
        if _has_vault_credentials():
            from mctl.plugins import secrets_vault

            with _server_layout(info.get("vault") or {}):
                try:
                    secrets_vault.create(name, values, force)
                except Error as exc:
                    raise click.ClickException(f"{exc} (written from this machine with its "
                                               "VAULT_ADDR and VAULT_TOKEN)") from None
            admin("POST", "/api/secrets/recorded",
                  {"name": name, "keys": sorted(values), "replaced": force})
            return "client"
        click.echo("mctl: VAULT_ADDR and VAULT_TOKEN are not set here, so the values go to Vault "
                   "through the control plane's memory (never stored or logged there); set them "
                   "to write to Vault directly.", err=True)
    admin("POST", "/api/secrets", {"name": name, "values": values, "overwrite": force},
          start=True)
    return "server"
