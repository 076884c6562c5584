"""Volume commit and reload with the `store` driver, against `rsync` of the same data, in one run.

    python benchmarks/volumes.py [--size-mib 1024] [--small-kib 64]

Two volumes of `--size-mib` each: one big file, and many small files of `--small-kib`. For each,
a working copy (the code a worker runs, `mctl.core.volume_sync.WorkingCopy`) talks HTTP to a real
`mctl server` process on this machine:

- full commit: every byte goes up to the control plane's store; full reload: a second, empty
  copy fetches everything;
- then one 1 MiB file is changed, committed by the first copy and reloaded by the second;
- for the big volume also 1 MiB changed inside the big file (whole files travel: all of it).

The floor is `rsync -a` of the same directories on the same disk (a local rsync copies whole
files, like mctl): a full copy, then the same change copied again. Bytes are what each moved:
for mctl the file contents sent or received (HTTP framing aside), for rsync its "Total
transferred file size". Needs `rsync` (Debian: `apt-get install rsync`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

MIB = 1 << 20


def start_server(tmp: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MCTL_HOME=str(tmp / "home"), MCTL_VOLUME_DRIVER="store")
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


def fill_big(root: Path, size: int) -> None:
    with open(root / "big.bin", "wb") as fh:
        for _ in range(size // MIB):
            fh.write(os.urandom(MIB))


def fill_small(root: Path, size: int, each: int) -> None:
    for i in range(size // each):
        sub = root / f"d{i // 1000:03d}"
        if i % 1000 == 0:
            sub.mkdir()
        (sub / f"f{i:06d}.bin").write_bytes(os.urandom(each))


def rsync(src: Path, dst: Path) -> tuple[float, float, int]:
    """rsync's time, its time including a `sync` (mctl's commit makes its data durable), and
    the bytes it transferred."""
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    out = subprocess.run(["rsync", "-a", "--stats", f"{src}/", f"{dst}/"], check=True,
                         capture_output=True, text=True).stdout
    took = time.perf_counter() - start
    subprocess.run(["sync"], check=True)
    durable = time.perf_counter() - start
    moved = int(re.search(r"Total transferred file size: ([\d,]+)", out).group(1).replace(",", ""))
    return took, durable, moved


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_case(url: str, tmp: Path, label: str, fill, change_inside: bool) -> list[tuple]:
    from mctl.core.volume_sync import WorkingCopy
    from mctl.sdk.volume import create_volume

    name = label.split()[0]
    create_volume(name)
    a_dir, b_dir, r_dir = tmp / f"{name}-a", tmp / f"{name}-b", tmp / f"{name}-rsync"
    for d in (a_dir, b_dir, r_dir):
        d.mkdir()
    fill(a_dir)
    subprocess.run(["sync"], check=True)
    a = WorkingCopy(url, name, "/data", str(a_dir), False)
    b = WorkingCopy(url, name, "/data", str(b_dir), False)
    rows = []

    def measure(case: str) -> None:
        up, down = a.moved["up"], b.moved["down"]
        subprocess.run(["sync"], check=True)  # each timing starts with nothing dirty
        commit_s = timed(a.commit)
        reload_s = timed(b.reload)
        rsync_s, durable_s, rsync_bytes = rsync(a_dir, r_dir)
        rows.append((f"{label}: {case}", commit_s, a.moved["up"] - up, reload_s,
                     b.moved["down"] - down, rsync_s, durable_s, rsync_bytes))

    measure("full")
    (a_dir / "changed.bin").write_bytes(os.urandom(MIB))
    measure("1 new 1 MiB file")
    (a_dir / "changed.bin").write_bytes(os.urandom(MIB))
    later = time.time() + 2  # rsync's quick check compares whole seconds: make it see the change
    os.utime(a_dir / "changed.bin", (later, later))
    measure("1 MiB file changed")
    if change_inside:
        with open(a_dir / "big.bin", "r+b") as fh:
            fh.seek(fh.seek(0, 2) // 2)
            fh.write(os.urandom(MIB))
        measure("1 MiB changed in big.bin")
    for d in (a_dir, b_dir, r_dir):
        shutil.rmtree(d)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--small-kib", type=int, default=64)
    args = parser.parse_args()
    if not shutil.which("rsync"):
        sys.exit("rsync is not installed; install it (Debian: apt-get install rsync).")
    size, each = args.size_mib * MIB, args.small_kib * 1024
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as raw:
        tmp = Path(raw)
        proc, url = start_server(tmp)
        try:
            rows = run_case(url, tmp, f"big 1 x {args.size_mib} MiB",
                            lambda d: fill_big(d, size), True)
            rows += run_case(url, tmp, f"small {size // each:,} x {args.small_kib} KiB",
                             lambda d: fill_small(d, size, each), False)
        finally:
            proc.terminate()
            proc.wait(10)
    head = ("case", "commit s", "up MiB", "reload s", "down MiB", "rsync s", "+sync s",
            "rsync MiB")
    print(f"{head[0]:<44}" + "".join(f"{h:>10}" for h in head[1:]))
    for case, c_s, up, r_s, down, rs_s, du_s, rs_b in rows:
        print(f"{case:<44}{c_s:>10.2f}{up / MIB:>10.1f}{r_s:>10.2f}{down / MIB:>10.1f}"
              f"{rs_s:>10.2f}{du_s:>10.2f}{rs_b / MIB:>10.1f}")
    print(f"\nstore driver over HTTP on 127.0.0.1 vs local rsync -a (+sync: until its data is on "
          f"disk, as a commit's is); {os.cpu_count()} cores.")


if __name__ == "__main__":
    main()
