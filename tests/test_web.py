"""Web endpoints end to end: real control planes, real workers, real HTTP clients."""

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings

import aiohttp
import pytest

from conftest import APPS, free_port, load_app, wait_until

pytestmark = pytest.mark.integration


def http(url, data=None, headers=None, method=None):
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, method=method, headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers


@pytest.fixture
def web_app(monkeypatch):
    monkeypatch.setenv("WEB_TEST_PORT", str(free_port()))
    module, app = load_app("web")
    with app.run():
        yield module


def test_fastapi_endpoint_json_body_and_query(web_app):
    url = web_app.total.get_web_url()
    assert url.endswith("/web/webapp-dev/total")
    status, body, _ = http(url + "?scale=3", {"values": [1, 2, 3]})
    assert status == 200 and json.loads(body)["total"] == 18
    status, body, _ = http(url, {"wrong": 1})  # FastAPI's own validation error
    assert status == 500 or status == 422 or b"values" in body
    status, _, _ = http(url, method="GET")
    assert status == 405


def test_class_method_endpoint(web_app):
    url = web_app.Model().predict.get_web_url()
    assert url.endswith("/web/webapp-dev/Model-predict")
    status, body, _ = http(url + "?x=4")
    assert (status, json.loads(body)) == (200, {"y": 40})


def test_asgi_streaming_and_websocket(web_app):
    base = web_app.site.get_web_url()

    async def scenario():
        async with aiohttp.ClientSession() as session:
            start = time.monotonic()
            async with session.get(base + "/events?n=3") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                first = await resp.content.readline()
                first_at = time.monotonic() - start
                rest = await resp.read()
                total_at = time.monotonic() - start
            assert first == b"data: event 0\n"
            assert b"data: event 2" in rest
            assert total_at - first_at > 0.6  # events arrived as sent, not all at the end

            async with session.post(base + "/upload", json={"b": 1, "a": 2}) as resp:
                assert await resp.json() == {"keys": ["a", "b"]}

            async with session.ws_connect(base.replace("http", "ws", 1) + "/ws") as ws:
                for word in ("hello", "web"):
                    await ws.send_str(word)
                    assert (await ws.receive(timeout=30)).data == word.upper()
                await ws.send_str("bye")
                msg = await ws.receive(timeout=30)
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)

    asyncio.run(scenario())


def test_wsgi_app_and_streamed_request_body(web_app):
    url = web_app.classic.get_web_url()
    big = b"x" * (3 << 20)  # over the inline limit: sent on as chunks

    async def scenario():
        async def chunks():
            for i in range(0, len(big), 1 << 20):
                yield big[i:i + (1 << 20)]

        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/a/b", data=chunks()) as resp:
                body = await resp.read()
                return resp.status, resp.headers.get("X-Path"), body

    status, path, body = asyncio.run(scenario())
    assert (status, path) == (200, "/a/b")
    assert body == b"wsgi POST " + big


def test_web_server_proxies_to_the_users_port(web_app):
    status, body, _ = http(web_app.static_files.get_web_url() + "/web.py")
    assert status == 200 and b"def static_files" in body


def test_request_timeout_is_the_function_timeout(web_app):
    start = time.monotonic()
    status, _, _ = http(web_app.slow.get_web_url() + "?seconds=10")
    assert status == 504 and time.monotonic() - start < 9
    status, body, _ = http(web_app.slow.get_web_url() + "?seconds=0")
    assert (status, body) == (200, b'"finished"')


def test_routing_by_host_name_with_a_wildcard_domain(web_app, monkeypatch):
    monkeypatch.setenv("MCTL_WEB_DOMAIN", "*.apps.test")  # the server reads it per request
    url = web_app.total.get_web_url()
    assert url == "http://webapp-dev--total.apps.test"
    server = web_app.app._server_url
    status, body, _ = http(server + "/?scale=2", {"values": [5]},
                           headers={"Host": "webapp-dev--total.apps.test"})
    assert status == 200 and json.loads(body)["total"] == 10, body


