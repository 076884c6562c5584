"""The vault secret backend against a real OpenBao dev server (scripts/vault-dev): values reach
workers straight from Vault and nowhere in the control plane; one app cannot read another's."""

import hashlib
import json
import os
import uuid
from pathlib import Path

import pytest

import mctl
from mctl.core import transport
from mctl.exception import AlreadyExistsError, InvalidError

pytestmark = pytest.mark.vault

VALUE = "v4ult-only-" + uuid.uuid4().hex[:8]
LOCAL_VALUE = "from-the-deployers-env-" + uuid.uuid4().hex[:8]
DOTENV_VALUE = "from-a-dotenv-" + uuid.uuid4().hex[:8]

APP = """
import hashlib, os
import mctl

app = mctl.App("{name}")

def digest(key):
    return hashlib.sha256(os.environ[key].encode()).hexdigest()  # results are stored: no values

@app.function(secrets=[mctl.Secret.from_name("{secret}", required_keys=["PASSWORD"]),
                       mctl.Secret.from_local_environ(["LOCAL_TOKEN"]),
                       mctl.Secret.from_dotenv(os.path.dirname(__file__)),
                       mctl.Secret.from_dict({{"MODE": "test"}})])
def read():
    return {{k: digest(k) for k in ("PASSWORD", "LOCAL_TOKEN", "DOTENV_TOKEN")}}, os.environ["MODE"]
"""


def sha(text):
    return hashlib.sha256(text.encode()).hexdigest()


def get(url):
    with transport.urlopen(url) as resp:
        return resp.read().decode()


@pytest.fixture
def vault_env(vault_server, monkeypatch):
    """This test's Vault settings (its own KV prefix), in this process's environment."""
    env = vault_server.env(f"mctl-test-{uuid.uuid4().hex[:8]}/")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def vault_control_plane(tmp_path, isolated_home, vault_env, monkeypatch):
    """A real `mctl server` whose server.toml chooses the vault secret backend."""
    from conftest import ServerProcess, free_port

    config = tmp_path / "server.toml"
    config.write_text('[secrets]\nbackend = "vault"\n')
    srv = ServerProcess(tmp_path / "server-state", free_port(), dict(os.environ),
                        args=["--config", str(config)])
    srv.start()
    monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
    try:
        yield srv
    finally:
        srv.stop()


def deploy(tmp_path, name, secret, check=True):
    from test_deploy import mctl_cli

    app_dir = tmp_path / name
    app_dir.mkdir()
    (app_dir / ".env").write_text(f"DOTENV_TOKEN={DOTENV_VALUE}\n")
    (app_dir / f"{name.replace('-', '_')}.py").write_text(APP.format(name=name, secret=secret))
    env = dict(os.environ, LOCAL_TOKEN=LOCAL_VALUE)
    return mctl_cli("deploy", str(app_dir / f"{name.replace('-', '_')}.py"), env=env, check=check)


# --- the backend's operations --------------------------------------------------------------------
def test_create_list_delete_in_vault(vault_env, vault_server):
    from mctl.plugins import secrets_vault as vault

    vault.create("db", {"USER": "u", "PASSWORD": VALUE}, False)
    with pytest.raises(AlreadyExistsError, match="--force"):
        vault.create("db", {"USER": "v"}, False)
    assert vault.resolve("db") == {"USER": "u", "PASSWORD": VALUE}
    [first] = vault.list_secrets()
    assert (first.name, first.keys) == ("db", ("PASSWORD", "USER"))
    vault.create("db", {"TOKEN": "t"}, True)
    [info] = vault.list_secrets()
    assert info.keys == ("TOKEN",) and info.created == first.created
    assert info.updated >= first.updated

    # a secret written with Vault's own tools: its keys are read from the data
    vault_server.client().secrets.kv.v2.create_or_update_secret(
        path=vault_env["MCTL_VAULT_PREFIX"] + "by-hand", secret={"K": "v"}, mount_point="secret")
    assert vault.keys("by-hand") == ["K"] and vault.keys("nope") is None
    assert vault.delete("db") is True and vault.delete("db") is False
    assert [i.name for i in vault.list_secrets()] == ["by-hand"]
    with pytest.raises(InvalidError, match="Invalid secret name"):
        vault.create("../escape", {"A": "b"}, False)


def test_without_vault_addr_the_backend_knows_nothing(monkeypatch):
    from mctl.plugins import secrets_vault as vault

    monkeypatch.delenv("VAULT_ADDR", raising=False)
    assert vault.resolve("db") is None and vault.keys("db") is None
    with pytest.raises(InvalidError, match="needs VAULT_ADDR"):
        vault.create("db", {"A": "b"}, False)


