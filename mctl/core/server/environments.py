"""`GET /api/environment`: the one environment this control plane serves (`mctl environment
list`). Modal has several environments per workspace; mctl has one per control plane, named by
the server's `MCTL_ENVIRONMENT` (default `main`), which its workers see as
`MODAL_ENVIRONMENT`/`MCTL_ENVIRONMENT`."""

from __future__ import annotations

from typing import Any

from aiohttp import web


async def environment_route(request: web.Request) -> web.Response:
    from mctl.core.config import environment_name

    return web.json_response({"name": environment_name(), "default": True})


def routes(task_rule: str) -> list[tuple[str, str, Any, str, str]]:
    return [("GET", "/api/environment", environment_route, "invoke", task_rule)]
