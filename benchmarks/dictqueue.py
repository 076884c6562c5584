"""Dict and Queue operations per second against a `mctl server` process (with its token).

    python benchmarks/dictqueue.py [--ops 2000] [--concurrency 32]

Measures, on small values (a short string key, a ~100-byte value): sequential blocking calls
(`d[k] = v`, `d[k]`, `q.put(v)`, `q.get()`) from one thread, then the same operations with
`--concurrency` `.aio` calls in flight from one event loop; and the wake-up latency of a
blocking `q.get()` after a `q.put()` from another client (p50 over 200 puts).
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
import threading
import time
import urllib.request
from pathlib import Path


def start_server(tmp: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MCTL_HOME=str(tmp / "home"))
    proc = subprocess.Popen([sys.executable, "-m", "mctl", "server", "--port", str(port),
                             "--state-dir", str(tmp / "state")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/healthz", timeout=1).read()
            break
        except OSError:
            time.sleep(0.05)
    os.environ["MCTL_HOME"] = env["MCTL_HOME"]  # the token the server wrote there
    os.environ["MCTL_SERVER_URL"] = url
    return proc, url


def rate(n: int, fn) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def sequential(n: int) -> dict[str, float]:
    import mctl

    d = mctl.Dict.from_name("bench", create_if_missing=True)
    q = mctl.Queue.from_name("bench", create_if_missing=True)
    value = "v" * 100
    d["warm"] = value
    q.put(value)
    q.get()
    return {
        "Dict put": rate(n, lambda: [d.put(f"k{i}", value) for i in range(n)]),
        "Dict get": rate(n, lambda: [d.get(f"k{i}") for i in range(n)]),
        "Queue put": rate(n, lambda: [q.put(value) for _ in range(n)]),
        "Queue get": rate(n, lambda: [q.get() for _ in range(n)]),
    }


def concurrent(n: int, width: int) -> dict[str, float]:
    import mctl

    d = mctl.Dict.from_name("bench-aio", create_if_missing=True)
    q = mctl.Queue.from_name("bench-aio", create_if_missing=True)
    value = "v" * 100

    async def run(make) -> float:
        sem = asyncio.Semaphore(width)

        async def one(i: int) -> None:
            async with sem:
                await make(i)

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - start)

    async def main() -> dict[str, float]:
        await d.put.aio("warm", value)
        return {
            "Dict put": await run(lambda i: d.put.aio(f"k{i}", value)),
            "Dict get": await run(lambda i: d.get.aio(f"k{i}")),
            "Queue put": await run(lambda i: q.put.aio(value)),
            "Queue get": await run(lambda i: q.get.aio()),
        }

    return asyncio.run(main())


def wake_latency(rounds: int = 200) -> float:
    """p50 seconds from a put to the return of a get already blocked on the empty queue."""
    import mctl

    q = mctl.Queue.from_name("bench-wake", create_if_missing=True)
    got = threading.Event()
    latencies = []
    put_at = [0.0]

    def consumer() -> None:
        for _ in range(rounds):
            q.get(timeout=30)
            latencies.append(time.perf_counter() - put_at[0])
            got.set()

    thread = threading.Thread(target=consumer)
    thread.start()
    producer = mctl.Queue.from_name("bench-wake")
    for _ in range(rounds):
        time.sleep(0.005)  # let the consumer's get reach the server and wait there
        got.clear()
        put_at[0] = time.perf_counter()
        producer.put(1)
        got.wait(30)
    thread.join()
    return statistics.median(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mctl-bench-dq-") as tmp:
        proc, url = start_server(Path(tmp))
        try:
            seq = sequential(args.ops)
            conc = concurrent(args.ops, args.concurrency)
            wake = wake_latency()
        finally:
            proc.terminate()
            proc.wait(10)
    print(f"{'operation':<12}{'sequential ops/s':>18}{f'.aio x{args.concurrency} ops/s':>20}")
    for name in seq:
        print(f"{name:<12}{seq[name]:>18,.0f}{conc[name]:>20,.0f}")
    print(f"\nblocking Queue.get woken by a put: p50 {wake * 1000:.2f} ms")
    print(f"{args.ops} operations each, ~100-byte values, one client, server at {url}.")


if __name__ == "__main__":
    main()
