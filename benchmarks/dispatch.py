"""Dispatch latency and throughput: mctl's local backend against ProcessPoolExecutor, Ray, Dask.

    pip install -e '.[bench]' && python benchmarks/dispatch.py [--calls 1000] [--inputs 20000]

Each peer gets 2 worker processes. Measured in one run on the same machine: sequential `.remote`
round-trip p50/p99 over --calls calls (after a warm-up), and `.map` throughput over --inputs tiny
inputs. Prints one table; peers that are not installed are skipped with a note.

"mctl (local)" is `mctl run`'s embedded control plane, in the caller's process. "mctl (tokens)" runs
the same app against a separate `mctl server` process over HTTP with a bearer token, and
"mctl (tokens+TLS)" against one serving HTTPS with a self-signed certificate (needs the
`cryptography` package).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import mctl

app = mctl.App("bench-dispatch")


@app.function(min_containers=2, max_containers=2)
def echo(x):
    return x


def tiny(x):
    return x


def _percentiles(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    p50 = statistics.median(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return p50 * 1000, p99 * 1000


def _timed_calls(call, n: int) -> list[float]:
    for i in range(50):
        call(i)
    out = []
    for i in range(n):
        start = time.perf_counter()
        call(i)
        out.append(time.perf_counter() - start)
    return out


def bench_mctl(calls: int, inputs: int) -> tuple[float, float, float]:
    with app.run():
        list(echo.map(range(2000)))  # warm both workers
        p50, p99 = _percentiles(_timed_calls(echo.remote, calls))
        start = time.perf_counter()
        out = list(echo.map(range(inputs)))
        rate = inputs / (time.perf_counter() - start)
        assert out == list(range(inputs))
    return p50, p99, rate


def _self_signed(directory: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mctl bench")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@contextlib.contextmanager
def _server(tls: bool) -> Iterator[None]:
    """A `mctl server` subprocess that this process talks to with the token it writes."""
    import socket

    from mctl.core.transport import urlopen

    tmp = Path(tempfile.mkdtemp(prefix="mctl-bench-"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    overrides = {"MCTL_HOME": str(tmp / "home")}
    args = []
    if tls:
        cert, key = _self_signed(tmp)
        args = ["--tls-cert", str(cert), "--tls-key", str(key)]
        overrides["MCTL_CA_FILE"] = str(cert)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    old = {k: os.environ.get(k) for k in (*overrides, "MCTL_SERVER_URL", "MCTL_TOKEN")}
    os.environ.update(overrides)
    os.environ.pop("MCTL_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "mctl", "server", "--port", str(port),
                             "--state-dir", str(tmp / "state"), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                urlopen(f"{url}/healthz", timeout=1).read()
                break
            except OSError:
                time.sleep(0.05)
        os.environ["MCTL_SERVER_URL"] = url
        yield
    finally:
        from mctl.core.client import close_client, run_sync

        run_sync(close_client(url))
        proc.terminate()
        proc.wait(10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def bench_mctl_tokens(calls: int, inputs: int) -> tuple[float, float, float]:
    with _server(tls=False):
        return bench_mctl(calls, inputs)


def bench_mctl_tls(calls: int, inputs: int) -> tuple[float, float, float]:
    with _server(tls=True):
        return bench_mctl(calls, inputs)


def bench_process_pool(calls: int, inputs: int) -> tuple[float, float, float]:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2) as pool:
        list(pool.map(tiny, range(1000)))
        p50, p99 = _percentiles(_timed_calls(lambda i: pool.submit(tiny, i).result(), calls))
        start = time.perf_counter()
        out = list(pool.map(tiny, range(inputs)))
        rate = inputs / (time.perf_counter() - start)
        assert out == list(range(inputs))
    return p50, p99, rate


def bench_ray(calls: int, inputs: int) -> tuple[float, float, float]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        remote_tiny = ray.remote(tiny)
        ray.get([remote_tiny.remote(i) for i in range(1000)])
        p50, p99 = _percentiles(_timed_calls(lambda i: ray.get(remote_tiny.remote(i)), calls))
        start = time.perf_counter()
        out = ray.get([remote_tiny.remote(i) for i in range(inputs)])
        rate = inputs / (time.perf_counter() - start)
        assert out == list(range(inputs))
    finally:
        ray.shutdown()
    return p50, p99, rate


def bench_dask(calls: int, inputs: int) -> tuple[float, float, float]:
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.gather(client.map(tiny, range(500), pure=False))
        p50, p99 = _percentiles(_timed_calls(lambda i: client.submit(tiny, i, pure=False).result(),
                                             calls))
        start = time.perf_counter()
        out = client.gather(client.map(tiny, range(inputs), pure=False))
        rate = inputs / (time.perf_counter() - start)
        assert out == list(range(inputs))
    return p50, p99, rate


PEERS = {
    "mctl (local)": bench_mctl,
    "mctl (tokens)": bench_mctl_tokens,
    "mctl (tokens+TLS)": bench_mctl_tls,
    "ProcessPoolExecutor": bench_process_pool,
    "Ray": bench_ray,
    "Dask": bench_dask,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--inputs", type=int, default=20_000)
    parser.add_argument("--only", nargs="*", help="Run only these peers.")
    args = parser.parse_args()
    rows = []
    for name, bench in PEERS.items():
        if args.only and not any(o.lower() in name.lower() for o in args.only):
            continue
        try:
            rows.append((name, *bench(args.calls, args.inputs)))
        except ImportError as exc:
            print(f"skipping {name}: {exc}")
    print(f"\n{'peer':<22} {'.remote p50 ms':>15} {'.remote p99 ms':>15} {'.map inputs/s':>14}")
    for name, p50, p99, rate in rows:
        print(f"{name:<22} {p50:>15.3f} {p99:>15.3f} {rate:>14,.0f}")
    print(f"\n{args.calls} sequential calls; .map over {args.inputs:,} inputs; 2 workers each.")


if __name__ == "__main__":
    main()