# --- end to end ----------------------------------------------------------------------------------
@pytest.mark.integration
def test_worker_reads_vault_secret_that_the_control_plane_never_holds(
        vault_control_plane, vault_server, vault_env, tmp_path, isolated_home):
    from test_deploy import mctl_cli

    out = mctl_cli("secret", "create", "db", f"PASSWORD={VALUE}", "USER=app")
    assert VALUE not in out.stdout + out.stderr
    deploy(tmp_path, "vault-reader", "db")
    digests, mode = mctl.Function.from_name("vault-reader", "read").remote()
    assert digests == {"PASSWORD": sha(VALUE), "LOCAL_TOKEN": sha(LOCAL_VALUE),
                       "DOTENV_TOKEN": sha(DOTENV_VALUE)} and mode == "test"

    # every value lives in Vault: the named secret and the values given in code
    kv = vault_server.client().secrets.kv.v2
    listed = kv.list_secrets(path=vault_env["MCTL_VAULT_PREFIX"], mount_point="secret")
    names = listed["data"]["keys"]
    assert "db" in names and sum(n.startswith("inline.") for n in names) == 3  # one per Secret
    app = json.loads(get(vault_control_plane.url + "/api/apps/vault-reader"))
    policy = vault_server.client().sys.read_acl_policy(f"mctl-app-{app['app_id']}")
    assert "/db\"" in policy["data"]["policy"]

    # ... and nowhere in the control plane: API answers, the database, its logs, its files
    function_id = app["spec"]["functions"]["read"]["function_id"]
    answers = [get(vault_control_plane.url + path) for path in (
        "/api/apps", "/api/apps/vault-reader", "/api/apps/vault-reader/history",
        "/api/apps/vault-reader/logs", "/api/secrets?all=1", "/api/audit",
        "/api/functions/lookup?app=vault-reader&name=read",
        f"/api/functions/{function_id}/secrets")]
    answers.append(mctl_cli("secret", "list", "--json", "--all").stdout)
    secrets_route = json.loads(answers[-2])
    assert secrets_route["env"] == {} and secrets_route["delegated"][0]["wrapped_token"]
    state = Path(vault_control_plane.state_dir)
    assert (state / "state.db").exists()
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".env"]
    assert state / "state.db" in files and tmp_path / "server.log" in files
    for value in (VALUE, LOCAL_VALUE, DOTENV_VALUE):
        for answer in answers:
            assert value not in answer
        for path in files:
            assert value.encode() not in path.read_bytes(), path

    # stopping the app withdraws its policy
    mctl_cli("app", "stop", "vault-reader")
    assert f"mctl-app-{app['app_id']}" not in vault_server.client().sys.list_acl_policies()[
        "data"]["keys"]


@pytest.mark.integration
def test_an_apps_vault_token_reads_only_its_own_secrets(vault_control_plane, vault_server,
                                                        tmp_path):
    import hvac
    import hvac.exceptions

    from test_deploy import mctl_cli

    mctl_cli("secret", "create", "alpha-db", "PASSWORD=alpha")
    mctl_cli("secret", "create", "beta-db", f"PASSWORD={VALUE}")
    deploy(tmp_path, "alpha", "alpha-db")
    deploy(tmp_path, "beta", "beta-db")
    alpha = json.loads(get(vault_control_plane.url + "/api/apps/alpha"))
    function_id = alpha["spec"]["functions"]["read"]["function_id"]
    [access] = json.loads(get(f"{vault_control_plane.url}/api/functions/{function_id}/secrets"))[
        "delegated"]
    assert set(access["paths"]) == {"alpha-db", *(n for n in access["paths"]
                                                  if n.startswith("inline."))}

    client = hvac.Client(url=vault_server.addr)
    token = client.sys.unwrap(access["wrapped_token"])["auth"]["client_token"]
    client.token = token
    kv = client.secrets.kv.v2
    prefix = access["paths"]["alpha-db"].removesuffix("alpha-db")
    with pytest.raises(hvac.exceptions.Forbidden):
        kv.read_secret_version(path=prefix + "beta-db", mount_point="secret",
                               raise_on_deleted_version=True)
    assert kv.read_secret_version(path=prefix + "alpha-db", mount_point="secret",
                                  raise_on_deleted_version=True)["data"]["data"] == {
        "PASSWORD": "alpha"}
    # the wrapping token works once
    with pytest.raises(hvac.exceptions.VaultError):
        hvac.Client(url=vault_server.addr).sys.unwrap(access["wrapped_token"])


