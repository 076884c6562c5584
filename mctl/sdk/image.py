"""`Image`: an immutable recipe; builder plugins consume the finished recipe.

Every method returns a new `Image` whose `steps` extend its base's. The default image (no steps) is
the Python environment mctl itself runs in.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Sequence

from mctl.exception import InvalidError


class Image:
    def __init__(self, base: str | None = None, steps: tuple[dict[str, Any], ...] = (),
                 python_version: str | None = None) -> None:
        self.base = base
        self.steps = steps
        self.python_version = python_version

    def _extend(self, **step: Any) -> Image:
        return Image(self.base, self.steps + (step,), self.python_version)

    # --- bases ---------------------------------------------------------------------------------
    @staticmethod
    def debian_slim(python_version: str | None = None) -> Image:
        return Image("debian_slim", python_version=python_version)

    @staticmethod
    def from_registry(tag: str, *, add_python: str | None = None, secret: Any = None) -> Image:
        if not isinstance(tag, str) or not tag:
            raise InvalidError("Image.from_registry needs an image reference such as 'python:3.11'.")
        return Image(f"registry:{tag}", python_version=add_python)

    @staticmethod
    def micromamba(python_version: str | None = None) -> Image:
        return Image("micromamba", python_version=python_version)

    # --- layers --------------------------------------------------------------------------------
    def pip_install(self, *packages: str | Sequence[str], **options: Any) -> Image:
        return self._extend(kind="pip_install", packages=_flatten(packages, "pip_install"),
                            options={k: v for k, v in options.items() if v is not None})

    def uv_pip_install(self, *packages: str | Sequence[str], **options: Any) -> Image:
        return self._extend(kind="uv_pip_install", packages=_flatten(packages, "uv_pip_install"),
                            options={k: v for k, v in options.items() if v is not None})

    def apt_install(self, *packages: str | Sequence[str]) -> Image:
        return self._extend(kind="apt_install", packages=_flatten(packages, "apt_install"))

    def run_commands(self, *commands: str | Sequence[str], **options: Any) -> Image:
        return self._extend(kind="run_commands", commands=_flatten(commands, "run_commands"))

    def env(self, vars: dict[str, str]) -> Image:  # noqa: A002 - Modal's name
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in vars.items()):
            raise InvalidError("Image.env takes a dict of str to str.")
        return self._extend(kind="env", vars=dict(vars))

    def workdir(self, path: str) -> Image:
        return self._extend(kind="workdir", path=str(path))

    def add_local_dir(self, local_path: str, remote_path: str, *, copy: bool = False,
                      ignore: Any = ()) -> Image:
        return self._extend(kind="add_local_dir", local_path=str(local_path),
                            remote_path=str(remote_path), copy=copy)

    def add_local_file(self, local_path: str, remote_path: str, *, copy: bool = False) -> Image:
        return self._extend(kind="add_local_file", local_path=str(local_path),
                            remote_path=str(remote_path), copy=copy)

    def add_local_python_source(self, *modules: str, copy: bool = False) -> Image:
        return self._extend(kind="add_local_python_source", modules=list(modules), copy=copy)

    def pipe(self, recipe: Callable[[Image], Image]) -> Image:
        """Apply a user recipe: `image.pipe(add_cuda)`, where `add_cuda(image) -> Image`."""
        result = recipe(self)
        if not isinstance(result, Image):
            raise InvalidError(f"Image.pipe({getattr(recipe, '__name__', recipe)}) must return an "
                               f"Image, got {type(result).__name__}.")
        return result

    # --- identity ------------------------------------------------------------------------------
    @property
    def is_default(self) -> bool:
        return self.base is None and not self.steps

    def recipe(self) -> dict[str, Any]:
        return {"base": self.base, "python_version": self.python_version, "steps": list(self.steps)}

    @property
    def object_id(self) -> str:
        digest = hashlib.sha256(json.dumps(self.recipe(), sort_keys=True).encode()).hexdigest()
        return f"im-{digest[:22]}"

    def __repr__(self) -> str:
        return f"Image({self.base or 'default'}, {len(self.steps)} steps)"


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
