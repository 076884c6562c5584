"""Web endpoints of every kind, for tests/test_web.py."""

import asyncio
import os

import mctl

app = mctl.App("webapp")


@app.function()
@mctl.fastapi_endpoint(method="POST")
def total(item: dict, scale: int = 1):
    return {"total": sum(item["values"]) * scale, "pid": os.getpid()}


@app.function(scaledown_window=1)
@mctl.fastapi_endpoint(requires_proxy_auth=True, label="secure")
def guarded(name: str = "world"):
    return {"hello": name, "pid": os.getpid()}


@app.function(timeout=2)
@mctl.fastapi_endpoint()
def slow(seconds: float = 10):
    import time

    time.sleep(seconds)
    return "finished"


@app.function()
@mctl.asgi_app()
def site():
    from fastapi import FastAPI, WebSocket
    from fastapi.responses import StreamingResponse

    api = FastAPI()

    @api.get("/events")
    async def events(n: int = 3):
        async def gen():
            for i in range(n):
                yield f"data: event {i}\n\n"
                await asyncio.sleep(0.4)
        return StreamingResponse(gen(), media_type="text/event-stream")

    @api.post("/upload")
    async def upload(request: dict):
        return {"keys": sorted(request)}

    @api.websocket("/ws")
    async def echo(ws: WebSocket):
        await ws.accept()
        while True:
            text = await ws.receive_text()
            if text == "bye":
                await ws.close()
                return
            await ws.send_text(text.upper())

    return api


def _wsgi(environ, start_response):
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Path", environ["PATH_INFO"])])
    return [b"wsgi ", environ["REQUEST_METHOD"].encode(), b" ", body]


@app.function()
@mctl.wsgi_app()
def classic():
    return _wsgi


@app.function()
@mctl.web_server(int(os.environ.get("WEB_TEST_PORT", "8765")), startup_timeout=10)
def static_files():
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    handler = functools.partial(SimpleHTTPRequestHandler, directory=os.path.dirname(__file__))
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("WEB_TEST_PORT", "8765"))),
                                 handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()  # dies with the worker


@app.cls()
class Model:
    @mctl.enter()
    def load(self):
        self.weights = 10

    @mctl.fastapi_endpoint()
    def predict(self, x: int):
        return {"y": x * self.weights}
