"""The requests a real `mctl server --scheduler nomad` sends for sandboxes, as they go on the wire
(python-nomad, aiohttp's log reads and its exec WebSocket), in order, each body passed through
tools/nomad-jobcheck: create (Variable, register, allocations), exec over Nomad's alloc exec
WebSocket, logs, a main command's end, the control plane's timeout, terminate (deregister with
purge), a job that cannot be placed, and a control plane restarted under running sandboxes.

The HTTP server here is a request RECORDER with canned answers, not a stand-in for Nomad: it
schedules nothing and runs nothing. Each answer is the smallest document of the shape Nomad's
HTTP API documents, and each is checked against the Go type Nomad's own client decodes it into
(tools/nomad-jobcheck -kind ..., strict: unknown fields refused):

- POST /v1/job/:id → `api.JobRegisterResponse` (EvalID, indexes);
- GET /v1/job/:id/allocations → `[]api.AllocationListStub`: one allocation, ClientStatus
  "running" and `TaskStates["sandbox"]` (`api.TaskState`) with a `Started` `api.TaskEvent`,
  while the test has not said otherwise; after `finish(job, code)`: ClientStatus "complete" or
  "failed", State "dead" and a `Terminated` event with that ExitCode (what a batch task's end
  looks like in the list); with `place = False`: no allocation at all;
- GET /v1/evaluation/:id → `api.Evaluation`; for a job registered with `place = False` its
  `FailedTGAllocs["sandbox"]` is an `api.AllocationMetric` saying the constraint filtered every
  node (what `nomad job run` prints as "Placement Failure");
- GET /v1/allocation/:id → `api.Allocation` with `AllocatedResources.Shared.Ports`
  (`api.PortMapping`) for the job's dynamic ports;
- GET /v1/jobs?prefix= → `[]api.JobListStub` with the job's Meta (`meta=true`);
- DELETE /v1/job/:id → `api.JobDeregisterResponse`; with purge the job is gone from the lists;
- GET /v1/client/fs/logs/:alloc?plain=true → the bytes the test set for that task's log;
- GET /v1/client/allocation/:alloc/exec (WebSocket) → `api.ExecStreamingOutput` frames: each
  stdin frame's data echoed back as stdout (a `cat`), and on stdin's close
  `{"exited": true, "result": {"exit_code": N}}` (N: `exec_exit`), then the socket closes;
  for mctl's idle_timeout probe (a command with `ACTIVITY_SCRIPT`) first a stdout frame with
  `idle_answer` (what that script prints in a sandbox where nothing runs: "0 0").

What Nomad itself would do (placement, the docker driver with runsc, the exec in the
container) is not tested here and cannot be: no Nomad agent runs where mctl is developed."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import time
import uuid
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

import mctl
from conftest import ServerProcess, free_port, wait_until
from nomad_contract import check

pytestmark = pytest.mark.integration

NODE = "nomad-client-7"
IMAGE = "registry.example:5000/mctl/sandbox:py3"
ALLOC_PREFIX = "/v1/client/allocation/"


class NomadRecorder:
    """Records every request and WebSocket frame; answers as the module docstring says."""

    def __init__(self):
        self.requests = []  # method, path, query, token, body
        self.frames_in = []  # (exec path, frame) for each frame mctl sent on an exec socket
        self.answers = []  # (nomad-jobcheck kind, answer) for every JSON answer
        self.jobs = {}  # job id -> {"job", "alloc", "eval", "placed"}
        self.logs = {}  # (alloc id, "stdout"|"stderr") -> bytes
        self.place = True
        self.exec_exit = 0
        self.idle_answer = b"0 0\n"
        self.lock = threading.Lock()
        self.index = 10
        started = threading.Event()
        self.loop = asyncio.new_event_loop()

        def serve():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self._start())
            started.set()
            self.loop.run_forever()

        threading.Thread(target=serve, daemon=True).start()
        assert started.wait(10)

    async def _start(self):
        from aiohttp import web

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)

    # --- what the test says ----------------------------------------------------------------------
    def finish(self, job_id, code):
        with self.lock:
            alloc = self.jobs[job_id]["alloc"]
            alloc["ClientStatus"] = "complete" if code == 0 else "failed"
            state = alloc["TaskStates"]["sandbox"]
            state.update(State="dead", Failed=code != 0)
            state["Events"].append({"Type": "Terminated", "ExitCode": code,
                                    "DisplayMessage": f"Exit Code: {code}"})

    def calls(self):
        with self.lock:
            return [(r["method"], r["path"]) for r in self.requests]

    # --- answers -------------------------------------------------------------------------------
    def _json(self, kind, answer, status=200):
        from aiohttp import web

        if kind:
            self.answers.append((kind, answer))
        return web.json_response(answer, status=status)

    def _stub(self, job_id, body):
        self.index += 1
        alloc_id = str(uuid.uuid4())
        return {"ID": alloc_id, "EvalID": str(uuid.uuid4()), "Name": f"{job_id}.sandbox[0]",
                "Namespace": body["Job"]["Namespace"], "NodeID": str(uuid.uuid4()),
                "NodeName": NODE, "JobID": job_id, "JobType": "batch", "TaskGroup": "sandbox",
                "DesiredStatus": "run", "ClientStatus": "running",
                "TaskStates": {"sandbox": {"State": "running", "Failed": False, "Events": [
                    {"Type": "Received", "DisplayMessage": "Task received by client"},
                    {"Type": "Started", "DisplayMessage": "Task started by client"}]}},
                "CreateIndex": self.index, "ModifyIndex": self.index}

    async def _handle(self, request):
        from aiohttp import web

        path, query = request.path, {k: v for k, v in request.query.items()}
        raw = await request.read()
        with self.lock:
            self.requests.append({"method": request.method, "path": path, "query": query,
                                  "token": request.headers.get("X-Nomad-Token"),
                                  "body": json.loads(raw) if raw else None})
        if path.startswith(ALLOC_PREFIX) and path.endswith("/exec"):
            return await self._exec(request)
        with self.lock:
            return self._answer(request.method, path, query, raw)

    def _answer(self, method, path, query, raw):
        from aiohttp import web

        parts = path.strip("/").split("/")
        if path == "/v1/status/leader":
            return self._json(None, "127.0.0.1:4647")
        if path.startswith("/v1/var/"):
            return self._json(None, json.loads(raw) if raw else None)
        if parts[:2] == ["v1", "job"] and len(parts) == 3 and method == "POST":
            body = json.loads(raw)
            self.index += 1
            eval_id = str(uuid.uuid4())
            self.jobs[parts[2]] = {"job": body["Job"], "eval": eval_id, "placed": self.place,
                                   "alloc": self._stub(parts[2], body) if self.place else None}
            return self._json("register-response", {"EvalID": eval_id,
                                                    "EvalCreateIndex": self.index,
                                                    "JobModifyIndex": self.index})
        if parts[:2] == ["v1", "job"] and len(parts) == 3 and method == "DELETE":
            job = self.jobs.get(parts[2])
            if job is None:
                return web.Response(status=404, text="job not found")
            if job["alloc"] is not None and job["alloc"]["ClientStatus"] == "running":
                job["alloc"].update(DesiredStatus="stop", ClientStatus="complete")
                job["alloc"]["TaskStates"]["sandbox"]["State"] = "dead"
            if query.get("purge", "").lower() == "true":
                del self.jobs[parts[2]]
            self.index += 1
            return self._json("deregister-response", {"EvalID": str(uuid.uuid4()),
                                                      "EvalCreateIndex": self.index,
                                                      "JobModifyIndex": self.index})
        if parts[:2] == ["v1", "job"] and parts[3:] == ["allocations"]:
            job = self.jobs.get(parts[2])
            allocs = [job["alloc"]] if job and job["alloc"] else []
            return self._json("allocs", json.loads(json.dumps(allocs)))
        if parts[:2] == ["v1", "evaluation"]:
            job_id, job = next(((k, j) for k, j in self.jobs.items() if j["eval"] == parts[2]),
                               (None, None))
            if job is None:
                return web.Response(status=404, text="eval not found")
            answer = {"ID": parts[2], "Namespace": job["job"]["Namespace"], "JobID": job_id,
                      "Type": "batch", "TriggeredBy": "job-register", "Status": "complete"}
            if not job["placed"]:
                answer["FailedTGAllocs"] = {"sandbox": {
                    "NodesEvaluated": 3, "NodesFiltered": 3, "NodesAvailable": {"dc1": 3},
                    "ConstraintFiltered": {"${meta.mctl_sandbox_runtime} = runsc": 3}}}
                answer["BlockedEval"] = str(uuid.uuid4())
            return self._json("evaluation", answer)
        if parts[:2] == ["v1", "allocation"]:
            job = next((j for j in self.jobs.values()
                        if j["alloc"] and j["alloc"]["ID"] == parts[2]), None)
            if job is None:
                return web.Response(status=404, text="alloc not found")
            [group] = job["job"]["TaskGroups"]
            ports = [{"Label": p["Label"], "Value": 20000 + p["To"], "To": p["To"],
                      "HostIP": "10.0.0.7"}
                     for net in group.get("Networks") or [] for p in net["DynamicPorts"]]
            answer = {"ID": parts[2], "Namespace": job["job"]["Namespace"], "NodeName": NODE,
                      "JobID": job["job"]["ID"], "TaskGroup": "sandbox",
                      "ClientStatus": job["alloc"]["ClientStatus"],
                      "AllocatedResources": {"Shared": {"Ports": ports}}}
            return self._json("allocation", answer)
        if path == "/v1/jobs":
            stubs = [{"ID": k, "Name": k, "Namespace": j["job"]["Namespace"], "Type": "batch",
                      "Status": "running", "Meta": j["job"]["Meta"]}
                     for k, j in self.jobs.items() if k.startswith(query.get("prefix", ""))]
            return self._json("jobs", stubs)
        if path.startswith("/v1/client/fs/logs/"):
            data = self.logs.get((parts[-1], query.get("type")))
            if data is None:
                return web.Response(status=404, text="alloc not found")
            return web.Response(body=data, content_type="text/plain")
        return web.Response(status=404, text="no such path")

    async def _exec(self, request):
        from aiohttp import WSMsgType, web

        ws = web.WebSocketResponse()
        await ws.prepare(request)
        key = request.path_qs
        if "PORTS=" in json.loads(request.query["command"])[-1]:  # the idle_timeout probe
            await self._send(ws, {"stdout": {"data": base64.b64encode(
                self.idle_answer).decode()}})
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            frame = json.loads(msg.data)
            with self.lock:
                self.frames_in.append((key, frame))
            stdin = frame.get("stdin") or {}
            if stdin.get("data"):
                await self._send(ws, {"stdout": {"data": stdin["data"]}})
            if stdin.get("close"):
                await self._send(ws, {"exited": True, "result": {"exit_code": self.exec_exit}})
                break
        await ws.close()
        return ws

    async def _send(self, ws, frame):
        with self.lock:
            self.answers.append(("exec-out", frame))
        await ws.send_str(json.dumps(frame))


@pytest.fixture
def recorder():
    rec = NomadRecorder()
    try:
        yield rec
    finally:
        rec.close()


def _server(tmp_path, recorder, *options):
    env = {**os.environ, "NOMAD_ADDR": recorder.url, "NOMAD_NAMESPACE": "ml",
           "NOMAD_TOKEN": "acl-secret-id"}
    env.pop("MCTL_SANDBOX_BACKEND", None)
    args = ["--scheduler", "nomad", "--scheduler-option", "datacenters=dc1",
            "--scheduler-option", "poll_interval=0.2",
            "--scheduler-option", f"default_image={IMAGE}"]
    for option in options:
        args += ["--scheduler-option", option]
    return ServerProcess(tmp_path / "state", free_port(), env, args=args)


def _job_of(sb):
    return "mctl-" + sb.object_id.lower()


def _stdin_bytes(recorder, exec_key):
    return b"".join(base64.b64decode(f["stdin"]["data"]) for k, f in recorder.frames_in
                    if k == exec_key and (f.get("stdin") or {}).get("data"))


def _contract(recorder):
    """Every body mctl sent and every answer the recorder gave pass Nomad's own API types."""
    sent = {"job": [], "variable": [], "exec-in": [f for _, f in recorder.frames_in]}
    for r in recorder.requests:
        if r["body"] is None:
            continue
        sent["variable" if r["path"].startswith("/v1/var/") else "job"].append(r["body"])
    answers = {}
    for kind, answer in recorder.answers:
        answers.setdefault(kind, []).append(answer)
    for kind, docs in [*sent.items(), *answers.items()]:
        if docs:
            done = check(docs, kind)
            assert done.returncode == 0, (kind, done.stdout, done.stderr)


