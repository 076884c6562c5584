"""Secrets in `$MCTL_HOME/secrets/<name>.secret`, encrypted at rest, managed by `mctl secret`.

Each file is a Fernet token (AES-128-CBC + HMAC-SHA256) of `{"values", "created", "updated"}`.
The key is `$MCTL_HOME/secrets/.key` (mode 600), created on first use: anyone who can read it can
read the secrets, so back it up with them and keep both on the control plane's machine.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import mctl
from mctl.core.config import home
from mctl.core.plugin_types import SecretBackend, SecretInfo
from mctl.exception import AlreadyExistsError, InvalidError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SUFFIX = ".secret"
LEGACY_SUFFIX = ".json"  # plaintext files of the previous release


def _dir() -> Path:
    return home() / "secrets"


def _check(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidError(f"Invalid secret name {name!r}: use up to 64 letters, digits, '.', '_' "
                           "and '-', starting with a letter or digit.")
    return name


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically, readable by this user only."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fernet() -> Any:
    from cryptography.fernet import Fernet

    key_path = _dir() / ".key"
    try:
        return Fernet(key_path.read_bytes().strip())
    except FileNotFoundError:
        pass
    # Create the key; os.link refuses to overwrite, so two processes racing agree on one key.
    key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = key_path.with_name(f".key.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(Fernet.generate_key())
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(tmp, key_path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return Fernet(key_path.read_bytes().strip())


def _save(name: str, record: dict[str, Any]) -> None:
    token = _fernet().encrypt(json.dumps(record).encode())
    _write_private(_dir() / f"{name}{SUFFIX}", token)


def _load(name: str) -> dict[str, Any] | None:
    """The stored record of `name`, or None. A plaintext file of the previous release is
    migrated here, on first read: encrypted under the new name, then the plaintext removed."""
    from cryptography.fernet import InvalidToken

    path = _dir() / f"{_check(name)}{SUFFIX}"
    try:
        token = path.read_bytes()
    except FileNotFoundError:
        return _migrate(name)
    try:
        return json.loads(_fernet().decrypt(token))
    except InvalidToken:
        raise InvalidError(f"Secret {name!r} cannot be decrypted with {_dir() / '.key'}; restore "
                           "the key it was written with, or recreate the secret.") from None


def _migrate(name: str) -> dict[str, Any] | None:
    legacy = _dir() / f"{name}{LEGACY_SUFFIX}"
    try:
        values = json.loads(legacy.read_text())
        stamp = legacy.stat().st_mtime
    except FileNotFoundError:
        return None
    record = {"values": values, "created": stamp, "updated": stamp}
    _save(name, record)
    legacy.unlink(missing_ok=True)
    return record


def resolve(name: str) -> dict[str, str] | None:
    record = _load(name)
    return None if record is None else record["values"]


def create(name: str, values: dict[str, str], overwrite: bool = False) -> None:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in values.items()):
        raise InvalidError(f"Secret {name!r} must map names to strings.")
    existing = _load(name)
    if existing is not None and not overwrite:
        raise AlreadyExistsError(f"Secret {name!r} exists; pass --force to replace it.")
    now = time.time()
    created = existing["created"] if existing is not None else now
    _save(name, {"values": dict(values), "created": created, "updated": now})


def delete(name: str) -> bool:
    found = False
    for suffix in (SUFFIX, LEGACY_SUFFIX):
        try:
            (_dir() / f"{_check(name)}{suffix}").unlink()
            found = True
        except FileNotFoundError:
            pass
    return found


def names() -> list[str]:
    try:
        files = os.listdir(_dir())
    except FileNotFoundError:
        return []
    found = {f.removesuffix(suffix) for f in files for suffix in (SUFFIX, LEGACY_SUFFIX)
             if f.endswith(suffix) and not f.startswith(".")}
    return sorted(found)


def list_secrets() -> list[SecretInfo]:
    out = []
    for name in names():
        record = _load(name)
        if record is not None:
            out.append(SecretInfo(name=name, keys=tuple(sorted(record["values"])),
                                  created=record["created"], updated=record["updated"]))
    return out


@mctl.hookimpl
def mctl_register_secret_backends():
    yield SecretBackend(name="local", resolve=resolve, list=list_secrets, create=create,
                        delete=delete)
