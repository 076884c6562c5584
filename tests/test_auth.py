"""Tokens, scopes, task tokens, TLS and the audit log, against real `mctl server` processes."""

import asyncio
import json
import os
import sqlite3
import stat
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

import mctl
from conftest import APPS, ServerProcess, free_port
from test_deploy import mctl_cli
from mctl.core import protocol

pytestmark = pytest.mark.integration


def http(url, method="GET", token=None, body=None, data=None):
    """(status, JSON body) of one request with exactly the token given (None: no header)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def ws_session(url, token, frames, listen=1.0):
    """Open /ws with `token`, send `frames`, return (handshake status, frames received)."""
    import aiohttp

    async def run():
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with aiohttp.ClientSession(headers=headers) as session:
            try:
                ws = await session.ws_connect(url.replace("http", "ws", 1) + "/ws")
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status, []
            got = []

            async def receive():
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        got.append(protocol.decode(msg.data)[0])

            async with ws:
                for frame in frames:
                    await ws.send_bytes(protocol.encode(frame))
                try:
                    await asyncio.wait_for(receive(), listen)
                except asyncio.TimeoutError:
                    pass
            return 101, got

    return asyncio.run(run())


def create_token(scope, name):
    return mctl_cli("token", "create", "--scope", scope, "--name", name).stdout.strip()


def test_requests_without_a_valid_token_are_refused_and_change_nothing(server_process):
    url = server_process.url
    admin = server_process.token
    # /healthz stays open for liveness probes and says nothing sensitive
    status, body = http(f"{url}/healthz")
    assert status == 200 and set(body) == {"ok", "started", "pid"}

    deploy = create_token("deploy", "ci")
    assert deploy.startswith("mctl_")
    assert http(f"{url}/api/apps", token=deploy)[0] == 200
    mctl_cli("token", "revoke", "ci")

    blob = b"x" * 10
    blob_id = protocol.blob_id(blob)
    for token in (None, "mctl_wrong", deploy):
        status, body = http(f"{url}/api/apps", "POST", token, {"spec": {"name": "evil"},
                                                               "mode": "deployed"})
        assert status == 401
        assert "mctl token create" in body["error"] and "MCTL_TOKEN" in body["error"]
        for method, path in [("GET", "/api/apps"), ("GET", "/metrics"), ("GET", "/api/tokens"),
                             ("POST", "/api/apps/x/stop"), ("GET", "/api/audit")]:
            assert http(f"{url}{path}", method, token)[0] == 401, path
        assert http(f"{url}/blobs/{blob_id}", "PUT", token, data=blob)[0] == 401
        assert ws_session(url, token, [])[0] == 401

    # nothing changed: no app, no blob
    assert http(f"{url}/api/apps?all=1", token=admin) == (200, [])
    assert http(f"{url}/blobs/{blob_id}", token=admin)[0] == 404
    # the store keeps only hashes: no token's secret is in the database
    raw = b"".join(p.read_bytes() for p in server_process.state_dir.glob("state.db*"))
    assert admin.encode() not in raw and deploy.encode() not in raw
    # the local admin token file is the user's alone
    home_token = server_process.state_dir.parent / "mctl-home" / "token"
    assert stat.S_IMODE(home_token.stat().st_mode) == 0o600

    out = mctl_cli("app", "list", env=dict(os.environ, MCTL_TOKEN="mctl_wrong"), check=False)
    assert out.returncode != 0 and "Missing or invalid token" in out.stderr


def test_invoke_token_can_call_but_not_deploy(server_process, monkeypatch):
    url = server_process.url
    mctl_cli("deploy", str(APPS / "scheduled.py"), env=dict(os.environ, TICK_FILE="/dev/null"))
    invoke = create_token("invoke", "caller")

    status, body = http(f"{url}/api/apps", "POST", invoke, {"spec": {"name": "other"}})
    assert status == 403 and "needs scope deploy" in body["error"]
    out = mctl_cli("deploy", str(APPS / "basic.py"), env=dict(os.environ, MCTL_TOKEN=invoke),
                   check=False)
    assert out.returncode != 0 and "needs scope deploy" in out.stderr
    out = mctl_cli("app", "stop", "scheduled", env=dict(os.environ, MCTL_TOKEN=invoke),
                   check=False)
    assert out.returncode != 0 and "needs scope deploy" in out.stderr
    status, body = http(f"{url}/api/tokens", "POST", invoke, {"scope": "admin"})
    assert status == 403 and "needs scope admin" in body["error"]
    apps = http(f"{url}/api/apps?all=1", token=server_process.token)[1]
    assert [(a["name"], a["state"]) for a in apps] == [("scheduled", "running")]

    # what an invoke token is for: calling deployed functions
    monkeypatch.setenv("MCTL_TOKEN", invoke)
    assert mctl.Function.from_name("scheduled", "version").remote() == "v1"


TASK_APP = """
import os
import mctl