def test_sandbox_request_sequence_create_exec_logs_terminate(tmp_path, isolated_home,
                                                             monkeypatch, recorder):
    srv = _server(tmp_path, recorder).start()
    monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
    try:
        app = mctl.App.lookup("sbn", create_if_missing=True)
        sb = mctl.Sandbox.create(app=app, timeout=120, unencrypted_ports=[8080],
                                 block_network=False, env={"MODE": "plain"},
                                 volumes={"/data": mctl.Volume.from_name(
                                     "datasets", create_if_missing=True)},
                                 secrets=[mctl.Secret.from_dict({"API_KEY": "s3cr3t-value"})])
        jid = _job_of(sb)
        alloc = recorder.jobs[jid]["alloc"]["ID"]
        assert sb._record["backend"] == "nomad" and sb.isolation == "gvisor"
        assert sb._record["host"] == NODE and sb._record["container_id"] == alloc
        assert sb.tunnels()[8080].host == "10.0.0.7" and sb.tunnels()[8080].port == 28080

        # exec: Nomad's alloc exec WebSocket, stdin in frames, the exit code from its result
        recorder.exec_exit = 3
        p = sb.exec("cat", secrets=[mctl.Secret.from_dict({"EXEC_SECRET": "hunter2"})])
        p.stdin.write(b"hello\n")
        p.stdin.drain()
        p.stdin.write_eof()
        assert p.wait() == 3
        out = p.stdout.read()
        assert out.endswith("hello\n"), out  # the recorder echoes what reached stdin
        [exec_key] = {k for k, _ in recorder.frames_in}
        path, _, query = exec_key.partition("?")
        assert path == f"{ALLOC_PREFIX}{alloc}/exec"
        q = {k: v[0] for k, v in parse_qs(query).items()}
        assert (q["task"], q["tty"], q["namespace"], q["region"]) == (
            "sandbox", "false", "ml", "global")
        command = json.loads(q["command"])
        assert command[:2] == ["/bin/sh", "-c"] and command[-1] == "cat"
        # values travel in the stream, never in the URL: exports up to a marker, then stdin
        stdin = _stdin_bytes(recorder, exec_key).decode()
        marker = command[4]
        assert stdin == f"export EXEC_SECRET=hunter2\n{marker}\nhello\n"
        assert "hunter2" not in exec_key
        assert [f for k, f in recorder.frames_in if k == exec_key][-1] == {
            "stdin": {"close": True}}

        # open(): through the same exec
        recorder.exec_exit = 0
        with sb.open("/tmp/notes.txt", "w") as f:
            f.write("on the node\n")
        written = [k for k, _ in recorder.frames_in if k != exec_key]
        assert written and all(k.startswith(f"{ALLOC_PREFIX}{alloc}/exec?") for k in written)
        assert "on the node\n" in "".join(
            _stdin_bytes(recorder, k).decode() for k in set(written))

        # logs: the client fs logs API, plain
        recorder.logs[(alloc, "stdout")] = b"main says hi\n"
        recorder.logs[(alloc, "stderr")] = b"main warns\n"
        assert sb.stdout.read() == "main says hi\n" and sb.stderr.read() == "main warns\n"
        from mctl.sdk.sandbox import _http

        assert _http(srv.url, "GET", f"/api/sandboxes/{sb.object_id}/logs") == {
            "stdout": "main says hi\n", "stderr": "main warns\n"}

        # an exec timeout: the command is killed inside, found by its exec marker, by a second exec
        p = sb.exec("sleep", "30", timeout=1)
        assert p.wait() == -1
        kills = [json.loads(unquote(k.split("command=")[1].split("&")[0]))
                 for k, _ in recorder.frames_in if "kill" in unquote(k)]
        assert kills and kills[0][:2] == ["/bin/sh", "-c"]
        sleeper = [json.loads(unquote(k.split("command=")[1].split("&")[0]))
                   for k, _ in recorder.frames_in if "sleep" in unquote(k)][0]
        # the sleeper's wrapper exports that marker (`sh -c SCRIPT sh ENV_END MARKER ...`)
        assert f"MCTL_EXEC_ID={sleeper[5]}" in kills[0][2] and "kill -KILL" in kills[0][2]

        before = len(recorder.requests)
        sb.terminate()
        assert sb.wait(raise_on_termination=False) == 137
        assert wait_until(lambda: ("DELETE", f"/v1/var/nomad/jobs/{jid}")
                          in recorder.calls()[before:], timeout=10)

        # a sandbox whose main command ends by itself: the Terminated event's exit code
        ended = mctl.Sandbox.create("python", "-c", "raise SystemExit(7)", app=app)
        recorder.finish(_job_of(ended), 7)
        assert ended.wait() == 7

        # the control plane's timeout: -1, and the job goes
        short = mctl.Sandbox.create(app=app, timeout=2)
        with pytest.raises(mctl.exception.SandboxTimeoutError):
            short.wait()
        assert short.returncode == -1
        assert wait_until(lambda: ("DELETE", f"/v1/job/{_job_of(short)}")
                          in recorder.calls(), timeout=10)
    finally:
        srv.stop()

    calls = recorder.calls()
    first = [c for c in calls if jid in c[1] or alloc in c[1]]
    # the order a Nomad operator would expect for one sandbox
    want = [("PUT", f"/v1/var/nomad/jobs/{jid}"), ("POST", f"/v1/job/{jid}"),
            ("GET", f"/v1/job/{jid}/allocations"), ("GET", f"/v1/allocation/{alloc}"),
            ("GET", f"{ALLOC_PREFIX}{alloc}/exec"), ("GET", f"/v1/client/fs/logs/{alloc}"),
            ("DELETE", f"/v1/job/{jid}"), ("DELETE", f"/v1/var/nomad/jobs/{jid}")]
    positions = [first.index(c) for c in want]
    assert positions == sorted(positions), first
    deletes = [r for r in recorder.requests if r["method"] == "DELETE"
               and r["path"].startswith("/v1/job/")]
    assert deletes and all(r["query"].get("purge", "").lower() == "true" for r in deletes)
    assert ("DELETE", f"/v1/job/{_job_of(ended)}") not in calls  # kept for its logs a while
    for r in recorder.requests:
        assert r["token"] == "acl-secret-id", r
        if r["path"] != "/v1/status/leader":
            assert r["query"].get("namespace") == "ml", r
    # the secret value is in the job's Variable, never in the job or a URL
    jobs = [r["body"] for r in recorder.requests if r["method"] == "POST"]
    assert len(jobs) == 3 and not any("s3cr3t" in json.dumps(j) for j in jobs)
    assert not any("s3cr3t" in r["path"] + json.dumps(r["query"]) for r in recorder.requests)
    [variable] = [r["body"] for r in recorder.requests if r["method"] == "PUT"]
    assert variable["Items"] == {"API_KEY": "s3cr3t-value"}
    task = jobs[0]["Job"]["TaskGroups"][0]["Tasks"][0]
    assert task["Env"]["MODE"] == "plain" and task["Config"]["image"] == IMAGE
    assert task["VolumeMounts"] == [{"Volume": "datasets", "Destination": "/data",
                                     "ReadOnly": False}]
    assert jobs[0]["Job"]["TaskGroups"][0]["Volumes"]["datasets"]["Type"] == "host"
    assert any(f'nomadVar "nomad/jobs/{jid}"' in t["EmbeddedTmpl"] for t in task["Templates"])
    _contract(recorder)


