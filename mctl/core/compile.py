"""SDK objects -> AppSpec: validate once, bundle the source, pickle `serialized=True` functions."""

from __future__ import annotations

import inspect
import io
import os
import sys
import zipfile
from typing import TYPE_CHECKING, Any

from mctl.core.protocol import blob_id
from mctl.core.spec import (AppSpec, AutoscalingSpec, FunctionSpec, ImageSpec, ResourcesSpec,
                            function_id)
from mctl.exception import InvalidError

if TYPE_CHECKING:
    from mctl.core.declared import DeclaredApp


def _source_file(obj: Any) -> str | None:
    try:
        return os.path.abspath(inspect.getfile(obj))
    except (TypeError, OSError):
        return None


def _module_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _local_module_files(root: str) -> list[str]:
    """Files of imported modules under `root`: the app's own helper modules and packages."""
    files = []
    prefix = root.rstrip(os.sep) + os.sep
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not path or name.split(".")[0] == "mctl":
            continue
        path = os.path.abspath(path)
        if (path.startswith(prefix) and path.endswith(".py")
                and "site-packages" not in path and "dist-packages" not in path):
            files.append(path)
    return files


def _defining_files(app: DeclaredApp) -> list[str]:
    """The files that define the app's functions, the first one being the app's main module."""
    defining: list[str] = []
    for handle in app.registered_functions.values():
        path = _source_file(handle.raw_object) if handle.raw_object is not None else None
        if path and path not in defining:
            defining.append(path)
    if not defining:
        main = getattr(sys.modules.get("__main__"), "__file__", None)
        if not main:
            raise InvalidError("Cannot find the source file of this app; define its functions in "
                               "a .py file.")
        defining.append(os.path.abspath(main))
    return defining


def make_bundle(app: DeclaredApp) -> tuple[str, bytes]:
    """Zip the app's source: the file defining its functions and the local modules and packages
    it imported from that file's directory. Returns (main module, zip bytes).

    The zip is written deterministically, so the same source gives the same blob id.
    """
    defining = _defining_files(app)
    root = os.path.dirname(defining[0])
    members = {os.path.basename(defining[0]): defining[0]}
    for path in _local_module_files(root):
        members[os.path.relpath(path, root)] = path
    for path in defining[1:]:  # functions included from files elsewhere
        members.setdefault(os.path.basename(path), path)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for arcname in sorted(members):
            info = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))
            with open(members[arcname], "rb") as fh:
                zf.writestr(info, fh.read())
    return _module_name(defining[0]), buffer.getvalue()


def inline_secret_values(app: DeclaredApp, app_id: str) -> dict[str, dict[str, str]]:
    """Values of the secrets given in code, by the reserved names their spec refs carry: the
    client sends them beside the spec, for the control plane to put in the secret backend."""
    out = {}
    for handle in app.registered_functions.values():
        for secret in [*app.secrets, *handle.options.get("secrets", [])]:
            if secret.name is None:
                out[secret.ref(app_id)["name"]] = dict(secret.values or {})
    return out


def compile_app(app: DeclaredApp, app_id: str, name: str | None = None
                ) -> tuple[AppSpec, dict[str, bytes]]:
    """Return the validated spec and the blobs (bundle, pickled functions) it refers to."""
    from mctl.core.serialization import dumps

    module, bundle = make_bundle(app)
    source_root = os.path.dirname(_defining_files(app)[0])
    app_name = name or app.name or module
    blobs = {blob_id(bundle): bundle}
    images: dict[str, ImageSpec] = {}
    functions: dict[str, FunctionSpec] = {}
    for tag, handle in app.registered_functions.items():
        opts = handle.options
        image = opts.get("image") or app.image
        if image.object_id not in images:
            blobs.update(image.blobs())  # the files the image adds, zipped
            images[image.object_id] = ImageSpec(image_id=image.object_id, recipe=image.recipe())
        retries = opts.get("retries")
        secrets = [s.ref(app_id) for s in [*app.secrets, *opts.get("secrets", [])]]
        volumes = {**app.volume_mounts, **(opts.get("volumes") or {})}
        own = opts.get("volumes") or {}  # a function's own mount overrides the app's at a path
        read_only = sorted({p for p in getattr(app, "read_only_volumes", []) if p not in own}
                           | set(opts.get("read_only_volumes") or []))
        raw = handle.raw_object
        pickled = None
        if opts.get("serialized"):
            data = dumps(handle.remote_object())
            pickled = blob_id(data)
            blobs[pickled] = data
        common = dict(
            tag=tag, function_id=function_id(app_id, tag), module=module,
            qualname=getattr(raw, "__qualname__", tag), serialized=bool(opts.get("serialized")),
            pickled_blob=pickled, timeout=opts["timeout"],
            retries=retries.policy() if retries else None,
            autoscaling=AutoscalingSpec(
                min_containers=opts["min_containers"], max_containers=opts["max_containers"],
                buffer_containers=opts["buffer_containers"],
                scaledown_window=opts["scaledown_window"]),
            resources=ResourcesSpec(cpu=opts.get("cpu"), memory_mb=opts.get("memory"),
                                    gpu=opts.get("gpu"), cpu_limit=opts.get("cpu_limit"),
                                    memory_limit_mb=opts.get("memory_limit"),
                                    gpu_fallbacks=opts.get("gpu_fallbacks") or []),
            image_id=image.object_id, secrets=secrets, volumes=volumes,
            read_only_volumes=read_only, env=opts.get("env") or {},
            max_inputs=opts.get("max_inputs", 1), target_inputs=opts.get("target_inputs"),
            batch_max_size=opts.get("max_batch_size"), batch_wait_ms=opts.get("wait_ms"),
            container_max_inputs=opts.get("container_max_inputs"),
            restrict_modal_access=bool(opts.get("restrict_modal_access")),
            block_network=bool(opts.get("block_network")),
        )
        try:
            functions[tag] = FunctionSpec(**handle.spec_fields(), **common)
        except ValueError as exc:
            raise InvalidError(f"Function {tag}: {exc}") from None
    _check_web_dependencies(functions)
    try:
        spec = AppSpec(name=app_name, module=module, bundle_blob=blob_id(bundle),
                       source_root=source_root,
                       functions=functions, images=images)
    except ValueError as exc:
        raise InvalidError(f"App {app_name}: {exc}") from None
    return spec, blobs


def _check_web_dependencies(functions: dict[str, FunctionSpec]) -> None:
    """A `@fastapi_endpoint` is served by a FastAPI app the worker builds: refuse to deploy one
    where FastAPI is missing (workers run this machine's interpreter or an image made from it)."""
    import importlib.util

    for tag, fspec in functions.items():
        webs = [fspec.web, *(m.web for m in fspec.methods.values())]
        if any(w is not None and w.kind == "fastapi" for w in webs):
            if importlib.util.find_spec("fastapi") is None:
                raise InvalidError(f"Function {tag} is a @fastapi_endpoint, which needs FastAPI, "
                                   "and FastAPI is not installed; install it with "
                                   "`pip install 'mctl[web]'`.")
