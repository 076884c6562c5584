"""`Mount`: the older spelling of `Image.add_local_*` (copy=False), kept so older Modal code runs.

Each constructor warns once with the spelling to use now; `mounts=[...]` on a function or class
adds the mounts' files to its image.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from mctl.exception import InvalidError


class Mount:
    def __init__(self, apply: Callable[[Any], Any], new_spelling: str) -> None:
        self._apply = apply  # Image -> Image with the files added
        self.new_spelling = new_spelling

    @staticmethod
    def from_local_dir(local_path: str | os.PathLike[str], *, remote_path: str | None = None,
                       condition: Callable[[str], bool] | None = None, recursive: bool = True
                       ) -> Mount:
        remote = remote_path or f"/root/{os.path.basename(os.path.abspath(local_path))}"
        ignore = (lambda p: p.is_file() and not condition(str(p))) if condition else ()
        _warn(f"Mount.from_local_dir is deprecated; use image.add_local_dir({str(local_path)!r}, "
              f"remote_path={remote!r}).")
        return Mount(lambda image: image.add_local_dir(local_path, remote, ignore=ignore),
                     "Image.add_local_dir")

    @staticmethod
    def from_local_file(local_path: str | os.PathLike[str], remote_path: str | None = None
                        ) -> Mount:
        remote = remote_path or f"/root/{os.path.basename(local_path)}"
        _warn(f"Mount.from_local_file is deprecated; use image.add_local_file({str(local_path)!r}, "
              f"remote_path={remote!r}).")
        return Mount(lambda image: image.add_local_file(local_path, remote), "Image.add_local_file")

    @staticmethod
    def from_local_python_packages(*module_names: str, **_: Any) -> Mount:
        _warn("Mount.from_local_python_packages is deprecated; use "
              f"image.add_local_python_source({', '.join(map(repr, module_names))}).")
        return Mount(lambda image: image.add_local_python_source(*module_names),
                     "Image.add_local_python_source")

    def add_to(self, image: Any) -> Any:
        return self._apply(image)


def apply_mounts(image: Any, mounts: Any, where: str) -> Any:
    """`mounts=[...]` on a decorator: the image with each mount's files added (copy=False)."""
    if isinstance(mounts, Mount) or not all(isinstance(m, Mount) for m in mounts):
        raise InvalidError(f"{where}: mounts must be a list of mctl.Mount objects.")
    _warn(f"{where}(mounts=[...]) is deprecated; add the files to the image with "
          "image.add_local_dir / add_local_file / add_local_python_source.", stacklevel=5)
    for mount in mounts:
        image = mount.add_to(image)
    return image


def _warn(message: str, stacklevel: int = 3) -> None:
    """Shown once, at the user's line, by the client only (workers import the same file)."""
    from mctl.sdk.deprecated import warn_once

    warn_once(message, message, stacklevel=stacklevel)