def test_deploy_without_fastapi_says_how_to_install_it(tmp_path):
    script = ("import sys; sys.modules['fastapi'] = None\n"  # as if it were not installed
              "from mctl.cli.main import main\n"
              f"sys.argv = ['mctl', 'deploy', {str(APPS / 'web_seed.py')!r}]\n"
              "main()\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1
    assert "needs FastAPI" in out.stderr and "pip install 'mctl[web]'" in out.stderr


def test_unknown_endpoint_is_404(web_app):
    base = web_app.total.get_web_url().rsplit("/", 1)[0]
    status, body, _ = http(base + "/nope")
    assert status == 404 and b"nope" in body


def test_seed_web_endpoint_warns_once_and_serves():
    from mctl.sdk import deprecated

    deprecated._warned.clear()  # once per process: an earlier test may have had it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module, app = load_app("web_seed")
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(deprecations) == 1 and "fastapi_endpoint" in str(deprecations[0].message)
    with app.run():
        status, body, _ = http(module.hello_web.get_web_url() + "?name=Ada")
    assert (status, json.loads(body)) == (200, "Hello, Ada!")


def _cli(*args, check=True):
    out = subprocess.run([sys.executable, "-m", "mctl", *args], capture_output=True, text=True,
                         timeout=120, env=os.environ)
    assert out.returncode == 0 or not check, out.stderr
    return out


def test_deployed_endpoint_scales_from_zero_and_needs_proxy_auth(server_process, monkeypatch):
    monkeypatch.setenv("WEB_TEST_PORT", str(free_port()))
    out = _cli("deploy", str(APPS / "web.py"))
    url = next(line.split("=> ")[1] for line in out.stdout.splitlines() if "web endpoint guarded" in line)
    assert url == f"{server_process.url}/web/webapp/secure"

    status, body, _ = http(url)
    assert status == 401 and b"Modal-Key" in body
    created = _cli("token", "create", "--scope", "proxy", "--name", "web-proxy")
    secret = created.stdout.strip()
    token_id = created.stderr.split("Created token ")[1].split()[0]
    status, _, _ = http(url, headers={"Modal-Key": token_id, "Modal-Secret": secret + "x"})
    assert status == 401
    admin = server_process.token  # a user token, but not a proxy token
    status, _, _ = http(url, headers={"Modal-Key": token_id, "Modal-Secret": admin})
    assert status == 401
    proxy = {"Modal-Key": token_id, "Modal-Secret": secret}

    # No worker runs yet (min_containers=0): the first request starts one.
    status, body, _ = http(url + "?name=ops", headers=proxy)
    assert status == 200 and json.loads(body)["hello"] == "ops"
    first_pid = json.loads(body)["pid"]
    # scaledown_window=1: the worker exits; the next request starts another from zero.
    assert wait_until(lambda: not _alive(first_pid), timeout=30)
    status, body, _ = http(url, headers=proxy)
    assert status == 200 and json.loads(body)["pid"] != first_pid
    # The proxy token opens no API.
    status, _, _ = http(f"{server_process.url}/api/apps", headers={
        "Authorization": f"Bearer {secret}"})
    assert status == 403
    # A stopped app's endpoint says the app is stopped, not that there is no such endpoint.
    _cli("app", "stop", "webapp")
    status, body, _ = http(url, headers=proxy)
    assert status == 404 and b"App 'webapp'" in body and b"is stopped" in body \
        and b"`mctl deploy` it again" in body, body


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_mctl_serve_reloads_on_change(tmp_path):
    app_file = tmp_path / "served.py"
    source = ("import mctl\n\napp = mctl.App('served')\n\n\n@app.function()\n"
              "@mctl.fastapi_endpoint()\ndef greet():\n    return 'first'\n")
    app_file.write_text(source)
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mctl", "serve", str(app_file), "--timeout",
                             "90"], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        def url():
            text = (tmp_path / "serve.log").read_text()
            return text.split("Web endpoint greet => ")[1].split()[0] if "greet =>" in text else None

        assert wait_until(lambda: url() is not None, timeout=60), (tmp_path / "serve.log").read_text()
        assert url().endswith("/web/served-dev/greet")
        assert http(url())[1] == b'"first"'
        time.sleep(1.1)  # a new mtime, even on coarse clocks
        app_file.write_text(source.replace("'first'", "'second'"))
        assert wait_until(lambda: http(url())[1] == b'"second"', timeout=60)

        # An edit that does not load leaves the previous version serving, and says so.
        time.sleep(1.1)
        app_file.write_text(source.replace("return 'first'", "return 'third' +"))
        assert wait_until(lambda: "previous version keeps serving" in
                          (tmp_path / "serve.log").read_text(), timeout=60)
        assert http(url())[1] == b'"second"'
        time.sleep(1.1)
        app_file.write_text(source.replace("'first'", "'fourth'"))
        assert wait_until(lambda: http(url())[1] == b'"fourth"', timeout=60)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