@pytest.mark.integration
def test_missing_secret_or_key_in_vault_refuses_the_deploy(vault_control_plane, tmp_path):
    from test_deploy import mctl_cli

    mctl_cli("secret", "create", "db", "USER=admin")
    out = deploy(tmp_path, "lacks-key", "db", check=False)
    assert out.returncode != 0
    assert "Secret 'db' lacks required keys PASSWORD" in out.stderr
    out = deploy(tmp_path, "lacks-secret", "nope", check=False)
    assert out.returncode != 0 and "Secret 'nope'" in out.stderr and "not found" in out.stderr
    assert json.loads(mctl_cli("app", "list", "--json").stdout) == []


@pytest.mark.integration
def test_vault_unreachable_at_deploy_names_vault_addr(tmp_path, isolated_home, monkeypatch):
    from conftest import ServerProcess, free_port

    dead = f"http://127.0.0.1:{free_port()}"
    env = dict(os.environ, VAULT_ADDR=dead, VAULT_TOKEN="t")
    srv = ServerProcess(tmp_path / "server-state", free_port(), env,
                        args=["--secret-backend", "vault"]).start()
    monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
    try:
        out = deploy(tmp_path, "unreachable", "db", check=False)
    finally:
        srv.stop()
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"VAULT_ADDR={dead}" in lines[0], out.stderr


def test_bad_secret_backend_settings_say_what_to_write(tmp_path):
    from test_deploy import mctl_cli

    out = mctl_cli("server", "--secret-backend", "nosuch", "--port", "0", check=False)
    assert out.returncode != 0
    assert "No secret_backend plugin named 'nosuch'; available: local, vault" in out.stderr
    bad = tmp_path / "server.toml"
    bad.write_text('[secrets]\nname = "vault"\n')
    out = mctl_cli("server", "--config", str(bad), check=False)
    assert out.returncode != 0 and "[secrets] must be a table with `backend`" in out.stderr


CONTROL_POLICY = """
path "secret/data/{prefix}*"     {{ capabilities = ["create", "read", "update"] }}
path "secret/metadata/{prefix}*" {{ capabilities = ["read", "list", "update", "delete"] }}
path "sys/policies/acl/mctl-app-*" {{ capabilities = ["create", "update", "delete"] }}
path "auth/token/create"      {{ capabilities = ["create", "update", "sudo"] }}
"""


