"""The requests a real `mctl server --scheduler nomad` sends over a deploy, a call, a redeploy
that drops a schedule and a function, a rollback and a stop, in order, as they go on the wire
(through python-nomad and aiohttp), each body passed through tools/nomad-jobcheck.

The HTTP server here is a request RECORDER, not a stand-in for Nomad: it answers every request
with the smallest valid answer (no job is ever known: 404 for reads of a job, an empty list of
allocations) and decides nothing. What Nomad would do with these requests (place allocations,
roll them with the update block) is not tested here, and cannot be: no Nomad agent can run
where mctl is developed. What this test holds is mctl's side of the contract: which requests,
in which order, with bodies Nomad's own types accept."""

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from conftest import ServerProcess, free_port, wait_until
from nomad_contract import check

pytestmark = pytest.mark.integration

V1 = '''
import mctl

app = mctl.App("rec")

@app.function(schedule=mctl.Period(seconds=60), timeout=30)
def work(x: int = 1) -> int:
    return x

@app.function()
def extra() -> int:
    return 2
'''

V2 = '''
import mctl

app = mctl.App("rec")

@app.function(timeout=40)  # its schedule dropped, and function extra
def work(x: int = 1) -> int:
    return x
'''


class Recorder:
    """Records each request (method, path, query, headers, JSON body) and answers it with the
    smallest valid answer; see the module docstring."""

    def __init__(self):
        self.requests = []
        self.lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                with recorder.lock:
                    recorder.requests.append({
                        "method": self.command, "path": url.path,
                        "query": {k: v[0] for k, v in parse_qs(url.query).items()},
                        "token": self.headers.get("X-Nomad-Token"),
                        "body": json.loads(raw) if raw else None})
                status, answer = recorder.answer(self.command, url.path, raw)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def answer(method, path, raw):
        if path == "/v1/status/leader":
            return 200, "127.0.0.1:4647"
        if method == "GET" and path.endswith("/allocations"):
            return 200, []
        if method == "GET":
            return 404, "job not found"
        if path.startswith("/v1/var/"):
            return 200, json.loads(raw) if raw else None
        return 200, {"EvalID": "00000000-0000-0000-0000-000000000000", "Index": 1}

    def calls(self):
        with self.lock:
            return [(r["method"], r["path"]) for r in self.requests]

    def close(self):
        self.server.shutdown()


