"""`Image`: an immutable recipe; builder plugins consume the finished recipe.

Every method returns a new `Image` whose `steps` extend its base's. The default image (no base, no
steps) is the Python environment mctl itself runs in. An image's id is a content hash of its recipe
and of the files it adds, so an unchanged image is never rebuilt. Local files are read lazily, when
the app is deployed: a worker importing the app's module pays nothing for them.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from mctl.exception import InvalidError

# Where add_local_python_source puts modules in a container (on its PYTHONPATH), as Modal's /root.
PYTHON_SOURCE_ROOT = "/root"


class Image:
    def __init__(self, base: dict[str, Any] | None = None, steps: tuple[dict[str, Any], ...] = (),
                 python_version: str | None = None, *, _files: tuple[Any, ...] = (),
                 _secret: Any = None) -> None:
        self.base = base
        self.steps = steps
        self.python_version = python_version
        # (step index, callable returning the zip bytes of the step's files): read at deploy.
        self._files = _files
        self._secret = _secret  # from_registry's credentials (a named Secret)
        self._blobs: dict[str, bytes] | None = None
        self._recipe: dict[str, Any] | None = None

    def _extend(self, files: Callable[[], bytes] | None = None, **step: Any) -> Image:
        extra = ((len(self.steps), files),) if files is not None else ()
        return Image(self.base, self.steps + (step,), self.python_version,
                     _files=self._files + extra, _secret=self._secret)

    # --- bases ---------------------------------------------------------------------------------
    @staticmethod
    def debian_slim(python_version: str | None = None, force_build: bool = False) -> Image:
        """Debian with Python, built locally from Debian's packages (or, on the local backend, a
        virtual environment of the host's Python when the recipe allows it). `python_version`:
        3.9 (bullseye), 3.11 (bookworm, the default), 3.13 (trixie) or 3.14 (forky); the
        control plane refuses others unless it names a base for them (see the guide)."""
        return Image({"kind": "debian_slim", **_force(force_build)},
                     python_version=_python_version(python_version))

    @staticmethod
    def from_registry(tag: str, *, secret: Any = None, add_python: str | None = None,
                      setup_dockerfile_commands: Sequence[str] = (),
                      force_build: bool = False, **extra: Any) -> Image:
        """An image from a registry, e.g. `Image.from_registry("127.0.0.1:5000/tools:1")`.
        `secret` is a named secret with REGISTRY_USERNAME and REGISTRY_PASSWORD."""
        _unsupported("from_registry", extra)
        if not isinstance(tag, str) or not tag:
            raise InvalidError("Image.from_registry needs an image reference such as 'python:3.11'.")
        secret_name = None
        if secret is not None:
            if getattr(secret, "name", None) is None:
                raise InvalidError("Image.from_registry(secret=...) needs a named secret; create "
                                   "it with `mctl secret create NAME REGISTRY_USERNAME=... "
                                   "REGISTRY_PASSWORD=...` and pass mctl.Secret.from_name(NAME).")
            secret_name = secret.name
        base = {"kind": "registry", "tag": tag, "secret": secret_name,
                "setup": list(setup_dockerfile_commands), **_force(force_build)}
        return Image(base, python_version=_python_version(add_python), _secret=secret)

    @staticmethod
    def from_dockerfile(path: str | os.PathLike[str], *, context_dir: str | None = None,
                        build_args: dict[str, str] | None = None, force_build: bool = False,
                        add_python: str | None = None, ignore: Sequence[str] = (),
                        **extra: Any) -> Image:
        """Build from a Dockerfile; `context_dir` (default: the Dockerfile's directory) is sent
        with it, so `COPY` works as with `docker build`."""
        _unsupported("from_dockerfile", extra)
        dockerfile = Path(path)
        if _in_worker():  # the worker imports the app's module; the image is already built
            return Image({"kind": "dockerfile", "path": str(dockerfile)})
        if not dockerfile.is_file():
            raise InvalidError(f"Image.from_dockerfile: no Dockerfile at {dockerfile}; give the "
                               "path of an existing file.")
        context = Path(context_dir) if context_dir is not None else dockerfile.parent
        if not context.is_dir():
            raise InvalidError(f"Image.from_dockerfile: context_dir {context} is not a directory.")
        args = dict(build_args or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in args.items()):
            raise InvalidError("Image.from_dockerfile: build_args is a dict of str to str.")
        base = {"kind": "dockerfile", "dockerfile": dockerfile.read_text(), "build_args": args,
                **_force(force_build)}
        return Image(base, python_version=_python_version(add_python),
                     _files=((-1, lambda: zip_dir(context, ignore)),))

    @staticmethod
    def micromamba(python_version: str | None = None, force_build: bool = False) -> Image:
        """A conda environment managed by micromamba. It needs a base image that has micromamba
        and a conda channel the build reaches: set MCTL_IMAGE_BASE_MICROMAMBA on the control
        plane (see the guide); without one the deploy fails saying so."""
        return Image({"kind": "micromamba", **_force(force_build)},
                     python_version=_python_version(python_version))

    def micromamba_install(self, *packages: str | Sequence[str], spec_file: str | None = None,
                           channels: Sequence[str] = (), force_build: bool = False,
                           **extra: Any) -> Image:
        """Conda packages, installed with micromamba into the image's base environment."""
        _unsupported("micromamba_install", extra)
        pkgs = _flatten(packages, "micromamba_install")
        if spec_file is not None and not _in_worker():
            path = Path(spec_file)
            if not path.is_file():
                raise InvalidError(f"Image.micromamba_install: no spec file {path}.")
            spec = path.read_text()
        else:
            spec = None
        if not pkgs and spec is None:
            return self
        if not all(isinstance(c, str) for c in channels):
            raise InvalidError("Image.micromamba_install: channels is a list of channel names "
                               "or URLs.")
        return self._extend(kind="micromamba_install", packages=pkgs, spec=spec,
                            channels=list(channels), **_force(force_build))

    # --- Python packages -----------------------------------------------------------------------
    def pip_install(self, *packages: str | Sequence[str], index_url: str | None = None,
                    extra_index_url: str | None = None, find_links: str | None = None,
                    pre: bool = False, extra_options: str = "", force_build: bool = False,
                    secrets: Sequence[Any] = (), **extra: Any) -> Image:
        """`secrets`: named secrets whose keys are environment variables of this step only
        (a private index's credentials); they are not kept in the image."""
        _unsupported("pip_install", extra)
        pkgs = _flatten(packages, "pip_install")
        if not pkgs:
            return self
        options = {k: v for k, v in {"index_url": index_url, "extra_index_url": extra_index_url,
                                      "find_links": find_links, "pre": pre or None,
                                      "extra_options": extra_options or None}.items() if v}
        return self._extend(kind="pip_install", packages=pkgs, options=options,
                            **_secrets(secrets, "pip_install"), **_force(force_build))

    def uv_pip_install(self, *packages: str | Sequence[str], **options: Any) -> Image:
        """Installed with pip: same result, one tool fewer to provide on every node."""
        return self.pip_install(*packages, **options)

    def pip_install_from_requirements(self, requirements_txt: str, *, find_links: str | None = None,
                                      **options: Any) -> Image:
        path = Path(requirements_txt)
        if _in_worker():
            return self
        if not path.is_file():
            raise _no_local("pip_install_from_requirements", "file", path)
        lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
        return self.pip_install(*[line for line in lines if line], find_links=find_links,
                                **options)

    def pip_install_from_pyproject(self, pyproject_toml: str, *,
                                   optional_dependencies: Sequence[str] = (),
                                   **options: Any) -> Image:
        import tomllib

        path = Path(pyproject_toml)
        if _in_worker():
            return self
        if not path.is_file():
            raise _no_local("pip_install_from_pyproject", "file", path)
        project = tomllib.loads(path.read_text()).get("project", {})
        deps = list(project.get("dependencies", []))
        for group in optional_dependencies:
            deps += project.get("optional-dependencies", {}).get(group, [])
        return self.pip_install(*deps, **options)

    # --- system --------------------------------------------------------------------------------
    def apt_install(self, *packages: str | Sequence[str], force_build: bool = False,
                    secrets: Sequence[Any] = (), **extra: Any) -> Image:
        _unsupported("apt_install", extra)
        pkgs = _flatten(packages, "apt_install")
        return self._extend(kind="apt_install", packages=pkgs, **_secrets(secrets, "apt_install"),
                            **_force(force_build)) if pkgs else self

    def run_commands(self, *commands: str | Sequence[str], force_build: bool = False,
                     secrets: Sequence[Any] = (), **extra: Any) -> Image:
        """Shell commands, each its own layer; `secrets` (named) are in their environment only."""
        _unsupported("run_commands", extra)
        cmds = _flatten(commands, "run_commands")
        return self._extend(kind="run_commands", commands=cmds,
                            **_secrets(secrets, "run_commands"),
                            **_force(force_build)) if cmds else self

    def env(self, vars: dict[str, str]) -> Image:  # noqa: A002 - Modal's name
        if not isinstance(vars, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in vars.items()):
            raise InvalidError("Image.env takes a dict of str to str.")
        return self._extend(kind="env", vars=dict(vars))

    def workdir(self, path: str | os.PurePosixPath) -> Image:
        if not str(path).startswith("/"):
            raise InvalidError(f"Image.workdir needs an absolute path, got {str(path)!r}.")
        return self._extend(kind="workdir", path=str(path))

    def entrypoint(self, entrypoint_commands: list[str]) -> Image:
        if not isinstance(entrypoint_commands, list) or not all(
                isinstance(c, str) for c in entrypoint_commands):
            raise InvalidError("Image.entrypoint takes a list of strings, e.g. ['/bin/sh', '-c'].")
        return self._extend(kind="entrypoint", command=list(entrypoint_commands))

    def dockerfile_commands(self, *commands: str | Sequence[str], force_build: bool = False,
                            **extra: Any) -> Image:
        _unsupported("dockerfile_commands", extra)
        return self._extend(kind="dockerfile_commands",
                            commands=_flatten(commands, "dockerfile_commands"),
                            **_force(force_build))

    def cmd(self, cmd: list[str]) -> Image:
        """The image's default command (Dockerfile `CMD`); mctl's workers do not use it."""
        if not isinstance(cmd, list) or not all(isinstance(c, str) for c in cmd):
            raise InvalidError("Image.cmd takes a list of strings, e.g. ['python3', 'app.py'].")
        return self._extend(kind="cmd", command=list(cmd))

    # --- files ---------------------------------------------------------------------------------
    def add_local_file(self, local_path: str | os.PathLike[str], remote_path: str, *,
                       copy: bool = False) -> Image:
        """`copy=False` adds the file when the container starts; `copy=True` bakes a layer."""
        src = Path(local_path)
        if not src.is_file() and not _in_worker():
            raise _no_local("add_local_file", "file", src)
        if not remote_path.startswith("/"):
            raise InvalidError(f"Image.add_local_file: remote_path must be absolute, got "
                               f"{remote_path!r}.")
        if remote_path.endswith("/"):
            remote_path += src.name
        return self._extend(lambda: zip_files({Path(remote_path).name: src}), kind="add_local_file",
                            remote_path=remote_path, copy=bool(copy))

    def add_local_dir(self, local_path: str | os.PathLike[str], remote_path: str, *,
                      copy: bool = False, ignore: Sequence[str] | Callable[[Path], bool] = ()
                      ) -> Image:
        src = Path(local_path)
        if not src.is_dir() and not _in_worker():
            raise _no_local("add_local_dir", "directory", src)
        if not remote_path.startswith("/"):
            raise InvalidError(f"Image.add_local_dir: remote_path must be absolute, got "
                               f"{remote_path!r}.")
        return self._extend(lambda: zip_dir(src, ignore), kind="add_local_dir",
                            remote_path=remote_path.rstrip("/") or "/", copy=bool(copy))

    def add_local_python_source(self, *modules: str, copy: bool = False,
                                ignore: Sequence[str] | Callable[[Path], bool] = ()) -> Image:
        """Local modules or packages, importable by name in the function's environment."""
        import importlib.util

        members: list[tuple[str, Path]] = []
        for name in modules if not _in_worker() else ():
            spec = importlib.util.find_spec(name)
            if spec is None or spec.origin in (None, "built-in", "frozen"):
                raise InvalidError(f"Image.add_local_python_source: no local module {name!r}; "
                                   "give the name you import it by.")
            origin = Path(spec.origin)
            if spec.submodule_search_locations:
                members.append((name.replace(".", "/"), origin.parent))
            else:
                members.append((name.replace(".", "/") + origin.suffix, origin))

        def files() -> bytes:
            out: dict[str, Path] = {}
            for arc, path in members:
                if path.is_dir():
                    for sub in _walk(path, ignore or ["__pycache__", "*.pyc"]):
                        out[f"{arc}/{sub.relative_to(path).as_posix()}"] = sub
                else:
                    out[arc] = path
            return zip_files(out)

        return self._extend(files, kind="add_local_python_source", modules=sorted(modules),
                            remote_path=PYTHON_SOURCE_ROOT, copy=bool(copy))

    # --- composition ---------------------------------------------------------------------------
    def run_function(self, raw_f: Callable[..., Any], *, secrets: Sequence[Any] = (),
                     args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
                     force_build: bool = False, **extra: Any) -> Image:
        """Run `raw_f(*args, **kwargs)` at build time, in the environment built so far; what it
        writes to disk is part of the image. `secrets` (named) are in its environment only."""
        _unsupported("run_function", extra)
        if not callable(raw_f):
            raise InvalidError("Image.run_function takes a function.")

        def pickled() -> bytes:
            import cloudpickle

            module = __import__("sys").modules.get(raw_f.__module__)
            if module is not None and raw_f.__module__ not in ("__main__",) and not \
                    raw_f.__module__.startswith("mctl"):
                cloudpickle.register_pickle_by_value(module)  # the build has no copy of it
            try:
                data = cloudpickle.dumps((raw_f, tuple(args), dict(kwargs or {})))
            finally:
                if module is not None and raw_f.__module__ not in ("__main__",) and not \
                        raw_f.__module__.startswith("mctl"):
                    cloudpickle.unregister_pickle_by_value(module)
            return zip_files({"function.pkl": data})

        return self._extend(pickled, kind="run_function",
                            name=getattr(raw_f, "__qualname__", "function"),
                            **_secrets(secrets, "run_function"), **_force(force_build))

    def pipe(self, recipe: Callable[[Image], Image]) -> Image:
        """Apply a user recipe: `image.pipe(add_cuda)`, where `add_cuda(image) -> Image`."""
        result = recipe(self)
        if not isinstance(result, Image):
            raise InvalidError(f"Image.pipe({getattr(recipe, '__name__', recipe)}) must return an "
                               f"Image, got {type(result).__name__}.")
        return result

    def imports(self) -> Any:
        """`with image.imports():` as Modal: imports that only work inside the image."""
        import contextlib

        return contextlib.suppress(ImportError)

    # --- identity ------------------------------------------------------------------------------
    @property
    def is_default(self) -> bool:
        return self.base is None and not self.steps

    def blobs(self) -> dict[str, bytes]:
        """The zipped files the recipe adds, by blob id (read from disk once, at deploy)."""
        if self._blobs is None:
            from mctl.core.protocol import blob_id

            self._blobs = {}
            ids: dict[int, str] = {}
            for index, make in self._files:
                data = make()
                ids[index] = blob_id(data)
                self._blobs[ids[index]] = data
            steps = [dict(s, blob=ids[i]) if i in ids else dict(s) for i, s in enumerate(self.steps)]
            base = dict(self.base, context_blob=ids[-1]) if -1 in ids and self.base else self.base
            self._recipe = {"base": base, "python_version": self.python_version, "steps": steps}
        return self._blobs

    def recipe(self) -> dict[str, Any]:
        self.blobs()
        assert self._recipe is not None
        return self._recipe

    @property
    def object_id(self) -> str:
        return image_id(self.recipe())

    def __repr__(self) -> str:
        base = (self.base or {}).get("kind", "default")
        return f"Image({base}, {len(self.steps)} steps)"


def image_id(recipe: dict[str, Any]) -> str:
    """The content hash of a recipe; `force_build` marks do not change it."""
    def strip(d: Any) -> Any:
        return {k: v for k, v in d.items() if k != "force_build"} if isinstance(d, dict) else d

    ident = {"base": strip(recipe.get("base")), "python_version": recipe.get("python_version"),
             "steps": [strip(s) for s in recipe.get("steps", [])]}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return f"im-{digest[:22]}"


def zip_files(members: dict[str, Path | bytes]) -> bytes:
    """A deterministic zip (fixed times, sorted names, file modes kept): same files, same blob."""
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for arcname in sorted(members):
            info = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))
            src = members[arcname]
            if isinstance(src, bytes):
                info.external_attr = 0o644 << 16
                zf.writestr(info, src)
            else:
                info.external_attr = (os.stat(src).st_mode & 0o777) << 16
                zf.writestr(info, src.read_bytes())
    return buffer.getvalue()


