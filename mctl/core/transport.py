"""How every mctl client reaches a control plane: the token it sends (`Authorization: Bearer`) and
the TLS context that verifies the server (the system's CAs, or `MCTL_CA_FILE`).

The SDK client, the worker and the small urllib helpers all go through here, so that a token or a
CA file set once applies to every connection.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

from mctl.core import config
from mctl.exception import AuthError, ConnectionError

if TYPE_CHECKING:
    import ssl

UNAUTHORIZED = ("Missing or invalid token: create one with `mctl token create` on the server's "
                "machine and set MCTL_TOKEN, or run `mctl token set TOKEN`.")

REVOKED = ("This token was revoked: ask an admin for a new one (`mctl token create` on the "
           "server's machine) and set MCTL_TOKEN, or run `mctl token set TOKEN`.")

# Tokens of control planes started in this process (the embedded server of `app.run()`).
_tokens: dict[str, str] = {}


def use_token(url: str, token: str) -> None:
    """Make this process present `token` to the control plane at `url`."""
    _tokens[url.rstrip("/")] = token


def forget_token(url: str) -> None:
    _tokens.pop(url.rstrip("/"), None)


def token_for(url: str) -> str | None:
    """The token for `url` (a server's URL or any URL under it)."""
    for base, token in _tokens.items():
        if url == base or url.startswith(base + "/"):
            return token
    return config.configured_token()


def auth_headers(url: str) -> dict[str, str]:
    token = token_for(url)
    return {"Authorization": f"Bearer {token}"} if token else {}


def caller_headers(url: str) -> dict[str, str]:
    """The headers of the SDK's calls (Function.from_name, .remote, Dict, ...). In a worker, an
    `MCTL_TOKEN` its function was given (a Secret: a worker never gets the server's) goes instead
    of its task token, which may call its own app only: that is how a function calls another
    app's functions (docs/guide.md, "Task tokens"). The worker's own requests keep the task
    token (auth_headers)."""
    given = os.environ.get("MCTL_TOKEN", "").strip()
    if given and os.environ.get("MCTL_TASK_TOKEN") and url not in _tokens:
        return {"Authorization": f"Bearer {given}"}
    return auth_headers(url)


@functools.lru_cache(maxsize=4)
def _context(cafile: str | None) -> ssl.SSLContext:
    import ssl

    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConnectionError(f"Could not load MCTL_CA_FILE={cafile} ({exc}). Point MCTL_CA_FILE "
                              "at a PEM file of CA certificates, or unset it.") from None


def ssl_context(url: str) -> ssl.SSLContext | None:
    """The context that verifies an https control plane; None for plain http."""
    if not url.startswith(("https:", "wss:")):
        return None
    return _context(os.environ.get("MCTL_CA_FILE") or None)


def aiohttp_ssl(url: str) -> Any:
    """The `ssl=` argument for aiohttp: our context for https, aiohttp's default otherwise."""
    return ssl_context(url) or True


def _cert_failure(exc: BaseException | None) -> BaseException | None:
    """The ssl verification error inside `exc` (aiohttp wraps it in `certificate_error`,
    urllib in `URLError.reason`), or None."""
    import ssl

    for _ in range(5):
        if exc is None:
            return None
        inner = getattr(exc, "certificate_error", None)
        if inner is None and not isinstance(exc, ssl.SSLError):
            inner = getattr(exc, "reason", None)
        if not isinstance(inner, BaseException):
            return exc if isinstance(exc, ssl.SSLCertVerificationError) else None
        exc = inner
    return None


def tls_error(url: str, exc: BaseException) -> ConnectionError | None:
    """A clear error when `exc` is a failed certificate check, else None."""
    failure = _cert_failure(exc)
    if failure is None:
        return None
    reason = getattr(failure, "verify_message", None) or failure
    cafile = os.environ.get("MCTL_CA_FILE")
    hint = (f"MCTL_CA_FILE={cafile} does not hold the CA that signed it; point it at the right "
            "CA certificate" if cafile else
            "Set MCTL_CA_FILE to the CA certificate that signed the server's certificate")
    return ConnectionError(f"Could not verify the TLS certificate of the mctl control plane at "
                           f"{url} ({reason}). {hint}.")


def refused(status: int, message: str | None) -> AuthError:
    """The error for a 401 or 403 answer; the server's message says what to do."""
    if status == 401:
        return AuthError(f"{message or UNAUTHORIZED} {_token_source()}")
    return AuthError(message or "This token lacks the scope for this request; ask an admin for "
                                "a token with more rights (`mctl token create --scope ...`).")


def _token_source() -> str:
    """Which token a refused request sent, by where it came from (never its value)."""
    try:
        _, source = config.token_choice()
    except Exception:  # noqa: BLE001 - a bad MCTL_PROFILE: the refusal matters more here
        return ""
    if source is None:
        return (f"(No token was sent: none is set in MCTL_TOKEN, a profile, or "
                f"{config.local_token_file()}.)")
    return f"(The token sent came from {source}.)"


def urlopen(url: str, data: bytes | None = None, method: str | None = None,
            timeout: float = 300) -> Any:
    """urllib's urlopen with the control plane's token and TLS context; 401/403 raise AuthError,
    a failed certificate check a ConnectionError."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=data, method=method, headers=auth_headers(url))
    try:
        return urllib.request.urlopen(req, timeout=timeout, context=ssl_context(url))
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            try:
                message = json.loads(exc.read()).get("error")
            except ValueError:
                message = None
            raise refused(exc.code, message) from None
        raise
    except OSError as exc:
        err = tls_error(url, exc)
        if err is not None:
            raise err from None
        raise
