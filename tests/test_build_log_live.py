"""Image build output reaches the deployer while the build runs (`mctl deploy`, `mctl run`), with
a progress line on a terminal, and stays in `mctl app logs`."""

import io
import os
import subprocess
import sys

import pytest

from conftest import APPS

from mctl.core.build_follow import BuildProgress

pytestmark = pytest.mark.integration


def test_deploy_streams_the_build_log_while_the_build_runs(server_process, tmp_path):
    """The build blocks until the test has read its first line: output shown only when the
    deploy returns would never arrive, and the build would give up after a minute."""
    go = tmp_path / "go"
    env = dict(os.environ, IMAGE_LIVE_GO=str(go), IMAGE_LIVE_TOKEN=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "mctl", "deploy", str(APPS / "image_live_log.py")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "live-log: waiting for" in line:
                assert proc.poll() is None, "the deploy had returned already"
                go.touch()
                break
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert go.exists(), "the build's first line never reached the deployer:\n" + "".join(seen)
    assert proc.returncode == 0, err
    out = "".join(seen) + rest
    assert out.count("live-log: waiting for") == 1  # printed live, not again at the end
    assert "live-log: got the go-ahead" in out and "Deployed app image-live-log" in out
    logs = subprocess.run([sys.executable, "-m", "mctl", "app", "logs", "image-live-log"],
                          capture_output=True, text=True, env=env, check=True).stdout
    assert "live-log: waiting for" in logs and "live-log: got the go-ahead" in logs


def test_a_failed_build_streams_its_log_and_refuses_the_deploy(server_process, tmp_path):
    # a go-ahead file in a missing directory: the build function gives up at once
    env = dict(os.environ, IMAGE_LIVE_GO="/nonexistent/go", IMAGE_LIVE_TOKEN=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "mctl", "deploy", str(APPS / "image_live_log.py")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0
    assert "live-log: waiting for /nonexistent/go" in out.stdout  # streamed before the refusal
    assert "nobody saw the build output in time" in out.stderr


def test_the_progress_line_shows_image_step_and_time_and_ends_in_a_summary():
    out, status = io.StringIO(), io.StringIO()
    progress = BuildProgress(out=out, status=status, live=True)
    progress.feed({"lines": ["image im-abc: oci builder", "STEP 2/5: RUN apt-get install jq"],
                   "next": 2, "done": False,
                   "image": {"image_id": "im-abc", "index": 1, "count": 2}})
    assert out.getvalue() == "image im-abc: oci builder\nSTEP 2/5: RUN apt-get install jq\n"
    last = status.getvalue().rsplit("\r\x1b[K", 1)[-1]
    assert "Building image 1/2 im-abc (oci) · 0s · step 2/5: RUN apt-get install jq" in last
    assert progress.next == 2
    progress.close(ok=True)
    assert status.getvalue().endswith("\r\x1b[KImages ready: 2 images in 0.0s\n")


def test_piped_output_gets_the_lines_only():
    out, status = io.StringIO(), io.StringIO()
    progress = BuildProgress(out=out, status=status)  # StringIO is no terminal
    progress.feed({"lines": ["STEP 1/1: FROM x"], "next": 1, "done": True,
                   "image": {"image_id": "im-abc", "index": 1, "count": 1}})
    progress.close(ok=True)
    assert out.getvalue() == "STEP 1/1: FROM x\n" and status.getvalue() == ""