def zip_dir(root: Path, ignore: Sequence[str] | Callable[[Path], bool]) -> bytes:
    return zip_files({p.relative_to(root).as_posix(): p for p in _walk(root, ignore)})


def _walk(root: Path, ignore: Sequence[str] | Callable[[Path], bool]) -> list[Path]:
    def ignored(path: Path) -> bool:
        if callable(ignore):
            return bool(ignore(path))
        rel = path.relative_to(root).as_posix()
        return any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(path.name, pat) for pat in ignore)

    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not ignored(Path(dirpath) / d))
        out += [Path(dirpath) / f for f in sorted(filenames) if not ignored(Path(dirpath) / f)]
    return out


def _no_local(method: str, kind: str, given: Path) -> InvalidError:
    """No such local file or directory: the full path tried (a relative one is taken from the
    current directory, as in Modal), and a hint when one of that name is next to the app file."""
    import sys

    cwd = Path.cwd()
    tried = cwd / given
    text = f"Image.{method}: no {kind} {tried}"
    if given.is_absolute():
        return InvalidError(text + ".")
    text += f" (a relative path is taken from the current directory, {cwd}, as in Modal)."
    frame = sys._getframe(1)  # the first caller outside mctl: the app file
    package = str(Path(__file__).resolve().parent.parent)
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame = frame.f_back
    if frame is not None and not frame.f_code.co_filename.startswith("<"):
        here = Path(frame.f_code.co_filename).resolve().parent
        beside = here / given
        if here != cwd.resolve() and (beside.is_dir() if kind == "directory"
                                      else beside.is_file()):
            text += (f" {beside} exists next to the app file: write Path(__file__).parent / "
                     f"{str(given)!r} to use it from any directory.")
    return InvalidError(text)