def test_idle_timeout_probes_through_alloc_exec_and_purges_the_job(tmp_path, isolated_home,
                                                                  monkeypatch, recorder):
    srv = _server(tmp_path, recorder).start()
    monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
    try:
        app = mctl.App.lookup("sbn", create_if_missing=True)
        sb = mctl.Sandbox.create(app=app, timeout=60, idle_timeout=2)
        with pytest.raises(mctl.exception.SandboxTimeoutError, match="idle"):
            sb.wait()
        assert sb.returncode == -1
        jid, alloc = _job_of(sb), sb._record["container_id"]
        assert wait_until(lambda: ("DELETE", f"/v1/job/{jid}") in recorder.calls(), timeout=10)
    finally:
        srv.stop()
    probes = [k for k, _ in recorder.frames_in]
    assert probes and all(k.startswith(f"{ALLOC_PREFIX}{alloc}/exec?") for k in probes)
    _contract(recorder)


def test_a_job_that_cannot_be_placed_fails_create_with_nomads_reason(tmp_path, isolated_home,
                                                                     monkeypatch, recorder):
    srv = _server(tmp_path, recorder, "sandbox_start_timeout=1.5").start()
    monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
    recorder.place = False
    try:
        app = mctl.App.lookup("sbn", create_if_missing=True)
        started = time.monotonic()
        with pytest.raises(mctl.exception.InvalidError) as info:
            mctl.Sandbox.create(app=app, timeout=60)
        assert time.monotonic() - started < 30
        message = str(info.value)
        assert "did not start within 1.5s" in message, message
        assert "constraint '${meta.mctl_sandbox_runtime} = runsc': 3 node(s) excluded" in message
        from mctl.sdk.sandbox import _http

        [record] = _http(srv.url, "GET", "/api/sandboxes?all=1")
        assert record["state"] == "failed" and record["backend"] == "nomad"
    finally:
        srv.stop()
    calls = recorder.calls()
    [post] = [c for c in calls if c[0] == "POST"]
    jid = post[1].rsplit("/", 1)[1]
    assert ("GET", f"/v1/job/{jid}/allocations") in calls
    assert calls.index(post) < calls.index(("DELETE", f"/v1/job/{jid}"))
    assert [r for r in recorder.requests if r["method"] == "GET"
            and r["path"].startswith("/v1/evaluation/")]
    assert jid not in recorder.jobs  # purged
    _contract(recorder)