def test_approle_login_with_the_documented_policy(vault_server, vault_env, monkeypatch):
    """The control plane logs in with AppRole and needs no more than the policy in the guide."""
    from mctl.plugins import secrets_vault as vault

    root = vault_server.client()
    if "approle/" not in root.sys.list_auth_methods()["data"]:
        root.sys.enable_auth_method("approle")
    prefix = vault_env["MCTL_VAULT_PREFIX"]
    root.sys.create_or_update_acl_policy(name="mctl-control-test",
                                         policy=CONTROL_POLICY.format(prefix=prefix))
    root.auth.approle.create_or_update_approle("mctl-test", token_policies=["mctl-control-test"])
    role_id = root.auth.approle.read_role_id("mctl-test")["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id("mctl-test")["data"]["secret_id"]
    monkeypatch.delenv("VAULT_TOKEN")
    monkeypatch.setenv("VAULT_ROLE_ID", role_id)
    monkeypatch.setenv("VAULT_SECRET_ID", secret_id)

    vault.create("api", {"TOKEN": VALUE}, False)
    assert vault.keys("api") == ["TOKEN"] and [i.name for i in vault.list_secrets()] == ["api"]
    vault.grant("ap-approle", ["api"])
    assert vault.worker_read(vault.worker_access("ap-approle", ["api"])) == {"TOKEN": VALUE}
    vault.revoke("ap-approle")
    assert vault.delete("api") is True
    monkeypatch.setenv("VAULT_SECRET_ID", "wrong")
    with pytest.raises(InvalidError, match="refused the AppRole login"):
        vault.keys("api")


SLURM_APP = """
import hashlib, os, socket
import mctl

app = mctl.App("vault-on-slurm")

@app.function(secrets=[mctl.Secret.from_name("db", required_keys=["PASSWORD"])])
def where():
    return socket.gethostname(), hashlib.sha256(os.environ["PASSWORD"].encode()).hexdigest()
"""


@pytest.mark.integration
@pytest.mark.slurm
def test_a_slurm_worker_reads_its_vault_secret(slurm_cluster, vault_server, vault_env, tmp_path,
                                               isolated_home, monkeypatch):
    """A worker on a Slurm node reads its value from Vault (at the bridge address): not in the
    job's script or environment, and the node never sees the control plane's Vault token."""
    from conftest import ServerProcess, free_port
    from test_deploy import mctl_cli

    for key, value in slurm_cluster.env.items():
        monkeypatch.setenv(key, value)
    port = free_port()
    worker_vault = f"http://{slurm_cluster.host_addr}:{vault_server.addr.rsplit(':', 1)[1]}"
    srv = ServerProcess(tmp_path / "state", port,
                        dict(os.environ, MCTL_VAULT_WORKER_ADDR=worker_vault), args=[
                            "--host", slurm_cluster.host_addr, "--scheduler", "slurm",
                            "--scheduler-option", f"output_dir={tmp_path / 'jobs'}",
                            "--secret-backend", "vault"])
    srv.url = f"http://{slurm_cluster.host_addr}:{port}"
    srv.start()
    monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
    try:
        mctl_cli("secret", "create", "db", f"PASSWORD={VALUE}")
        (tmp_path / "vault_on_slurm.py").write_text(SLURM_APP)
        mctl_cli("deploy", str(tmp_path / "vault_on_slurm.py"))
        host, digest = mctl.Function.from_name("vault-on-slurm", "where").remote()
        assert host in slurm_cluster.nodes and digest == sha(VALUE)
        scripts = list((tmp_path / "jobs").glob("*.sbatch"))
        jobs = slurm_cluster.run("scontrol", "show", "job", "-d").stdout
        for text in [jobs, *(p.read_text() for p in scripts)]:
            assert VALUE not in text and vault_server.token not in text
        mctl_cli("app", "stop", "vault-on-slurm")
    finally:
        srv.stop()


# The control plane may neither write nor read secret values: only metadata, policies, tokens.
NO_VALUES_POLICY = """
path "secret/metadata/{prefix}*" {{ capabilities = ["read", "list", "update", "delete"] }}
path "sys/policies/acl/mctl-app-*" {{ capabilities = ["create", "update", "delete"] }}
path "auth/token/create"      {{ capabilities = ["create", "update", "sudo"] }}
"""

NAMED_ONLY_APP = """
import hashlib, os
import mctl

app = mctl.App("vault-direct")

@app.function(secrets=[mctl.Secret.from_name("db", required_keys=["PASSWORD"])])
def read():
    return hashlib.sha256(os.environ["PASSWORD"].encode()).hexdigest()
"""


@pytest.mark.integration
def test_the_cli_writes_values_to_vault_itself_so_they_never_cross_the_control_plane(
        vault_server, vault_env, tmp_path, isolated_home, monkeypatch):
    """The control plane's Vault token cannot touch secret data at all, yet `mctl secret
    create` (with the user's own VAULT_TOKEN) works and a worker reads the value."""
    from conftest import ServerProcess, free_port
    from test_deploy import mctl_cli

    root = vault_server.client()
    root.sys.create_or_update_acl_policy(
        name="mctl-no-values",
        policy=NO_VALUES_POLICY.format(prefix=vault_env["MCTL_VAULT_PREFIX"]))
    token = root.auth.token.create(policies=["mctl-no-values"], ttl="15m")["auth"]["client_token"]
    config = tmp_path / "server.toml"
    config.write_text('[secrets]\nbackend = "vault"\n')
    srv = ServerProcess(tmp_path / "server-state", free_port(),
                        dict(os.environ, VAULT_TOKEN=token), args=["--config", str(config)])
    srv.start()
    monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
    try:
        out = mctl_cli("secret", "create", "db", f"PASSWORD={VALUE}", "USER=app")
        assert "written to Vault from this machine" in out.stdout
        assert VALUE not in out.stdout + out.stderr
        audit = get(srv.url + "/api/audit")
        [entry] = [e for e in json.loads(audit) if e.get("action") == "secret.create"]
        assert entry["target"] == "db" and entry["details"]["written_by"] == "client", entry
        assert VALUE not in audit
        app_file = tmp_path / "vault_direct.py"
        app_file.write_text(NAMED_ONLY_APP)
        mctl_cli("deploy", str(app_file))
        assert mctl.Function.from_name("vault-direct", "read").remote() == sha(VALUE)

        out = mctl_cli("secret", "list", "--json")
        assert [row["name"] for row in json.loads(out.stdout)] == ["db"]

        # without Vault credentials here the values would go through the control plane: it
        # says so, and this control plane (which may not write values) refuses
        env = {k: v for k, v in os.environ.items() if k != "VAULT_TOKEN"}
        out = mctl_cli("secret", "create", "other", "K=v", env=env, check=False)
        assert "through the control plane's memory" in out.stderr
        assert out.returncode != 0 and "refused mctl's credentials" in out.stderr
    finally:
        srv.stop()
