"""Variants of a class: `Model.with_options(gpu="A100")`, `with_concurrency`, `with_batching`.

As in Modal, a variant is a function of its own (its own id, its own pool of workers) running the
class's code with some FunctionSpec fields overridden. The store keeps each variant's overrides
(`function_variants`); its spec is derived from the class's spec of the app's current version
whenever that version is activated (a redeploy updates the code of every variant; a variant of
a class that is no longer in the app is dropped). Variants take the class's version number, so
workers of an older version drain as the class's do.
"""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mctl.core.spec import AppSpec, variant_spec

if TYPE_CHECKING:
    from mctl.core.server.store import Store

log = logging.getLogger("mctl.server")

# Overrides that widen what the variant's code can reach (secret values, volume files) need the
# `deploy` scope, as a deploy would; the others (resources, scaling, timeout, ...) only `invoke`.
_DEPLOY_ONLY = ("secrets", "volumes", "read_only_volumes")


def expand(store: Store, app_id: str, spec: AppSpec) -> AppSpec:
    """`spec` with the app's variants added (each derived from its class in `spec`)."""
    variants = store.variants(app_id)
    if not variants:
        return spec
    functions = {tag: f for tag, f in spec.functions.items() if f.variant_of is None}
    for base_tag, overrides in variants:
        base = functions.get(base_tag)
        if base is None or base.kind != "class":
            continue  # the class left the app in this version
        try:
            variant = variant_spec(base, app_id, overrides)
        except ValueError as exc:  # the class changed so that the overrides no longer fit
            log.warning("dropping variant of %s in app %s: %s", base_tag, app_id, exc)
            continue
        functions[variant.tag] = variant
    return spec.model_copy(update={"functions": functions})


def expand_json(store: Store, app_id: str, spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """`expand` for a stored version's spec, as JSON (what workers load)."""
    if spec is None or not store.variants(app_id):
        return spec
    return expand(store, app_id, AppSpec.model_validate(spec)).model_dump(mode="json")


async def create_variant(request: web.Request) -> web.Response:
    """POST /api/functions/{function_id}/variants {"overrides": {...}, "secrets": {...}}: the
    variant's function id (created, and its pool started, if it did not exist)."""
    from mctl.core import secret_store
    from mctl.core.environment import check_app, grant_app
    from mctl.core.server.auth import Principal
    from mctl.core.server.audit import PRINCIPAL_KEY
    from mctl.core.server.http import _control, _json_error
    from mctl.exception import InvalidError

    control = _control(request)
    fs = control.functions.get(request.match_info["function_id"])
    if fs is None or fs.stopped:
        return _json_error(404, "No such running class; is its app still running?")
    base = fs.spec
    principal: Principal | None = request.get(PRINCIPAL_KEY)
    if principal is not None and principal.is_task and principal.app_id != fs.app_id:
        return _json_error(403, "A task token may make variants of its own app's classes only.")
    if base.kind != "class" or base.variant_of is not None:
        return _json_error(400, f"{base.tag} is not a class; only an @app.cls class has "
                                "with_options/with_concurrency/with_batching.")
    body = await request.json()
    overrides = body.get("overrides")
    if not isinstance(overrides, dict) or not overrides:
        return _json_error(400, "A variant needs overrides: an object of options to change.")
    wide = [k for k in _DEPLOY_ONLY if k in overrides]
    if wide and principal is not None and not principal.has("deploy"):
        return _json_error(403, f"with_options({', '.join(wide)}=...) changes what the class's "
                                "code can reach and needs a token with the deploy scope.")
    try:
        variant = variant_spec(base, fs.app_id, overrides)
    except ValueError as exc:
        return _json_error(400, f"{base.tag}.with_options(): {exc}.")
    if variant.function_id not in control.functions:
        one = SimpleNamespace(functions={variant.tag: variant})
        created = secret_store.store_inline(one, body.get("secrets") or {})
        try:
            check_app(one)  # type: ignore[arg-type]
            spec = control.apps.get(fs.app_id)
            if spec is None:
                raise InvalidError(f"App {fs.app_id} is not running.")
            if variant.secrets:  # e.g. Vault: the app's policy now covers these names too
                full = spec.model_copy(update={"functions": {**spec.functions,
                                                             variant.tag: variant}})
                await asyncio.to_thread(grant_app, fs.app_id, full)
            await control.add_variant(fs.app_id, base.tag, variant, overrides)
        except BaseException:
            secret_store.forget(created)
            raise
        control.audit(request, "function.variant", variant.function_id, app_id=fs.app_id,
                      of=base.tag, options=sorted(overrides))
    return web.json_response({"function_id": variant.function_id, "tag": variant.tag,
                              "app_id": fs.app_id})


def routes(task_any: str) -> list[tuple[str, str, Any, str, str]]:
    return [("POST", "/api/functions/{function_id}/variants", create_variant, "invoke",
             task_any)]
