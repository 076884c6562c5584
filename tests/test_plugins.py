"""The plugin core: hook specs, built-ins, entry points, conflicts, and `mctl plugins`."""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import mctl
from mctl.core import hookspecs, plugins
from mctl.core.plugin_types import SecretBackend

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh_pm():
    plugins.get_plugin_manager.cache_clear()
    yield plugins.get_plugin_manager()
    plugins.get_plugin_manager.cache_clear()


@pytest.fixture
def inline_plugin(fresh_pm):
    """Register a throwaway plugin object; unregistered afterwards."""
    registered = []

    def register(obj, name):
        fresh_pm.register(obj, name=name)
        registered.append(obj)
        return obj

    yield register
    for obj in registered:
        fresh_pm.unregister(obj)


def test_every_hook_is_documented_with_an_example():
    specs = [f for name, f in vars(hookspecs).items() if name.startswith("mctl_")]
    assert len(specs) == 6
    for spec in specs:
        doc = inspect.getdoc(spec)
        assert doc and "Example::" in doc and "@mctl.hookimpl" in doc, spec.__name__


def test_builtins_register_backends(fresh_pm):
    assert {s.name for s in plugins.registrations("mctl_register_schedulers")} == {
        "local", "slurm", "nomad"}
    assert "local" in {s.name for s in plugins.registrations("mctl_register_secret_backends")}
    assert plugins.find("mctl_register_volume_drivers", "local")
    assert isinstance(plugins.find("mctl_register_gpu_devices", "nvidia").detect(), list)


def test_unknown_backend_names_the_choices(fresh_pm):
    with pytest.raises(mctl.exception.InvalidError, match="No scheduler plugin named 'kubernetes'; "
                                                          "available: local, nomad, slurm"):
        plugins.find("mctl_register_schedulers", "kubernetes")


def test_conflicting_plugins_are_named(inline_plugin):
    class Dup:
        @mctl.hookimpl
        def mctl_register_secret_backends(self):
            yield SecretBackend(name="local", resolve=lambda n: None)

    inline_plugin(Dup(), "dup-plugin")
    with pytest.raises(mctl.exception.InvalidError, match="Conflicting plugins.*'local'.*dup-plugin"):
        plugins.registrations("mctl_register_secret_backends")


def test_registration_names_are_validated():
    assert SecretBackend(name="  Vault ", resolve=dict).name == "vault"
    with pytest.raises(ValueError, match="must be lowercase"):
        SecretBackend(name="9lives", resolve=dict)


def test_broken_entry_point_is_logged_and_skipped(fresh_pm, monkeypatch, caplog):
    class BrokenEP:
        name, value, group, dist = "broken", "broken_mod:plugin", "mctl", None

        def load(self):
            raise ImportError("no module named broken_mod")

    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [BrokenEP()])
    plugins.load_entry_points(fresh_pm, None)
    assert fresh_pm.get_plugin("broken") is None
    assert 'Error importing plugin "broken"' in caplog.text


def test_disable_plugins_env(monkeypatch):
    monkeypatch.setenv("MCTL_DISABLE_PLUGINS", "mctl.plugins.gpu_nvidia")
    plugins.get_plugin_manager.cache_clear()
    try:
        assert plugins.registrations("mctl_register_gpu_devices") == []
    finally:
        plugins.get_plugin_manager.cache_clear()


def test_plugins_command_lists_builtins(fresh_pm):
    from mctl.cli.main import cli

    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0
    assert "mctl.plugins.scheduler_local  builtin" in result.output
    assert "    mctl_register_schedulers" in result.output


def test_installed_example_plugin_appears(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(target),
                    str(ROOT / "examples" / "mctl-plugin-hello")], check=True)
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-m", "mctl", "plugins"], capture_output=True,
                         text=True, env=env, check=True).stdout
    assert "hello  0.2.0" in out
    assert "mctl_register_secret_backends" in out and "mctl_register_commands" in out
    hello = subprocess.run([sys.executable, "-m", "mctl", "hello"], capture_output=True,
                           text=True, env=env, check=True).stdout
    assert hello.strip() == "hello from mctl-plugin-hello"
