"""Secrets: encrypted at rest in the local backend, managed through the backend hooks, and values
given in code kept out of specs, the database and API responses."""

import json
import stat
import time
from pathlib import Path

import pytest

from mctl.core import transport
from click.testing import CliRunner

import mctl
from mctl.cli.main import cli
from mctl.core import plugins, secret_store
from mctl.core.plugin_types import SecretBackend, SecretInfo
from mctl.exception import AlreadyExistsError, InvalidError
from mctl.plugins import secrets_local

VALUE = "s3cr3t-value"

INLINE_APP = f"""
import os, mctl
app = mctl.App("inline-secret")

@app.function(secrets=[mctl.Secret.from_dict({{"API_KEY": "{VALUE}"}})])
def read():
    return os.environ["API_KEY"][::-1]  # reversed: a result is stored, and must not match
"""


def all_bytes(root):
    """(path, bytes) of every file under `root`."""
    return [(p, p.read_bytes()) for p in Path(root).rglob("*") if p.is_file()]


def get(url):
    with transport.urlopen(url) as resp:
        return resp.read().decode()


# --- the local backend ---------------------------------------------------------------------------
def test_local_store_encrypts_with_a_private_key(isolated_home):
    secrets_local.create("db", {"PASSWORD": VALUE}, False)
    assert secrets_local.resolve("db") == {"PASSWORD": VALUE}
    key = isolated_home / "secrets" / ".key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    for path, data in all_bytes(isolated_home):
        assert VALUE.encode() not in data, path
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_local_store_create_list_delete(isolated_home):
    secrets_local.create("db", {"USER": "u", "PASSWORD": "p"}, False)
    with pytest.raises(AlreadyExistsError, match="--force"):
        secrets_local.create("db", {"USER": "v"}, False)
    [first] = secrets_local.list_secrets()
    assert first.name == "db" and first.keys == ("PASSWORD", "USER")
    time.sleep(0.01)
    secrets_local.create("db", {"TOKEN": "t"}, True)
    [info] = secrets_local.list_secrets()
    assert info.keys == ("TOKEN",) and info.created == first.created
    assert info.updated > first.updated
    assert secrets_local.delete("db") is True and secrets_local.delete("db") is False
    assert secrets_local.resolve("db") is None and secrets_local.list_secrets() == []
    with pytest.raises(InvalidError, match="Invalid secret name"):
        secrets_local.create("../escape", {"A": "b"}, False)


def test_plaintext_secret_of_previous_release_still_opens(isolated_home):
    legacy = isolated_home / "secrets" / "old.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_text(json.dumps({"PASSWORD": VALUE}))
    assert [i.name for i in secrets_local.list_secrets()] == ["old"]
    assert secrets_local.resolve("old") == {"PASSWORD": VALUE}
    assert not legacy.exists()  # migrated on first read
    for path, data in all_bytes(isolated_home):
        assert VALUE.encode() not in data, path


def test_key_mismatch_is_reported(isolated_home):
    secrets_local.create("db", {"A": "b"}, False)
    (isolated_home / "secrets" / ".key").unlink()
    with pytest.raises(InvalidError, match="cannot be decrypted"):
        secrets_local.resolve("db")


