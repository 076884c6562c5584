"""What the client says when an answer is not what it expects: a bug in a route is a JSON 500
naming where to look (not aiohttp's text page), and a URL that is not a control plane says so."""

import asyncio
import http.server
import threading

import pytest

import mctl
from conftest import free_port


def test_a_bug_in_a_route_is_a_json_500_that_says_where_to_look(caplog):
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from mctl.core.server.http import user_errors

    async def broken(request):
        {}["a value the caller must not see"]

    async def main():
        app = web.Application(middlewares=[user_errors])
        app.router.add_get("/api/broken", broken)
        async with TestClient(TestServer(app)) as client:
            resp = await client.get("/api/broken")
            return resp.status, await resp.json()

    status, body = asyncio.run(main())
    assert status == 500
    assert body["error"].startswith("The control plane failed on GET /api/broken (KeyError)")
    assert "its log (the output of `mctl server`) has the traceback" in body["error"]
    assert "a value the caller must not see" not in body["error"]
    assert "a value the caller must not see" in caplog.text  # the traceback, in its log


@pytest.fixture
def not_a_control_plane(monkeypatch, isolated_home):
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html><body>Welcome to nginx!</body></html>")

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MCTL_SERVER_URL", url)
    yield url
    server.shutdown()


def test_a_url_that_is_not_a_control_plane_says_so(not_a_control_plane):
    with pytest.raises(mctl.exception.ConnectionError) as info:
        mctl.App.lookup("anything", create_if_missing=True)
    message = str(info.value)
    assert message.startswith(f"{not_a_control_plane} answered ")
    assert "with HTTP 200 and no JSON (<html><body>Welcome to nginx!</body></html>)" in message
    assert "is it an mctl control plane? Check MCTL_SERVER_URL." in message
