"""An app whose workers cannot start until a marker file exists in MCTL_HOME."""

import os

import mctl

app = mctl.App("startfail")

_home = os.environ.get("MCTL_HOME", "")
if os.environ.get("MCTL_IS_REMOTE") and not os.path.exists(os.path.join(_home, "fixed")):
    if os.path.exists(os.path.join(_home, "die-hard")):
        print("dying before saying hello", flush=True)
        os._exit(7)
    import no_such_module_for_mctl_tests  # noqa: F401  the user's own import error


@app.function()
def f(x):
    return x + 1
