"""One-line warnings for Modal's older spellings that mctl still accepts (`concurrency_limit=`,
`keep_warm=`, `from modal import deploy_app`, ...), each shown once per process.

Python hides DeprecationWarning outside `__main__`, and a user's app file is imported by `mctl
run`, so unless the user chose warning filters (-W, PYTHONWARNINGS) these are always shown.
Workers import the same file; they stay quiet, so the caller sees each warning once.
"""

from __future__ import annotations

import os
import sys
import warnings

_warned: set[str] = set()


class SpellingDeprecationWarning(DeprecationWarning):
    """An older Modal spelling; the message names today's."""


def warn_once(spelling: str, message: str, stacklevel: int = 3) -> None:
    if spelling in _warned or os.environ.get("MCTL_IS_REMOTE") == "1" \
            or "MCTL_TASK_ID" in os.environ:
        return
    if not _warned and not sys.warnoptions:
        warnings.simplefilter("always", SpellingDeprecationWarning)
    _warned.add(spelling)
    warnings.warn(message, SpellingDeprecationWarning, stacklevel=stacklevel + 1)
