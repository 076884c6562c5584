"""HTTP through mctl's gateway to a warm `@fastapi_endpoint` vs the same FastAPI app served
directly by uvicorn, in one run: requests/s and p50 latency.

    cd benchmarks && python web.py      # --seconds 10 --concurrency 32 --rounds 5

The gateway side is a real `mctl server` subprocess with one warm worker (min_containers=1,
@concurrent(max_inputs=64)); the direct side is `uvicorn web:direct_app` in a subprocess. The
load generator (aiohttp, this process) is the same for both.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import mctl

app = mctl.App("bench-web")


async def ping(x: int = 0) -> dict:
    return {"x": x}


endpoint = app.function(min_containers=1)(mctl.concurrent(max_inputs=64)(
    mctl.fastapi_endpoint()(ping)))


def _direct() -> object:
    from fastapi import FastAPI

    api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    api.add_api_route("/", ping, methods=["GET"])
    return api


direct_app = _direct() if os.environ.get("MCTL_BENCH_DIRECT") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:g}s")


async def _load(url: str, seconds: float, concurrency: int) -> tuple[float, list[float]]:
    import aiohttp

    latencies: list[float] = []
    stop = time.monotonic() + seconds

    async def one(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop:
            start = time.perf_counter()
            async with session.get(url, params={"x": "1"}) as resp:
                await resp.read()
                assert resp.status == 200, resp.status
            latencies.append(time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(50):  # warm-up
            async with session.get(url) as resp:
                await resp.read()
        begin = time.monotonic()
        await asyncio.gather(*(one(session) for _ in range(concurrency)))
        elapsed = time.monotonic() - begin
    return elapsed, latencies


def _summary(runs: list[tuple[float, list[float]]]) -> tuple[float, float, float]:
    """requests/s, p50 ms, p99 ms over several rounds."""
    elapsed = sum(e for e, _ in runs)
    latencies = sorted(x for _, lat in runs for x in lat)
    return (len(latencies) / elapsed, statistics.median(latencies) * 1000,
            latencies[int(len(latencies) * 0.99)] * 1000)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternate the two sides this many times (a busy machine drifts)")
    args = parser.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory(prefix="mctl-bench-web-") as tmp:
        env = dict(os.environ, MCTL_HOME=tmp, MCTL_LOG_LEVEL="WARNING")
        os.environ.update(MCTL_HOME=tmp)
        port, direct_port = _free_port(), _free_port()
        procs = [subprocess.Popen([sys.executable, "-m", "mctl", "server", "--port", str(port),
                                   "--state-dir", os.path.join(tmp, "state")], env=env,
                                  stderr=subprocess.DEVNULL),
                 subprocess.Popen([sys.executable, "-m", "uvicorn", "web:direct_app", "--port",
                                   str(direct_port), "--log-level", "warning", "--no-access-log"],
                                  cwd=here, env=dict(env, MCTL_BENCH_DIRECT="1"))]
        try:
            server = f"http://127.0.0.1:{port}"
            _wait(server + "/healthz")
            os.environ["MCTL_SERVER_URL"] = server
            direct = f"http://127.0.0.1:{direct_port}/"
            _wait(direct)
            with app.run():
                url = endpoint.get_web_url()
                _wait(url, 60)
                gateway_runs, direct_runs = [], []
                share = args.seconds / args.rounds
                for _ in range(args.rounds):
                    gateway_runs.append(asyncio.run(_load(url, share, args.concurrency)))
                    direct_runs.append(asyncio.run(_load(direct, share, args.concurrency)))
                rows = [("mctl gateway -> worker", _summary(gateway_runs)),
                        ("uvicorn direct", _summary(direct_runs))]
            from mctl.core.client import close_client, run_sync

            run_sync(close_client(server))  # before the server goes: no reconnect notice
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(10)
    print(f"{'path':<24}{'requests/s':>12}{'p50 ms':>10}{'p99 ms':>10}")
    for name, (rps, p50, p99) in rows:
        print(f"{name:<24}{rps:>12,.0f}{p50:>10.2f}{p99:>10.2f}")
    ratio = rows[0][1][0] / rows[1][1][0]
    print(f"\n{args.concurrency} concurrent clients, {args.seconds:g} s each in {args.rounds} "
          f"alternating rounds; gateway throughput is {ratio:.0%} of direct.")


if __name__ == "__main__":
    main()
