"""Where mctl keeps its state and how a client finds the control plane."""

from __future__ import annotations

import json
import os
from pathlib import Path


def home() -> Path:
    """`MCTL_HOME`, default `~/.mctl`: the background server's state, secrets, volumes."""
    return Path(os.environ.get("MCTL_HOME") or os.path.expanduser("~/.mctl"))


def server_file() -> Path:
    return home() / "server.json"


def environment_name() -> str:
    return os.environ.get("MCTL_ENVIRONMENT", "main")


def configured_server_url() -> str | None:
    """`MCTL_SERVER_URL`, else the background server recorded in `server.json`, else None."""
    url = os.environ.get("MCTL_SERVER_URL")
    if url:
        return url.rstrip("/")
    try:
        return json.loads(server_file().read_text())["url"]
    except (OSError, ValueError, KeyError):
        return None
