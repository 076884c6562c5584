"""Where mctl keeps its state and how a client finds the control plane and its token."""

from __future__ import annotations

import json
import os
from pathlib import Path


def home() -> Path:
    """`MCTL_HOME`, default `~/.mctl`: the background server's state, secrets, volumes."""
    return Path(os.environ.get("MCTL_HOME") or os.path.expanduser("~/.mctl"))


def server_file() -> Path:
    return home() / "server.json"


def profile_file() -> Path:
    """Written by `mctl token set`: the user's token and, optionally, their server's URL."""
    return home() / "profile.json"


def local_token_file() -> Path:
    """The admin token the background server writes for the local user on first start."""
    return home() / "token"


def environment_name() -> str:
    return os.environ.get("MCTL_ENVIRONMENT", "main")


def _profile() -> dict[str, str]:
    try:
        data = json.loads(profile_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def configured_server_url() -> str | None:
    """`MCTL_SERVER_URL`, else the profile's server, else the background server recorded in
    `server.json`, else None."""
    url = os.environ.get("MCTL_SERVER_URL") or _profile().get("server")
    if url:
        return url.rstrip("/")
    try:
        return json.loads(server_file().read_text())["url"]
    except (OSError, ValueError, KeyError):
        return None


def configured_token() -> str | None:
    """The token this process presents: a worker's `MCTL_TASK_TOKEN` first (a worker must not
    act with more than its task's rights), then `MCTL_TOKEN`, the profile's token, and the token
    the local background server wrote."""
    token = os.environ.get("MCTL_TASK_TOKEN") or os.environ.get("MCTL_TOKEN") \
        or _profile().get("token")
    if token:
        return token.strip()
    try:
        return local_token_file().read_text().strip() or None
    except OSError:
        return None


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (mode 0600), replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def save_profile(token: str, server: str | None) -> Path:
    """`mctl token set`: remember the token (and the server) for this user, mode 0600."""
    data = _profile()
    data["token"] = token
    if server:
        data["server"] = server.rstrip("/")
    path = profile_file()
    write_private(path, json.dumps(data, indent=2) + "\n")
    return path