app = mctl.App("tasky")

@app.function()
def leak():
    return os.environ["MCTL_TASK_TOKEN"]

@app.function()
def double(x):
    return 2 * x

@app.function()
def call_sibling(x):
    return double.remote(x)

@app.function()
def call_other_app():
    return mctl.Function.from_name("scheduled", "version").remote()
"""


def test_task_token_is_confined_to_its_function(server_process, tmp_path):
    url, admin = server_process.url, server_process.token
    (tmp_path / "tasky.py").write_text(TASK_APP)
    mctl_cli("deploy", str(tmp_path / "tasky.py"))
    mctl_cli("deploy", str(APPS / "scheduled.py"), env=dict(os.environ, TICK_FILE="/dev/null"))
    task = mctl.Function.from_name("tasky", "leak").remote()
    assert task.startswith("mctl_") and task != admin
    tasky = http(f"{url}/api/apps/tasky", token=admin)[1]
    fids = {tag: f["function_id"] for tag, f in tasky["spec"]["functions"].items()}
    other = http(f"{url}/api/apps/scheduled", token=admin)[1]
    victim = other["spec"]["functions"]["version"]["function_id"]

    # a function may call its own app's functions with its task token...
    assert mctl.Function.from_name("tasky", "call_sibling").remote(21) == 42
    # ...but not another app's
    with pytest.raises(mctl.exception.Error, match=r"task token.*mctl token create --scope "
                                                   r"invoke.*MCTL_TOKEN=<that token>"):
        mctl.Function.from_name("tasky", "call_other_app").remote()

    # registering as a worker of another function (to read its inputs) is refused
    mctl.Function.from_name("scheduled", "version").spawn()
    status, got = ws_session(url, task, [{"type": "hello", "role": "worker", "task_id": "ta-x",
                                          "function_id": victim}])
    assert status == 101
    assert [m["type"] for m in got] == ["error"] and got[0]["code"] == "forbidden"
    status, got = ws_session(url, task, [{"type": "hello", "role": "worker", "task_id": "ta-x",
                                          "function_id": fids["double"]}])
    assert [m["type"] for m in got] == ["error"]
    # a user token cannot pose as a worker either
    invoke = create_token("invoke", "caller")
    status, got = ws_session(url, invoke, [{"type": "hello", "role": "worker", "task_id": "ta-y",
                                            "function_id": victim}])
    assert [m["type"] for m in got] == ["error"] and "task token" in got[0]["message"]
    # putting inputs to another app's function over the socket is refused
    status, got = ws_session(url, task, [{"type": "put_inputs", "function_id": victim,
                                          "call_id": "fc-evil", "start": 0, "rid": 1}])
    assert got[0]["type"] == "error" and got[0]["code"] == "forbidden"

    # the admin and deploy API, other apps' records and listings are closed to it
    for method, path in [("GET", "/api/tokens"), ("POST", "/api/tokens"), ("GET", "/api/audit"),
                         ("GET", "/api/apps"), ("GET", "/api/apps/scheduled"),
                         ("POST", "/api/apps/tasky/stop"), ("GET", "/api/apps/tasky/logs"),
                         ("GET", "/metrics"), ("GET", "/api/functions/lookup?app=scheduled&name=version")]:
        status, body = http(f"{url}{path}", method, task, {} if method == "POST" else None)
        assert status == 403, (path, status, body)
    status, body = http(f"{url}/api/apps", "POST", task, {"spec": {"name": "x"}})
    assert status == 403 and "task token" in body["error"]
    # its own app's record is readable (the worker loads its spec from it)
    assert http(f"{url}/api/apps/{tasky['app_id']}", token=task)[0] == 200
    assert http(f"{url}/api/apps?all=1", token=admin)[1][0]["state"] == "running"


CROSS_APP = """
import os
import mctl

app = mctl.App("crossy")