def mctl_cli(*args, env):
    done = subprocess.run([sys.executable, "-m", "mctl", *args], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def index(calls, call, start=0):
    return calls.index(call, start)


def test_request_sequence_of_deploys_rollback_and_stop(tmp_path, isolated_home, monkeypatch):
    recorder = Recorder()
    env = {**os.environ, "NOMAD_ADDR": recorder.url, "NOMAD_NAMESPACE": "ml",
           "NOMAD_TOKEN": "acl-secret-id"}
    srv = ServerProcess(tmp_path / "state", free_port(), env,
                        args=["--scheduler", "nomad", "--scheduler-option", "datacenters=dc1",
                              "--scheduler-option", "poll_interval=0.2",
                              "--scheduler-option", "function.extra.namespace=batch"])
    srv.start()
    client = {**os.environ, "MCTL_SERVER_URL": srv.url}
    monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
    work, sched, extra = "/v1/job/mctl-rec-work", "/v1/job/mctl-rec-work-schedule", \
        "/v1/job/mctl-rec-extra"
    try:
        (tmp_path / "v1.py").write_text(V1)
        (tmp_path / "v2.py").write_text(V2)
        mctl_cli("deploy", str(tmp_path / "v1.py"), env=client)
        assert wait_until(lambda: {("POST", work), ("POST", sched), ("POST", extra)}
                          <= set(recorder.calls()), timeout=60), recorder.calls()
        calls = recorder.calls()
        # each job's Variable (task token, app version) is written before the job needs it
        assert index(calls, ("PUT", "/v1/var/nomad/jobs/mctl-rec-work")) < \
            index(calls, ("POST", work))
        assert index(calls, ("PUT", "/v1/var/nomad/jobs/mctl-rec-work-schedule")) < \
            index(calls, ("POST", sched))

        # a call: core scales the service job through the scale API
        import mctl

        mctl.Function.from_name("rec", "work").spawn(5)
        assert wait_until(lambda: ("POST", work + "/scale") in recorder.calls(), timeout=30)

        # v2: the service job is registered over the running one: never deregistered; the
        # dropped schedule's periodic job and the dropped function's job are, after that
        before = len(recorder.calls())
        mctl_cli("deploy", str(tmp_path / "v2.py"), env=client)
        assert wait_until(lambda: {("DELETE", sched), ("DELETE", extra)}
                          <= set(recorder.calls()[before:]), timeout=60), recorder.calls()
        calls = recorder.calls()
        assert ("DELETE", work) not in calls
        assert ("DELETE", "/v1/var/nomad/jobs/mctl-rec-work") not in calls
        assert index(calls, ("POST", work), before) < index(calls, ("DELETE", sched), before)
        assert ("DELETE", "/v1/var/nomad/jobs/mctl-rec-work-schedule") in calls[before:]
        assert ("POST", sched) not in calls[before:]

        # rollback to v1: the service job again in place, the periodic job and extra back
        before = len(recorder.calls())
        mctl_cli("app", "rollback", "rec", "1", env=client)
        assert wait_until(lambda: {("POST", work), ("POST", sched), ("POST", extra)}
                          <= set(recorder.calls()[before:]), timeout=60), recorder.calls()
        assert ("DELETE", work) not in recorder.calls()

        # stop: every job and Variable goes
        before = len(recorder.calls())
        mctl_cli("app", "stop", "rec", env=client)
        assert wait_until(lambda: {("DELETE", work), ("DELETE", sched), ("DELETE", extra)}
                          <= set(recorder.calls()[before:]), timeout=60), recorder.calls()
        time.sleep(0.5)  # the Variables' deletes follow their jobs'
    finally:
        srv.stop()
        recorder.close()

    requests = recorder.requests
    # every request carries the ACL token and the namespace (python-nomad leaves the namespace
    # of /v1/var calls out unless given: mctl gives it)
    assert all(r["token"] == "acl-secret-id" for r in requests)
    # ... the function's own namespace where an option overrides it, for every call about its
    # jobs, its Variable included (the job's template reads it from the job's namespace)
    for r in requests:
        if r["path"] != "/v1/status/leader":
            wanted = "batch" if "mctl-rec-extra" in r["path"] else "ml"
            assert r["query"].get("namespace") == wanted, r
            if r["body"] and "Job" in r["body"]:
                assert r["body"]["Namespace"] == r["body"]["Job"]["Namespace"] == wanted
            if r["body"] and "Items" in r["body"]:
                assert r["body"]["Namespace"] == wanted
    # every body, as sent, passes Nomad's own API types
    kinds = {"job": [], "scale": [], "variable": [], "revert": []}
    for r in requests:
        if r["body"] is None:
            continue
        if r["path"].startswith("/v1/var/"):
            kinds["variable"].append(r["body"])
        elif r["path"].endswith("/scale"):
            kinds["scale"].append(r["body"])
        elif r["path"].endswith("/revert"):
            kinds["revert"].append(r["body"])
        else:
            assert r["method"] == "POST" and r["path"].count("/") == 3, r
            kinds["job"].append(r["body"])
    assert len(kinds["job"]) >= 6 and kinds["scale"] and len(kinds["variable"]) >= 6
    for kind, docs in kinds.items():
        if docs:
            done = check(docs, kind)
            assert done.returncode == 0, (kind, done.stdout)
    # the task tokens travel in the Variables only
    tokens = {b["Items"]["task_token"] for b in kinds["variable"]}
    assert tokens and not any(t in json.dumps(kinds["job"]) for t in tokens)
    assert {b["Items"]["app_version"] for b in kinds["variable"]} >= {"1", "2", "3"}
