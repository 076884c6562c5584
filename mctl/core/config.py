"""Where mctl keeps its state and how a client finds the control plane and its token."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple


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


def _profiles() -> tuple[dict[str, dict[str, str]], str | None]:
    """(profiles by name, the active one's name) from profile.json. A file of the first
    release's shape ({"token", "server"}) is one profile named "default"."""
    try:
        data = json.loads(profile_file().read_text())
    except (OSError, ValueError):
        return {}, None
    if not isinstance(data, dict):
        return {}, None
    if "profiles" not in data:
        flat = {k: v for k, v in data.items() if k in ("token", "server")}
        return ({"default": flat}, "default") if flat else ({}, None)
    profiles = {k: v for k, v in data["profiles"].items() if isinstance(v, dict)}
    return profiles, data.get("active") if data.get("active") in profiles else None


def active_profile_name() -> str | None:
    """`MCTL_PROFILE` when set (it must exist), else the one `mctl profile activate` chose."""
    profiles, active = _profiles()
    wanted = os.environ.get("MCTL_PROFILE")
    if wanted:
        if wanted not in profiles:
            from mctl.exception import InvalidError

            raise InvalidError(f"MCTL_PROFILE={wanted!r} names no profile; `mctl profile list` "
                               f"shows them ({', '.join(profiles) or 'none yet'}).")
        return wanted
    return active


def _profile() -> dict[str, str]:
    profiles, _ = _profiles()
    name = active_profile_name()
    return profiles.get(name, {}) if name else {}


class ServerChoice(NamedTuple):
    """Which control plane commands use, and where that came from.

    `source` is "env" (MCTL_SERVER_URL), "profile" (the active profile's server), "background"
    (the local background server recorded in server.json) or "none"; `where` says it for people
    ("MCTL_SERVER_URL", "profile team at /home/u/.mctl/profile.json", a server.json path)."""

    url: str | None
    source: str
    where: str | None

    @property
    def named(self) -> bool:
        """True when the user named a server (MCTL_SERVER_URL or a profile's): commands then use
        that one, never a local background server nor `mctl run`'s own embedded one."""
        return self.source in ("env", "profile")


def check_server_url(url: str, where: str) -> str:
    """`url` without a trailing slash; an InvalidError unless it is http(s)://..."""
    if not url.startswith(("http://", "https://")):
        from mctl.exception import InvalidError

        raise InvalidError(f"The server URL {url!r} (from {where}) must start with http:// or "
                           "https://, e.g. http://127.0.0.1:8600.")
    return url.rstrip("/")


def server_choice() -> ServerChoice:
    """The one rule for which control plane a client talks to: `MCTL_SERVER_URL`, else the
    active profile's server, else the background server recorded in `server.json`, else none.
    (`mctl run` and `app.run()` use their own embedded control plane when none is *named*.)"""
    env = os.environ.get("MCTL_SERVER_URL")
    if env:
        return ServerChoice(check_server_url(env, "MCTL_SERVER_URL"), "env", "MCTL_SERVER_URL")
    server = _profile().get("server")
    if server:
        where = f"profile {active_profile_name()} at {profile_file()}"
        return ServerChoice(check_server_url(server, where), "profile", where)
    try:
        url = json.loads(server_file().read_text())["url"]
    except (OSError, ValueError, KeyError, TypeError):
        return ServerChoice(None, "none", None)
    return ServerChoice(url, "background", str(server_file()))


def configured_server_url() -> str | None:
    """`server_choice()`'s URL: MCTL_SERVER_URL, the profile's, the background server's or None."""
    return server_choice().url


def unreachable_message(url: str, reason: object) -> str:
    """What to say when nothing answers at `url`: where that URL came from and what to do."""
    try:
        choice = server_choice()
    except Exception:  # noqa: BLE001 - a malformed setting: say the plain message
        choice = ServerChoice(None, "none", None)
    head = f"Could not reach the mctl control plane at {url} ({reason})."
    if choice.url != url.rstrip("/") or not choice.named:
        return head + " Start one with `mctl server`, or set MCTL_SERVER_URL to a running one."
    if choice.source == "env":
        return (head + " It is MCTL_SERVER_URL's: start that server, or fix or unset "
                "MCTL_SERVER_URL.")
    return (head + f" It is the server of {choice.where}: start that server, fix the URL (`mctl "
            "token set TOKEN --server URL --profile NAME`), or `mctl profile deactivate` to use "
            "a local server.")


def named_server_url() -> str | None:
    """The server the user named (MCTL_SERVER_URL or the active profile's), else None."""
    choice = server_choice()
    return choice.url if choice.named else None


def server_config_file() -> Path:
    """`MCTL_SERVER_CONFIG`, default `$MCTL_HOME/server.toml` (used when it exists)."""
    return Path(os.environ.get("MCTL_SERVER_CONFIG") or home() / "server.toml")


def load_server_config(path: str | None = None) -> dict:
    """The server's settings file (TOML): host, port, state_dir, advertise_url, a
    `[scheduler]` table with `name` and an `options` table, and a `[secrets]` table with
    `backend`. `{}` when there is none."""
    from mctl.exception import InvalidError

    file = Path(path) if path else server_config_file()
    if not file.exists():
        if path:
            raise InvalidError(f"No server config file {file}; check the path given to --config.")
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        data = tomllib.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidError(f"Cannot read server config {file}: {exc}. Fix the TOML and retry.") \
            from None
    known = {"host", "port", "state_dir", "advertise_url", "scheduler", "secrets"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidError(f"Server config {file} has unknown keys {', '.join(unknown)}; known "
                           f"keys are {', '.join(sorted(known))}.")
    sched = data.get("scheduler", {})
    if not isinstance(sched, dict) or not isinstance(sched.get("options", {}), dict):
        raise InvalidError(f"Server config {file}: [scheduler] must be a table with `name` and an "
                           "`options` table.")
    secrets = data.get("secrets", {})
    if not isinstance(secrets, dict) or set(secrets) - {"backend"} \
            or not isinstance(secrets.get("backend", ""), str):
        raise InvalidError(f"Server config {file}: [secrets] must be a table with `backend`, the "
                           "secret backend plugin's name, e.g. backend = \"vault\".")
    return data


def parse_options(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """`("partition=gpu", "account=lab")` -> `{"partition": "gpu", "account": "lab"}`."""
    from mctl.exception import InvalidError

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidError(f"Scheduler option {pair!r} is not KEY=VALUE, e.g. "
                               "--scheduler-option partition=gpu.")
        options[key.strip()] = value
    return options


def token_choice() -> tuple[str | None, str | None]:
    """(the token this process presents, where it came from, for people; never the value).

    A worker's `MCTL_TASK_TOKEN` first (a worker must not act with more than its task's rights),
    then `MCTL_TOKEN`, the active profile's token, and the token the local background server
    wrote."""
    for var in ("MCTL_TASK_TOKEN", "MCTL_TOKEN"):
        if os.environ.get(var, "").strip():
            return os.environ[var].strip(), var
    token = (_profile().get("token") or "").strip()
    if token:
        return token, f"profile {active_profile_name()} at {profile_file()}"
    try:
        token = local_token_file().read_text().strip()
    except OSError:
        return None, None
    return (token, f"the local token file {local_token_file()}") if token else (None, None)


def configured_token() -> str | None:
    """The token this process presents (see `token_choice`)."""
    return token_choice()[0]


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (mode 0600), replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def save_profile(token: str, server: str | None, name: str | None = None,
                 activate: bool | None = None) -> Path:
    """`mctl token set [--profile NAME]`: remember the token (and the server) under a profile,
    mode 0600. The first profile, or one saved with `activate`, becomes the active one."""
    profiles, active = _profiles()
    name = name or active or "default"
    entry = dict(profiles.get(name, {}))
    entry["token"] = token
    if server:
        entry["server"] = check_server_url(server, "--server")
    profiles[name] = entry
    if activate or active is None or (activate is None and name == active):
        active = name
    return _write_profiles(profiles, active)


def activate_profile(name: str) -> Path:
    profiles, _ = _profiles()
    if name not in profiles:
        from mctl.exception import NotFoundError

        raise NotFoundError(f"No profile named {name!r}; `mctl profile list` shows them "
                            f"({', '.join(profiles) or 'none yet'}); `mctl token set TOKEN "
                            f"--profile {name}` creates it, and `mctl profile deactivate` goes "
                            "back to the local server and its admin token.")
    return _write_profiles(profiles, name)


def deactivate_profile() -> str | None:
    """No active profile: commands use the local background server and its admin token again.
    Returns the name that was active."""
    profiles, active = _profiles()
    if active is not None:
        _write_profiles(profiles, None)
    return active


def delete_profile(name: str) -> bool:
    """Forget a saved profile (its token too). True when it was the active one."""
    profiles, active = _profiles()
    if name not in profiles:
        from mctl.exception import NotFoundError

        raise NotFoundError(f"No profile named {name!r}; `mctl profile list` shows them "
                            f"({', '.join(profiles) or 'none yet'}).")
    del profiles[name]
    _write_profiles(profiles, None if active == name else active)
    return active == name


def list_profiles() -> list[dict[str, object]]:
    """Names, servers and which is active; never the tokens."""
    profiles, _ = _profiles()
    active = active_profile_name()
    return [{"name": n, "server": p.get("server"), "active": n == active,
             "token": "set" if p.get("token") else None,
             "nomad": dict(p["nomad"]) if isinstance(p.get("nomad"), dict) else None}
            for n, p in profiles.items()]


# A profile's Nomad settings, for the commands that talk to Nomad from this machine (`mctl nomad
# force|logs`), each below the variable Nomad's CLI reads; the token stays in the user's own file.
NOMAD_SETTINGS = {"address": "NOMAD_ADDR", "namespace": "NOMAD_NAMESPACE",
                  "region": "NOMAD_REGION", "cacert": "NOMAD_CACERT", "token_file": "NOMAD_TOKEN"}


def profile_nomad() -> dict[str, str]:
    """The active profile's Nomad settings ({} without a profile or settings)."""
    nomad = _profile().get("nomad")
    return {k: str(v) for k, v in nomad.items() if k in NOMAD_SETTINGS} \
        if isinstance(nomad, dict) else {}


def set_profile_nomad(name: str, settings: dict[str, str], clear: bool = False) -> dict[str, str]:
    """`mctl profile nomad NAME --address ...`: add to (or, with `clear`, replace) profile
    NAME's Nomad settings; returns them. Files are checked and stored as absolute paths."""
    from mctl.exception import InvalidError, NotFoundError

    profiles, active = _profiles()
    if name not in profiles:
        raise NotFoundError(f"No profile named {name!r}; `mctl token set TOKEN --server URL "
                            f"--profile {name}` creates it ({', '.join(profiles) or 'none yet'} "
                            "exist).")
    address = settings.get("address")
    if address and not address.startswith(("http://", "https://")):
        raise InvalidError(f"The Nomad address {address!r} must start with http:// or https://, "
                           "e.g. https://nomad.example.org:4646 (as NOMAD_ADDR).")
    for key in ("cacert", "token_file"):
        if settings.get(key):
            path = Path(settings[key]).expanduser().resolve()
            if not path.is_file():
                raise InvalidError(f"--{key.replace('_', '-')} {settings[key]}: no such file; "
                                   "give the path of an existing file.")
            settings = {**settings, key: str(path)}
    old = profiles[name].get("nomad")
    nomad = {} if clear or not isinstance(old, dict) else dict(old)
    nomad.update({k: v.rstrip("/") if k == "address" else v for k, v in settings.items() if v})
    if nomad:
        profiles[name]["nomad"] = nomad  # type: ignore[assignment]
    else:
        profiles[name].pop("nomad", None)
    _write_profiles(profiles, active)
    return nomad


def _write_profiles(profiles: dict[str, dict[str, str]], active: str | None) -> Path:
    path = profile_file()
    write_private(path, json.dumps({"active": active, "profiles": profiles}, indent=2) + "\n")
    return path