# --- the CLI, through the backend hooks ----------------------------------------------------------
def test_cli_create_list_delete(server_process, isolated_home, tmp_path):
    """`mctl secret` goes through the control plane, which writes its backend and the audit log."""
    runner = CliRunner()
    (tmp_path / "prod.env").write_text("# comment\nexport HOST=db.local\nPORT='5432'\n")
    (tmp_path / "extra.json").write_text(json.dumps({"USER": "admin"}))
    out = runner.invoke(cli, ["secret", "create", "db", f"PASSWORD={VALUE}", "--from-dotenv",
                              str(tmp_path / "prod.env"), "--from-json",
                              str(tmp_path / "extra.json")])
    assert out.exit_code == 0, out.output
    assert "HOST, PASSWORD, PORT, USER" in out.output and VALUE not in out.output
    assert secrets_local.resolve("db") == {"HOST": "db.local", "PORT": "5432", "USER": "admin",
                                           "PASSWORD": VALUE}

    out = runner.invoke(cli, ["secret", "create", "db", "A=b"])
    assert out.exit_code != 0 and "exists; pass --force" in out.output
    out = runner.invoke(cli, ["secret", "create", "inline.mine", "A=b"])
    assert out.exit_code != 0 and "reserved" in out.output
    out = runner.invoke(cli, ["secret", "create", "empty"])
    assert out.exit_code != 0 and "KEY=VALUE" in out.output

    out = runner.invoke(cli, ["secret", "list"])
    assert out.exit_code == 0 and "db" in out.output and "HOST, PASSWORD, PORT, USER" in out.output
    assert VALUE not in out.output
    rows = json.loads(runner.invoke(cli, ["secret", "list", "--json"]).output)
    assert [(r["name"], r["keys"], r["inline"]) for r in rows] == [
        ("db", ["HOST", "PASSWORD", "PORT", "USER"], False)]
    assert rows[0]["created"] <= rows[0]["updated"] and VALUE not in json.dumps(rows)

    assert runner.invoke(cli, ["secret", "delete", "db"]).exit_code == 0
    out = runner.invoke(cli, ["secret", "delete", "db"])
    assert out.exit_code != 0 and "No secret named 'db'" in out.output
    assert runner.invoke(cli, ["secret", "delete", "db", "--allow-missing"]).exit_code == 0

    audit = [json.loads(line) for line in
             (server_process.state_dir / "audit.log").read_text().splitlines()]
    changes = [(e["action"], e["target"]) for e in audit if e["action"].startswith("secret.")]
    assert changes == [("secret.create", "db"), ("secret.delete", "db")]
    create = next(e for e in audit if e["action"] == "secret.create")
    assert create["details"]["keys"] == ["HOST", "PASSWORD", "PORT", "USER"]
    assert create["who"] and create["from"] == "127.0.0.1"
    assert VALUE not in (server_process.state_dir / "audit.log").read_text()


@pytest.fixture
def memory_backend(monkeypatch):
    """A throwaway secret backend plugin, chosen with MCTL_SECRET_BACKEND."""
    store: dict[str, dict[str, str]] = {}

    class Memory:
        @mctl.hookimpl
        def mctl_register_secret_backends(self):
            def create(name, values, overwrite):
                store[name] = dict(values)

            yield SecretBackend(
                name="memory", resolve=store.get, create=create,
                delete=lambda name: store.pop(name, None) is not None,
                list=lambda: [SecretInfo(n, tuple(v), 0.0, 0.0) for n, v in store.items()])

    plugins.get_plugin_manager.cache_clear()
    plugin = Memory()
    plugins.get_plugin_manager().register(plugin, name="memory-plugin")
    monkeypatch.setenv("MCTL_SECRET_BACKEND", "memory")
    try:
        yield store
    finally:
        plugins.get_plugin_manager().unregister(plugin)
        plugins.get_plugin_manager.cache_clear()


def test_the_chosen_backend_is_written(memory_backend, isolated_home):
    secret_store.create("api", {"TOKEN": "t"})
    assert memory_backend == {"api": {"TOKEN": "t"}}
    assert secrets_local.list_secrets() == []
    assert [i.name for i in secret_store.list_secrets()] == ["api"]
    assert secret_store.delete("api")
    assert memory_backend == {}


def test_read_only_backend_is_named(memory_backend, monkeypatch):
    class ReadOnly:
        @mctl.hookimpl
        def mctl_register_secret_backends(self):
            yield SecretBackend(name="etc", resolve=lambda name: None)

    plugin = ReadOnly()
    plugins.get_plugin_manager().register(plugin, name="read-only")
    monkeypatch.setenv("MCTL_SECRET_BACKEND", "etc")
    try:
        with pytest.raises(mctl.exception.InvalidError,
                           match="Secret backend 'etc' cannot create secrets"):
            secret_store.create("api", {"TOKEN": "t"})
    finally:
        plugins.get_plugin_manager().unregister(plugin)


# --- inline secrets ------------------------------------------------------------------------------
def test_inline_values_must_match_their_reference(isolated_home):
    from mctl.core.spec import AppSpec

    name = secret_store.inline_name("ap-x", {"API_KEY": VALUE})
    assert VALUE not in name and name == secret_store.inline_name("ap-x", {"API_KEY": VALUE})
    spec = AppSpec.model_validate({"name": "a", "module": "m", "bundle_blob": "bl-1", "functions": {
        "f": {"tag": "f", "function_id": "fu-1", "module": "m", "qualname": "f",
              "image_id": "im-1", "secrets": [{"name": name, "inline": True,
                                               "keys": ["API_KEY"]}]}}})
    with pytest.raises(InvalidError, match="does not match"):
        secret_store.store_inline(spec, {name: {"API_KEY": "other"}})
    with pytest.raises(InvalidError, match="does not match"):
        secret_store.store_inline(spec, {"db": {"API_KEY": VALUE}})
    assert secret_store.store_inline(spec, {name: {"API_KEY": VALUE}}) == [name]
    assert secret_store.store_inline(spec, {name: {"API_KEY": VALUE}}) == []  # already there
    assert secrets_local.resolve(name) == {"API_KEY": VALUE}


