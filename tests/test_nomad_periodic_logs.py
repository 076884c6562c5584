"""Forcing a periodic job and reading allocation logs on the nomad backend. No Nomad agent can run
here: the requests are checked as built (paths, parameters), the log frames the decoder reads are
held to Nomad's `api.StreamFrame` by tools/nomad-jobcheck, and the errors are produced for real
(an address where nothing listens)."""

import base64
import json
import os
import subprocess
import sys

import pytest

from conftest import free_port
from mctl.exception import InvalidError
from mctl.plugins.scheduler_nomad import (FrameDecoder, NomadPool, NomadScheduler, force_path,
                                          logs_request)
from nomad_contract import check


def test_force_and_logs_requests():
    assert (force_path("mctl-app-nightly-schedule")
            == "/v1/job/mctl-app-nightly-schedule/periodic/force")
    path, params = logs_request("5b0c1e2a-aaaa-bbbb-cccc-0123456789ab", follow=True,
                                tail_bytes=4096)
    assert path == "/v1/client/fs/logs/5b0c1e2a-aaaa-bbbb-cccc-0123456789ab"
    assert params == {"task": "worker", "type": "stdout", "follow": "true", "origin": "end",
                      "offset": "4096", "plain": "false"}
    assert logs_request("a/b", kind="stderr")[0] == "/v1/client/fs/logs/a%2Fb"
    with pytest.raises(InvalidError, match="not stdout or stderr"):
        logs_request("a", kind="stdin")


def test_log_frames_are_decoded_however_the_stream_is_cut():
    lines = ["worker ready\n", "input 1 done: ünïcode\n", "x" * 3000 + "\n"]
    frames = [{"Offset": 100 + i, "Data": base64.b64encode(line.encode()).decode(),
               "File": "alloc/logs/wörker.stdout.0"} for i, line in enumerate(lines)]
    frames.insert(1, {})  # a heartbeat
    frames.append({"FileEvent": "file truncated", "File": "alloc/logs/worker.stdout.0"})
    done = check(frames, "frame")  # the frames are what Nomad's own type encodes
    assert done.returncode == 0, done.stdout
    stream = "".join(json.dumps(f, ensure_ascii=False) for f in frames).encode()
    for size in (1, 7, 64, len(stream)):
        decoder, out = FrameDecoder(), b""
        for at in range(0, len(stream), size):
            out += b"".join(decoder.feed(stream[at:at + size]))
        assert out.decode() == "".join(lines)


def test_an_ended_allocation_is_reported_with_nomads_reason(monkeypatch):
    monkeypatch.delenv("NOMAD_ADDR", raising=False)
    backend = NomadScheduler({})
    pool = NomadPool(launch=None, job_ids=("mctl-a-f",), namespace="default", count=1,
                     job_version=2)
    running = {"ID": "a1", "JobVersion": 2, "ClientStatus": "running", "NodeName": "n1"}
    assert backend._update(pool, [running]) == []
    assert list(pool.workers) == ["ta-a1"]
    failed = {**running, "ClientStatus": "failed", "TaskStates": {"worker": {"Events": [
        {"Type": "Terminated", "ExitCode": 3, "DisplayMessage": "Exit Code: 3"}]}}}
    old = {"ID": "a0", "JobVersion": 1, "ClientStatus": "failed"}  # an older version's: ignored
    assert backend._update(pool, [failed, old]) == [
        ("ta-a1", 3, "Nomad allocation a1 ended failed: Exit Code: 3")]
    assert pool.workers == {}


@pytest.mark.parametrize("command", [["force", "my-app", "nightly"],
                                     ["logs", "my-app", "nightly", "-f"]])
def test_unreachable_nomad_is_one_line_naming_nomad_addr(command, tmp_path):
    port = free_port()  # nothing listens there
    env = {**os.environ, "NOMAD_ADDR": f"http://127.0.0.1:{port}", "MCTL_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "mctl", "nomad", *command], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"Error: Nomad is unreachable at http://127.0.0.1:{port}")
    assert "Set NOMAD_ADDR" in done.stderr and "Traceback" not in done.stderr