def _in_worker() -> bool:
    """Inside a worker the app's module is imported again, where the deployer's files are not:
    recipes are not checked or read there (the image was built from them at deploy)."""
    return "MCTL_TASK_ID" in os.environ


def _force(force_build: bool) -> dict[str, Any]:
    return {"force_build": True} if force_build or os.environ.get("MCTL_FORCE_BUILD") or \
        os.environ.get("MODAL_FORCE_BUILD") else {}


# Modal keywords accepted and not applied, with why; any other unknown keyword is an error.
_NOT_APPLIED = {
    "gpu": "image builds run without GPUs here (a GPU is needed at run time, not to install)",
    "ignore": "", "context_mount": "", "include_source": "",
}


def _unsupported(method: str, extra: dict[str, Any]) -> None:
    import warnings

    unknown = sorted(k for k in extra if k not in _NOT_APPLIED)
    if unknown:
        raise InvalidError(f"Image.{method} got an unexpected keyword argument "
                           f"{', '.join(map(repr, unknown))}; mctl's Image.{method} does not "
                           "support it (see the Images section of the guide).")
    for key in sorted(k for k in extra if extra[k] not in (None, False, (), [], {})):
        why = _NOT_APPLIED[key] or "mctl does not need it"
        warnings.warn(f"Image.{method}({key}=...) is not applied: {why}.", stacklevel=3)


def _secrets(secrets: Sequence[Any], method: str) -> dict[str, Any]:
    """A build step's secrets, by name: their values are read by the builder at build time and
    never enter the recipe, the image id or the image."""
    if not secrets:
        return {}
    names = []
    for secret in secrets:
        name = getattr(secret, "name", None)
        if not name:
            raise InvalidError(f"Image.{method}(secrets=...) takes named secrets: create one with "
                               "`mctl secret create NAME KEY=VALUE` and pass "
                               "mctl.Secret.from_name(NAME).")
        names.append(name)
    return {"secrets": names}


def _python_version(version: str | None) -> str | None:
    if version is None:
        return None
    parts = str(version).split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts):
        raise InvalidError(f"python_version must look like '3.11', got {version!r}.")
    return ".".join(parts[:2])


def _flatten(items: tuple[Any, ...], method: str) -> list[str]:
    out: list[str] = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, (list, tuple)) and all(isinstance(i, str) for i in item):
            out.extend(item)
        else:
            raise InvalidError(f"Image.{method} takes strings or lists of strings, "
                               f"got {type(item).__name__}.")
    return out