def test_a_restarted_control_plane_finds_its_sandbox_jobs(tmp_path, isolated_home, monkeypatch,
                                                          recorder):
    srv = _server(tmp_path, recorder).start()
    monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
    try:
        app = mctl.App.lookup("sbn", create_if_missing=True)
        sb = mctl.Sandbox.create(app=app, timeout=120)
        gone = mctl.Sandbox.create(app=app, timeout=120)
        done = mctl.Sandbox.create(app=app, timeout=120)
        srv.kill()  # a crash: nothing is terminated on the way out
        del recorder.jobs[_job_of(gone)]  # its job went meanwhile (an operator's `job stop`)
        recorder.finish(_job_of(done), 4)  # its task ended meanwhile
        before = len(recorder.requests)
        srv.start()
        p = sb.exec("cat")  # the relay waits for the recovery
        p.stdin.write_eof()
        assert p.wait() == 0
        assert mctl.Sandbox.from_id(gone.object_id)._refresh()["state"] == "lost"
        assert mctl.Sandbox.from_id(done.object_id).wait() == 4
        listed = [r for r in recorder.requests[before:] if r["path"] == "/v1/jobs"]
        assert listed and listed[0]["query"]["prefix"] == "mctl-sb-"
        assert listed[0]["query"]["meta"].lower() == "true"
        sb.terminate()
        assert ("DELETE", f"/v1/job/{_job_of(sb)}") in recorder.calls()
    finally:
        srv.stop()
    _contract(recorder)
