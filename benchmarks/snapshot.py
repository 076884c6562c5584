"""`sb.snapshot_filesystem()` for gVisor and runc, and `podman commit` of the same runc
container (what an operator would run by hand; it cannot see gVisor's writes and keeps the user
namespace's host owners, see core/sandbox_snapshot.py), in one run.

    python benchmarks/snapshot.py [--n 5] [--files 200]

Each round: a sandbox on the default image writes `--files` small files under /tmp/work and
deletes a file of its image's /tmp (made by an earlier snapshot), then the snapshot is timed.
Reports p50 and max in seconds. The control plane runs in this process (`app.run()`).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

WRITE = ("import os; os.makedirs('/tmp/work', exist_ok=True)\n"
         "for i in range({n}): open(f'/tmp/work/f{{i}}.txt', 'w').write('x' * 100)\n"
         "os.path.exists('/tmp/base.txt') and os.remove('/tmp/base.txt')\n")


def _base(app, isolation: str):
    """An image with /tmp/base.txt, for the rounds to delete."""
    import mctl

    sb = mctl.Sandbox.create(app=app, isolation=isolation)
    sb.exec("python3", "-c", "open('/tmp/base.txt', 'w').write('base')").wait()
    image = sb.snapshot_filesystem()
    sb.terminate()
    return image


def measure(app, isolation: str, n: int, files: int, commit: bool = False) -> list[float]:
    import mctl

    base = _base(app, isolation)
    times = []
    for i in range(n):
        sb = mctl.Sandbox.create(app=app, isolation=isolation, image=base)
        p = sb.exec("python3", "-c", WRITE.format(n=files))
        assert p.wait() == 0, p.stderr.read()
        started = time.perf_counter()
        if commit:
            tag = f"localhost/mctl/bench-commit:{i}"
            subprocess.run(["podman", "commit", "-q", sb._record["container"], tag],
                           check=True, capture_output=True)
            times.append(time.perf_counter() - started)
            subprocess.run(["podman", "rmi", "-f", tag], capture_output=True)
        else:
            image = sb.snapshot_filesystem()
            times.append(time.perf_counter() - started)
            subprocess.run(["podman", "rmi", "-f", image.base["tag"]], capture_output=True)
        sb.terminate()
    subprocess.run(["podman", "rmi", "-f", base.base["tag"]], capture_output=True)
    return times


def main() -> None:
    import mctl

    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--files", type=int, default=200)
    args = parser.parse_args()
    app = mctl.App("bench-snapshot")
    rows = []
    with app.run():
        for label, isolation, commit in (("snapshot_filesystem, gVisor", "gvisor", False),
                                         ("snapshot_filesystem, runc", "runc", False),
                                         ("podman commit, runc", "runc", True)):
            t = measure(app, isolation, args.n, args.files, commit)
            rows.append((label, statistics.median(t), max(t)))
    print(f"\n{args.n} rounds, {args.files} files written and one deleted per round\n")
    print(f"| {'what':<30} | p50 (s) | max (s) |")
    print(f"|{'-' * 32}|---------|---------|")
    for label, p50, worst in rows:
        print(f"| {label:<30} | {p50:7.2f} | {worst:7.2f} |")


if __name__ == "__main__":
    main()