@app.function(secrets=[mctl.Secret.from_name("crossy-token")])
def call_other_app():
    assert os.environ["MCTL_TASK_TOKEN"]  # the worker keeps its own, for its own requests
    return mctl.Function.from_name("scheduled", "version").remote()
"""


def test_a_function_calls_another_app_with_an_invoke_token_from_a_secret(server_process,
                                                                         tmp_path):
    """What the task token's refusal tells a user to do (docs/guide.md, "Task tokens")."""
    mctl_cli("deploy", str(APPS / "scheduled.py"), env=dict(os.environ, TICK_FILE="/dev/null"))
    invoke = create_token("invoke", "crossy")
    mctl_cli("secret", "create", "crossy-token", f"MCTL_TOKEN={invoke}")
    (tmp_path / "crossy.py").write_text(CROSS_APP)
    mctl_cli("deploy", str(tmp_path / "crossy.py"))
    assert mctl.Function.from_name("crossy", "call_other_app").remote() == "v1"


def _self_signed(tmp_path):
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mctl test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_tls_with_and_without_the_ca(tmp_path, monkeypatch):
    cert, key = _self_signed(tmp_path)
    monkeypatch.setenv("MCTL_CA_FILE", str(cert))  # the server passes it on to its workers
    srv = ServerProcess(tmp_path / "state", free_port(), dict(os.environ), tls=(cert, key))
    srv.start()
    try:
        assert srv.url.startswith("https://")
        monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
        out = mctl_cli("deploy", str(APPS / "scheduled.py"),
                       env=dict(os.environ, TICK_FILE="/dev/null"))
        assert f"on {srv.url}" in out.stdout
        assert mctl.Function.from_name("scheduled", "version").remote() == "v1"
        # the URL the server records for clients is https
        recorded = json.loads((tmp_path / "mctl-home" / "server.json").read_text())["url"]
        assert recorded.startswith("https://")

        no_ca = {k: v for k, v in os.environ.items() if k != "MCTL_CA_FILE"}
        out = mctl_cli("app", "list", env=no_ca, check=False)
        assert out.returncode != 0
        assert "Could not verify the TLS certificate" in out.stderr
        assert "MCTL_CA_FILE" in out.stderr
        call = ("import mctl\n"
                "try:\n    mctl.Function.from_name('scheduled', 'version').remote()\n"
                "except mctl.exception.ConnectionError as exc:\n    print(exc)\n")
        out = subprocess.run([sys.executable, "-c", call], capture_output=True, text=True,
                             env=no_ca, timeout=60)
        assert "Could not verify the TLS certificate" in out.stdout, out.stderr
    finally:
        srv.stop()


def test_audit_shows_deploys_and_revokes(server_process):
    mctl_cli("deploy", str(APPS / "scheduled.py"), env=dict(os.environ, TICK_FILE="/dev/null"))
    create_token("deploy", "robot")
    mctl_cli("token", "revoke", "robot")
    mctl_cli("app", "stop", "scheduled")

    rows = json.loads(mctl_cli("audit", "--json").stdout)
    assert [r["action"] for r in rows] == ["app.deploy", "token.create", "token.revoke",
                                           "app.stop"]
    local = json.loads(mctl_cli("token", "list", "--json").stdout)[0]
    for row in rows:
        assert row["who"] == f"local ({local['token_id']})" and row["from"] == "127.0.0.1"
    assert rows[0]["details"]["name"] == "scheduled" and rows[2]["details"]["name"] == "robot"
    text = mctl_cli("audit", "--limit", "2").stdout
    assert "token.revoke" in text and "app.stop" in text and "app.deploy" not in text
    assert "127.0.0.1" in text and "local (tk-" in text
    # the log is JSON lines in the state directory and holds no token secret
    log = (server_process.state_dir / "audit.log").read_text()
    assert len(log.splitlines()) == 4 and "mctl_" not in log

    tokens = json.loads(mctl_cli("token", "list", "--json").stdout)
    assert [(t["name"], t["scope"], bool(t["revoked"])) for t in tokens] == [
        ("local", "admin", False), ("robot", "deploy", True)]
    assert all("token" not in t and "hash" not in t for t in tokens)


