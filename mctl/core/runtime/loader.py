"""Load a function's user code inside a worker: the app bundle or a pickled function."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

from mctl.core.declared import is_app
from mctl.core.declared import ImportStopped
from mctl.core.spec import AppSpec, FunctionSpec


# A worker starting while its control plane restarts waits this long for it, as a running worker
# does when its connection drops, instead of dying with a connection error.
CONTROL_PLANE_PATIENCE_S = 120.0


def fetch_blob(http_url: str, blob_id: str) -> bytes:
    import urllib.error

    from mctl.core.transport import urlopen

    deadline = time.monotonic() + CONTROL_PLANE_PATIENCE_S
    while True:
        try:
            with urlopen(f"{http_url}/blobs/{blob_id}") as resp:
                return resp.read()
        except urllib.error.HTTPError:
            raise
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def cache_dir() -> Path:
    base = os.environ.get("MCTL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mctl")
    return Path(base)


def import_bundle(http_url: str, app: AppSpec) -> Any:
    """Fetch the app's source bundle (content-addressed, cached) and import its module."""
    import io
    import zipfile

    assert app.bundle_blob is not None
    target = cache_dir() / "bundles" / app.bundle_blob
    if not target.exists():
        data = fetch_blob(http_url, app.bundle_blob)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        zipfile.ZipFile(io.BytesIO(data)).extractall(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another worker won the race
            pass
    sys.path.insert(0, str(target))
    if app.source_root:  # tracebacks name the user's files, not this cache
        from mctl.core import tracebacks

        tracebacks.PATH_MAP[str(target)] = app.source_root
    if app.module in sys.modules:
        return sys.modules[app.module]
    spec = importlib.util.spec_from_file_location(app.module, target / f"{app.module}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[app.module] = module
    try:
        spec.loader.exec_module(module)
    except ImportStopped:
        pass  # a module-level `with app.run():`: the functions are defined above it
    return module


def find_user_object(module: Any, app: AppSpec, fspec: FunctionSpec) -> tuple[Any, Any]:
    """Return (the App object, what the container runs) for `fspec` in an imported module: the
    function, or for a class its `ClassRunner` (see `mctl.core.declared`)."""
    tag = fspec.variant_of or fspec.tag  # a with_options variant runs its class's code
    for value in vars(module).values():
        if is_app(value) and tag in value.registered_functions:
            return value, value.registered_functions[tag].remote_object()
    raise LookupError(f"{fspec.tag} not found in module {module.__name__}; was it renamed?")


def load_function(http_url: str, app: AppSpec, fspec: FunctionSpec) -> tuple[Any, Any]:
    module = import_bundle(http_url, app) if app.bundle_blob else None
    if fspec.serialized:
        import pickle

        assert fspec.pickled_blob is not None
        # The bundle is on sys.path first, so functions pickled by reference resolve too.
        return None, pickle.loads(fetch_blob(http_url, fspec.pickled_blob))
    return find_user_object(module, app, fspec)
