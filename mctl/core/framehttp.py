"""Blocking `protocol`-frame requests over a kept-alive HTTP connection per thread.

Dict and Queue calls from synchronous code use this instead of the client's background event
loop: handing each small request to another thread and back cost more than the request itself
(about 1 ms of a 1.5 ms `d[k]` on a busy 2-core machine). `.aio` calls use
`Client.post_frame` on the background loop. Both raise the mctl exception the server named.
"""

from __future__ import annotations

import http.client
import json
import threading
from typing import Any
from urllib.parse import urlsplit

from mctl.core import protocol, transport

_local = threading.local()
# A blocking request waits up to 50 s in the control plane; allow it that and some.
TIMEOUT = 90.0


def error_for(status: int, body: bytes, path: str) -> Exception:
    """The exception for an error answer: the class the server named (JSON `type`)."""
    from mctl import exception

    try:
        data = json.loads(body)
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    if status in (401, 403):
        return transport.refused(status, data.get("error"))
    if status == 413:
        return exception.RequestSizeError(
            f"The request to {path} is over the control plane's "
            f"{protocol.MAX_FRAME // (1024 * 1024)} MiB limit; send less at once.")
    exc_type = getattr(exception, str(data.get("type")), None)
    if not (isinstance(exc_type, type) and issubclass(exc_type, exception.Error)):
        exc_type = exception.NotFoundError if status == 404 else exception.InvalidError
    return exc_type(data.get("error", f"HTTP {status}"))


def _connection(url: str, fresh: bool) -> http.client.HTTPConnection:
    conns: dict[str, http.client.HTTPConnection] = getattr(_local, "conns", None) or {}
    _local.conns = conns
    conn = conns.get(url)
    if conn is None or fresh:
        if conn is not None:
            conn.close()
        parts = urlsplit(url)
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=TIMEOUT,
                                               context=transport.ssl_context(url))
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT)
        conns[url] = conn
    return conn


def post_frame(url: str, path: str, header: dict[str, Any], payloads: list[bytes]
               ) -> tuple[dict[str, Any], list[bytes]]:
    """POST one frame to `url + path` and decode the frame that comes back."""
    return protocol.decode(_post(url, path, protocol.encode(header, payloads),
                                 "application/octet-stream"))


def post_json(url: str, path: str, body: Any) -> Any:
    return json.loads(_post(url, path, json.dumps(body).encode(), "application/json"))


def _post(url: str, path: str, body: bytes, content_type: str) -> bytes:
    from mctl.exception import ConnectionError

    for attempt in (0, 1):
        conn = _connection(url, fresh=attempt == 1)
        # The token is read (env, profile, token file) once per connection, not per request.
        auth = getattr(conn, "mctl_auth", None)
        if auth is None:
            auth = conn.mctl_auth = transport.auth_headers(url)  # type: ignore[attr-defined]
        headers = {"Content-Type": content_type, **auth}
        reused = conn.sock is not None
        try:
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            break
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
            conn.close()
            if reused and attempt == 0:
                continue  # a kept-alive connection the server had closed: once more, fresh
            raise ConnectionError(f"Could not reach the mctl control plane at {url} ({exc}). "
                                  "Start one with `mctl server`, or set MCTL_SERVER_URL.") from None
        except OSError as exc:
            conn.close()
            err = transport.tls_error(url, exc)
            if err is not None:
                raise err from None
            raise ConnectionError(f"Could not reach the mctl control plane at {url} ({exc}). "
                                  "Start one with `mctl server`, or set MCTL_SERVER_URL.") from None
    if resp.status >= 400:
        raise error_for(resp.status, data, path)
    return data
