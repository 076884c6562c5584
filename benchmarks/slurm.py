"""The Slurm backend on the development cluster, against the engine's own floor and the local
backend, in one run:

    sudo scripts/slurm-dev up && eval "$(scripts/slurm-dev env)"
    python benchmarks/slurm.py [--calls 300] [--inputs 5000] [--cold 3]

- cold start: no worker -> first result of `.remote`, against the engine's floor: from `sbatch`
  to an empty job's first line running (it connects back to this machine, as a worker does);
- warm `.remote` p50 through a Slurm worker, against the same function on the local backend;
- `.map` throughput with one worker on each of the two nodes.
Prints one table.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mctl

app = mctl.App("bench-slurm")


@app.function(scaledown_window=1)
def echo(x):
    return x


@app.function(cpu=3, min_containers=2, max_containers=2)  # 3 of 4 CPUs: one worker per node
def spread(x):
    return x


def _p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def floor(n: int, host: str) -> float:
    """Median seconds from `sbatch` to the job's first line running: an empty job that opens a
    TCP connection to this machine (what a worker does first), timed at the listener."""
    samples = []
    with socket.create_server((host, 0)) as listener:
        port = listener.getsockname()[1]
        listener.settimeout(120)
        probe = f"python3 -c 'import socket; socket.create_connection((\"{host}\", {port}))'"
        for _ in range(n):
            start = time.perf_counter()
            subprocess.run(["sbatch", "--quiet", "--output", "/dev/null", "--wrap", probe], check=True, timeout=60)
            conn, _ = listener.accept()
            samples.append(time.perf_counter() - start)
            conn.close()
    return statistics.median(samples)


def _containers(url: str, function: str) -> int:
    from mctl.core.transport import urlopen

    body = urlopen(f"{url}/metrics").read().decode()
    match = re.search(r'mctl_containers\{[^}]*function="%s"[^}]*\} (\S+)' % function, body)
    return int(float(match.group(1))) if match else 0


def slurm_rows(host: str, calls: int, inputs: int, colds: int) -> dict[str, float]:
    from mctl.core.runner import deploy_app

    tmp = Path(tempfile.mkdtemp(prefix="mctl-bench-slurm-"))
    with socket.socket() as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    os.environ["MCTL_HOME"] = str(tmp / "home")
    url = f"http://{host}:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mctl", "server", "--host", host, "--port", str(port),
         "--state-dir", str(tmp / "state"), "--scheduler", "slurm",
         "--scheduler-option", f"output_dir={tmp / 'jobs'}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp / "server.log", "wb"))
    try:
        os.environ["MCTL_SERVER_URL"] = url
        for _ in range(100):
            try:
                socket.create_connection((host, port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        deploy_app(app)
        cold = []
        for _ in range(colds):
            deadline = time.monotonic() + 60
            while _containers(url, "echo") and time.monotonic() < deadline:
                time.sleep(0.2)  # scaled to zero after scaledown_window
            time.sleep(1.5)
            start = time.perf_counter()
            echo.remote(0)
            cold.append(time.perf_counter() - start)
        for i in range(50):
            echo.remote(i)
        warm = []
        for i in range(calls):
            start = time.perf_counter()
            echo.remote(i)
            warm.append(time.perf_counter() - start)
        list(spread.map(range(1000)))
        start = time.perf_counter()
        assert list(spread.map(range(inputs))) == list(range(inputs))
        rate = inputs / (time.perf_counter() - start)
        return {"cold": statistics.median(cold), "warm": _p50_ms(warm), "rate": rate}
    finally:
        from mctl.core.client import close_client, run_sync

        run_sync(close_client(url))
        server.terminate()
        server.wait(30)
        os.environ.pop("MCTL_SERVER_URL", None)


def local_warm_p50(calls: int) -> float:
    os.environ["MCTL_HOME"] = tempfile.mkdtemp(prefix="mctl-bench-local-")
    with app.run():
        for i in range(50):
            echo.remote(i)
        samples = []
        for i in range(calls):
            start = time.perf_counter()
            echo.remote(i)
            samples.append(time.perf_counter() - start)
    return _p50_ms(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--inputs", type=int, default=5000)
    parser.add_argument("--cold", type=int, default=3)
    args = parser.parse_args()
    host = os.environ.get("MCTL_SLURM_HOST_ADDR")
    if not host or not os.environ.get("SLURM_CONF"):
        sys.exit("Start the cluster and load its settings first: sudo scripts/slurm-dev up && "
                 'eval "$(scripts/slurm-dev env)"')
    floor_s = floor(args.cold, host)
    slurm = slurm_rows(host, args.calls, args.inputs, args.cold)
    local = local_warm_p50(args.calls)
    print(f"\n{'measure':<44}{'value':>12}")
    print(f"{'floor: sbatch to the job connecting back':<44}{floor_s:>11.2f}s")
    print(f"{'cold start, mctl .remote on Slurm':<44}{slurm['cold']:>11.2f}s")
    print(f"{'  ratio to the floor':<44}{slurm['cold'] / floor_s:>11.2f}x")
    print(f"{'warm .remote p50, Slurm worker':<44}{slurm['warm']:>10.3f}ms")
    print(f"{'warm .remote p50, local backend':<44}{local:>10.3f}ms")
    print(f"{'  ratio to local':<44}{slurm['warm'] / local:>11.2f}x")
    print(f"{'.map inputs/s, one worker on each of 2 nodes':<44}{slurm['rate']:>12,.0f}")
    print(f"\n{args.cold} cold starts (median), {args.calls} warm calls, .map over "
          f"{args.inputs:,} inputs.")


if __name__ == "__main__":
    main()
