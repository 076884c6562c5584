"""Images: deploy time of a 10-function app with a warm build cache, and cold start of a function
in a podman container against the same function on the venv fast path.

    sudo scripts/images-dev up            # podman, buildah, the debian_slim base
    python benchmarks/images.py [--trials 5]

Starts its own `mctl server` (state in a temporary directory, its own MCTL_HOME). The first deploy
builds the images (a virtualenv with one pip package; an OCI image with one apt package); the
timed deploys find them cached. A cold start is the first `.remote()` after a deploy: each trial
deploys a new version, so its pools start with no workers.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mctl

app = mctl.App("bench-images")
venv_image = mctl.Image.debian_slim().pip_install("tomli-w")
oci_image = mctl.Image.debian_slim().pip_install("tomli-w").apt_install("jq")
TRIAL = os.environ.get("BENCH_TRIAL", "0")  # changes nothing the images hash


def _make(i: int, image: mctl.Image):
    def work(x: int) -> int:
        return x + i

    work.__name__ = work.__qualname__ = f"f{i}"
    return app.function(image=image, name=f"f{i}", serialized=True)(work)


functions = [_make(i, venv_image if i < 5 else oci_image) for i in range(10)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deploy() -> float:
    from mctl.core.runner import deploy_app

    start = time.perf_counter()
    deploy_app(app)
    return time.perf_counter() - start


def _cold_start(tag: str) -> float:
    _deploy()  # a new version: its pools have no workers yet
    fn = mctl.Function.from_name("bench-images", tag)
    start = time.perf_counter()
    assert fn.remote(1) is not None
    return time.perf_counter() - start


def _start_server(port: int, tmp: Path) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "mctl", "server", "--port", str(port),
                               "--state-dir", str(tmp / "state")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from mctl.core.runner import server_alive

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if (tmp / "home" / "token").exists() and server_alive(f"http://127.0.0.1:{port}"):
            return server
        time.sleep(0.1)
    raise RuntimeError("the benchmark's mctl server did not start")


def _stop(server: subprocess.Popen) -> None:
    from mctl.core.client import close_client, run_sync

    run_sync(close_client(os.environ["MCTL_SERVER_URL"]))
    server.terminate()
    server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mctl-bench-images-") as tmp:
        os.environ["MCTL_HOME"] = str(Path(tmp) / "home")
        port = _free_port()
        os.environ["MCTL_SERVER_URL"] = f"http://127.0.0.1:{port}"
        server = _start_server(port, Path(tmp))
        try:
            first = _deploy()
            warm = [_deploy() for _ in range(args.trials)]
            venv = [_cold_start("f0") for _ in range(args.trials)]
            oci = [_cold_start("f5") for _ in range(args.trials)]
        finally:
            _stop(server)
        # A restarted control plane has no memory of its builds: the builders' caches answer.
        fresh = []
        for _ in range(args.trials):
            server = _start_server(port, Path(tmp))
            try:
                fresh.append(_deploy())
            finally:
                _stop(server)
    med = statistics.median
    print(f"deploy, 10 functions, 2 images, cold build cache   {first:8.2f} s (once)")
    print(f"deploy, 10 functions, 2 images, warm cache (median)  {med(warm):8.2f} s "
          f"(min {min(warm):.2f}, max {max(warm):.2f})")
    print(f"deploy, same, after a server restart (median)        {med(fresh):8.2f} s "
          f"(min {min(fresh):.2f}, max {max(fresh):.2f})")
    print(f"cold start, venv fast path (median)                  {med(venv):8.2f} s "
          f"(min {min(venv):.2f}, max {max(venv):.2f})")
    print(f"cold start, podman container (median)                {med(oci):8.2f} s "
          f"(min {min(oci):.2f}, max {max(oci):.2f})")
    print(f"{args.trials} trials each")


if __name__ == "__main__":
    main()
