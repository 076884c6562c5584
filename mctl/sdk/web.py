"""Web decorators: `@fastapi_endpoint`, `@asgi_app`, `@wsgi_app`, `@web_server` (and the older
`@web_endpoint`). Each marks a function or an `@app.cls` method; `@app.function()` goes above it,
as in Modal. The control plane's gateway routes HTTP to the function's workers (see
`core/server/gateway.py`); the worker serves it (`core/runtime/web.py`)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from mctl.exception import InvalidError
from mctl.sdk.partial import WEB, PartialFunction, _wrap

_HTTP_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}


def _marker(decorator: str, args: tuple[Any, ...], web: dict[str, Any]
            ) -> Callable[[Any], PartialFunction]:
    if args:
        raise InvalidError(f"Use @mctl.{decorator}() with parentheses, not @mctl.{decorator}.")
    from mctl.core.spec import WebSpec

    try:
        WebSpec(**web)
    except ValueError as exc:
        first = exc.errors()[0] if hasattr(exc, "errors") else None  # type: ignore[attr-defined]
        reason = first["msg"] if first else str(exc)
        raise InvalidError(f"@mctl.{decorator}(): {reason}.") from None

    def wrapper(f: Any) -> PartialFunction:
        from mctl.sdk.function import Function

        if isinstance(f, Function):
            raise InvalidError(f"@mctl.{decorator}() must be below @app.function(), not above "
                               f"it: write @app.function() first, then @mctl.{decorator}().")
        pf = _wrap(f, decorator)
        if WEB in pf.flags:
            raise InvalidError(f"{pf.name} has two web decorators; keep one.")
        return pf.add(WEB, web=web)

    return wrapper


def fastapi_endpoint(*args: Any, method: str = "GET", label: str | None = None,
                     custom_domains: Iterable[str] | None = None, docs: bool = False,
                     requires_proxy_auth: bool = False) -> Callable[[Any], PartialFunction]:
    """Serve the function over HTTP through a FastAPI app made for it: query parameters and a
    JSON body become its arguments, its return value the JSON response."""
    if not isinstance(method, str) or method.upper() not in _HTTP_METHODS:
        raise InvalidError(f"@mctl.fastapi_endpoint(method={method!r}) must be one of "
                           f"{', '.join(sorted(_HTTP_METHODS))}.")
    return _marker("fastapi_endpoint", args, {
        "kind": "fastapi", "method": method.upper(), "label": label, "docs": bool(docs),
        "requires_proxy_auth": bool(requires_proxy_auth)})


def web_endpoint(*args: Any, method: str = "GET", label: str | None = None,
                 custom_domains: Iterable[str] | None = None, docs: bool = False,
                 requires_proxy_auth: bool = False, **_: Any) -> Callable[[Any], PartialFunction]:
    """Modal's older name of `fastapi_endpoint`."""
    from mctl.sdk.deprecated import warn_once

    # Shown once, at the user's own line, by the client only: workers import the same file.
    warn_once("web_endpoint", "mctl.web_endpoint is deprecated; use @mctl.fastapi_endpoint(...) "
              "instead.", stacklevel=2)
    return fastapi_endpoint(*args, method=method, label=label, docs=docs,
                            requires_proxy_auth=requires_proxy_auth)


def asgi_app(*args: Any, label: str | None = None, custom_domains: Iterable[str] | None = None,
             requires_proxy_auth: bool = False) -> Callable[[Any], PartialFunction]:
    """The function returns an ASGI app (FastAPI, Starlette, ...) that serves every request."""
    return _marker("asgi_app", args, {"kind": "asgi", "label": label,
                                      "requires_proxy_auth": bool(requires_proxy_auth)})


def wsgi_app(*args: Any, label: str | None = None, custom_domains: Iterable[str] | None = None,
             requires_proxy_auth: bool = False) -> Callable[[Any], PartialFunction]:
    """The function returns a WSGI app (Flask, Django, ...) that serves every request."""
    return _marker("wsgi_app", args, {"kind": "wsgi", "label": label,
                                      "requires_proxy_auth": bool(requires_proxy_auth)})


def web_server(port: int, *args: Any, startup_timeout: float = 5.0, label: str | None = None,
               custom_domains: Iterable[str] | None = None,
               requires_proxy_auth: bool = False) -> Callable[[Any], PartialFunction]:
    """The function starts a server listening on `port` (in the container); requests are
    forwarded to it once it accepts connections (within `startup_timeout` seconds)."""
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidError(f"@mctl.web_server(port={port!r}) must be a port number, 1 to 65535.")
    if not isinstance(startup_timeout, (int, float)) or startup_timeout <= 0:
        raise InvalidError(f"@mctl.web_server(startup_timeout={startup_timeout!r}) must be a "
                           "positive number of seconds.")
    return _marker("web_server", args, {"kind": "server", "port": port,
                                        "startup_timeout": float(startup_timeout), "label": label,
                                        "requires_proxy_auth": bool(requires_proxy_auth)})