@pytest.mark.integration
def test_inline_secret_reaches_the_worker_and_nothing_else(server_process, tmp_path,
                                                           isolated_home):
    from test_deploy import mctl_cli

    app_file = tmp_path / "inline_secret.py"
    app_file.write_text(INLINE_APP)
    mctl_cli("deploy", str(app_file))
    assert mctl.Function.from_name("inline-secret", "read").remote() == VALUE[::-1]

    url = server_process.url
    for path in ("/api/apps", "/api/apps?all=1", "/api/apps/inline-secret",
                 "/api/apps/inline-secret?version=1", "/api/apps/inline-secret/history",
                 "/api/functions/lookup?app=inline-secret&name=read"):
        body = get(url + path)
        assert VALUE not in body, path
    spec = json.loads(get(url + "/api/apps/inline-secret"))["spec"]
    [ref] = spec["functions"]["read"]["secrets"]
    assert ref["inline"] and ref["keys"] == ["API_KEY"] and "values" not in ref

    state = Path(server_process.state_dir)
    db_files = [state / "state.db", state / "state.db-wal"]
    assert all(p.exists() for p in db_files)
    for path in [*db_files, *(p for p, _ in all_bytes(isolated_home))]:
        assert VALUE.encode() not in path.read_bytes(), path

    # `mctl secret list` hides inline secrets; --all marks them; neither shows values
    assert "inline." not in mctl_cli("secret", "list").stdout
    rows = json.loads(mctl_cli("secret", "list", "--json", "--all").stdout)
    assert [(r["keys"], r["inline"]) for r in rows] == [(["API_KEY"], True)]
    assert VALUE not in json.dumps(rows)


@pytest.mark.integration
def test_ephemeral_app_inline_secret_is_deleted_when_it_stops(server_process, tmp_path,
                                                              isolated_home):
    from conftest import load_app

    module, app = load_app("basic")
    with app.run():
        assert module.read_secret.remote() == ("t0k", "test")
        assert [i.keys for i in secret_store.list_secrets(include_inline=True)] == [
            ("API_TOKEN",)]
    assert secret_store.list_secrets(include_inline=True) == []


@pytest.mark.integration
def test_missing_required_key_refuses_the_deploy(server_process, tmp_path):
    from test_deploy import mctl_cli

    mctl_cli("secret", "create", "db", "USER=admin")
    app_file = tmp_path / "needs_key.py"
    app_file.write_text(
        "import mctl\napp = mctl.App('needs-key')\n"
        "@app.function(secrets=[mctl.Secret.from_name('db', required_keys=['PASSWORD'])])\n"
        "def f():\n    return 1\n")
    out = mctl_cli("deploy", str(app_file), check=False)
    assert out.returncode != 0
    assert "Secret 'db' lacks required keys PASSWORD" in out.stderr
    assert json.loads(mctl_cli("app", "list", "--json").stdout) == []


def test_first_release_specs_answer_with_keys_not_values():
    """Specs stored before inline secrets moved to the store still hold values: the API redacts."""
    from mctl.core.server.http import _redacted

    spec = {"functions": {"f": {"secrets": [{"values": {"API_KEY": VALUE}},
                                            {"name": "db", "required_keys": []}]}}}
    out = _redacted(spec)
    assert VALUE not in json.dumps(out)
    assert out["functions"]["f"]["secrets"] == [{"keys": ["API_KEY"], "inline": True},
                                                {"name": "db", "required_keys": []}]


@pytest.mark.parametrize("values,words", [
    ({"A": 1}, "the value of 'A' is a int (1); values must be str"),
    ({3: "x"}, "the key 3 is a int; names must be str"),
    (["A"], "takes a dict of str to str, not list"),
])
def test_from_dict_refuses_what_is_not_str_when_declared(values, words):
    """Not at run time, naming an internal secret 'inline.ap-...', as before."""
    with pytest.raises(InvalidError, match=words.replace("(", r"\(").replace(")", r"\)")):
        mctl.Secret.from_dict(values)
    assert mctl.Secret.from_dict({"A": "1", "B": None}) is not None
