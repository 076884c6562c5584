"""`modal.runner`'s programmatic deploy, for code written against it: `deploy_app(app, name=)`.

Today's spelling is `app.deploy(name=...)`; this one still works and warns once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DeployResult:
    """What Modal's deploy_app returns: the app's id, where to look at it, and warnings."""

    app_id: str
    app_page_url: str
    app_logs_url: str
    warnings: list[str] = field(default_factory=list)


def deploy_app(app: Any, name: str | None = None, namespace: Any = None, client: Any = None,
               environment_name: str | None = None, tag: str = "") -> DeployResult:
    """Deploy `app` (under `name`) to the control plane, as `app.deploy(name=...)` does."""
    from mctl.core.runner import deploy_app as deploy
    from mctl.sdk.app import _in_worker
    from mctl.sdk.deprecated import warn_once

    if _in_worker():  # a worker importing the file: the deploy was the deployer's (App.deploy)
        app._skip_in_worker()
        return DeployResult(app.app_id or "", "", "")

    warn_once("deploy_app", "deploy_app(app, name=...) is an older Modal spelling; use "
                            "app.deploy(name=...).", stacklevel=2)
    result = deploy(app, name=name)
    logs = f"mctl app logs {result['name']}"
    return DeployResult(result["app_id"], result["url"], logs)
