"""The scheduler hook's documented example is a complete backend: an app runs on it."""

import inspect
import textwrap

import pytest

from conftest import load_app
from mctl.core import hookspecs, plugins

pytestmark = pytest.mark.integration


def _example_plugin():
    doc = inspect.getdoc(hookspecs.mctl_register_schedulers)
    code = textwrap.dedent(doc.split("Example::", 1)[1])
    namespace = {}
    exec(compile(code, "hookspecs example", "exec"), namespace)
    return namespace


def test_documented_backend_runs_an_app(monkeypatch, isolated_home):
    plugin = _example_plugin()
    plugins.get_plugin_manager.cache_clear()
    pm = plugins.get_plugin_manager()
    pm.register(type("Example", (), {"mctl_register_schedulers":
                                     staticmethod(plugin["mctl_register_schedulers"])})(),
                name="example-backend")
    monkeypatch.setenv("MCTL_SCHEDULER", "processes")
    try:
        module, app = load_app("basic")
        with app.run():
            assert module.square.remote(7) == 49
            assert list(module.square.map(range(20))) == [x * x for x in range(20)]
            backend = app_backend(app.app_id)
            assert isinstance(backend, plugin["ProcessBackend"])
    finally:
        pm.unregister(name="example-backend")
        plugins.get_plugin_manager.cache_clear()


def app_backend(app_id):
    """The backend of the embedded server `app.run()` started in this process for `app_id`
    (earlier tests' control planes may still be in memory)."""
    import gc

    from mctl.core.server.control import ControlPlane

    planes = [o for o in gc.get_objects() if isinstance(o, ControlPlane) and app_id in o.apps]
    assert len(planes) == 1, planes
    return planes[0].scheduler