def test_token_set_profile_and_local_bootstrap(server_process, tmp_path):
    """`mctl token set` saves a token (and server) that later commands use; with no token at all,
    `mctl token create` works on the server's machine through its state directory."""
    deploy = create_token("deploy", "laptop")
    env = {k: v for k, v in os.environ.items() if k != "MCTL_SERVER_URL"}
    env["MCTL_HOME"] = str(tmp_path / "other-home")
    out = mctl_cli("app", "list", env=env, check=False)  # no server known: nothing runs
    assert out.returncode == 0 and "no mctl server is running" in out.stdout, out.stdout
    mctl_cli("token", "set", deploy, "--server", server_process.url, env=env)
    profile = tmp_path / "other-home" / "profile.json"
    assert stat.S_IMODE(profile.stat().st_mode) == 0o600
    assert json.loads(mctl_cli("app", "list", "--json", env=env).stdout) == []

    # a second profile (another server) saved without switching; activate and MCTL_PROFILE pick
    mctl_cli("token", "set", deploy, "--server", "http://127.0.0.1:9", "--profile", "other",
             env=env)
    listed = json.loads(mctl_cli("profile", "list", "--json", env=env).stdout)
    assert [(p["name"], p["active"]) for p in listed] == [("default", True), ("other", False)]
    assert deploy not in mctl_cli("profile", "list", env=env).stdout
    mctl_cli("profile", "activate", "other", env=env)
    out = mctl_cli("app", "list", env=env, check=False)
    assert out.returncode != 0 and "127.0.0.1:9" in out.stderr
    assert json.loads(mctl_cli("app", "list", "--json",
                               env=dict(env, MCTL_PROFILE="default")).stdout) == []
    out = mctl_cli("profile", "activate", "nope", env=env, check=False)
    assert out.returncode == 1 and "No profile named 'nope'" in out.stderr
    assert "mctl profile deactivate" in out.stderr

    # back to no profile (the local server and its admin token), and forgetting one
    assert "no longer active" in mctl_cli("profile", "deactivate", env=env).stdout
    assert mctl_cli("profile", "current", env=env).stdout.strip() == "none"
    assert "127.0.0.1:9" not in mctl_cli("app", "list", env=env, check=False).stderr
    mctl_cli("profile", "delete", "other", env=env)
    listed = json.loads(mctl_cli("profile", "list", "--json", env=env).stdout)
    assert [(p["name"], p["active"]) for p in listed] == [("default", False)]
    mctl_cli("profile", "activate", "default", env=env)

    # an operator on the server's machine, without any token, creates one from the state dir
    out = mctl_cli("token", "create", "--scope", "admin", "--name", "ops", "--state-dir",
                   str(server_process.state_dir), env=dict(env, MCTL_HOME=str(tmp_path / "none")))
    ops = out.stdout.strip()
    assert http(f"{server_process.url}/api/tokens", token=ops)[0] == 200
    db = sqlite3.connect(server_process.state_dir / "state.db")
    assert db.execute("SELECT COUNT(*) FROM tokens WHERE name = 'ops'").fetchone() == (1,)


def test_revoking_a_token_closes_its_connections(server_process):
    import aiohttp

    url, admin = server_process.url, server_process.token
    doomed = create_token("invoke", "doomed")

    async def run():
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {doomed}"}) as s:
            ws = await s.ws_connect(url.replace("http", "ws", 1) + "/ws")
            await asyncio.to_thread(http, f"{url}/api/tokens/doomed/revoke", "POST", admin, {})
            msg = await asyncio.wait_for(ws.receive(), 10)
            return msg.type, msg.data

    kind, code = asyncio.run(run())
    assert kind in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED) and code == 4001
    assert ws_session(url, doomed, [])[0] == 401


def test_a_client_sends_the_token_of_the_control_plane_now_at_its_address(tmp_path,
                                                                         isolated_home,
                                                                         monkeypatch):
    """A process that talked to one control plane, then to a new one at the same address (a
    restart on a fresh state, a port used again): its next call sends the new token, not the
    one its session started with."""
    port = free_port()
    first = ServerProcess(tmp_path / "first", port, dict(os.environ)).start()
    monkeypatch.setenv("MCTL_SERVER_URL", first.url)
    assert mctl.App.lookup("before-the-restart", create_if_missing=True).app_id
    old_token = first.token
    first.stop()
    monkeypatch.setenv("MCTL_HOME", str(tmp_path / "another-home"))  # it writes its own token
    second = ServerProcess(tmp_path / "second", port, dict(os.environ)).start()
    try:
        assert second.token != old_token
        assert mctl.App.lookup("after-the-restart", create_if_missing=True).app_id
    finally:
        second.stop()
