"""Sandbox start-up: `Sandbox.create` → the first `exec`'s output, for gVisor and runc in one run.

    python benchmarks/sandbox.py [--n 50] [--warm 1] [--isolation gvisor,runc]
    python benchmarks/sandbox.py --warm 0 --isolation runc,runc-network,runc-allowlist,bwrap

`runc-network`: runc with `block_network=False` (podman's bridge); `runc-allowlist`: runc with
`cidr_allowlist=["10.0.0.0/8"]` (created, initialised, firewalled, then started); `bwrap`: an
image-less bubblewrap sandbox (no warm pool for these three).

For each isolation: `--n` sandboxes one after another, each timed from `Sandbox.create(app=app,
isolation=...)` to the first line of `sb.exec("echo", "ready").stdout` (then terminated, not
timed). Reports p50, p95 and max in seconds. The control plane runs in this process
(`app.run()`), as `mctl run` does. `--warm N` keeps N pre-started containers of the default shape
per isolation (MCTL_SANDBOX_WARM; 0: every sandbox starts cold); `--cold` measures both.

Anchors (a public 2026 comparison, create → first command): Modal p50 2.66 s / p95 11.8 s,
E2B 0.44 s, Daytona 0.11 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def measure(app, isolation: str, n: int) -> list[float]:
    import mctl

    times = []
    for _ in range(n):
        started = time.perf_counter()
        if isolation == "runc-network":
            sb = mctl.Sandbox.create(app=app, isolation="runc", block_network=False)
        elif isolation == "runc-allowlist":
            sb = mctl.Sandbox.create(app=app, isolation="runc", cidr_allowlist=["10.0.0.0/8"])
        else:
            sb = mctl.Sandbox.create(app=app, isolation=isolation)
        line = next(iter(sb.exec("echo", "ready").stdout))
        times.append(time.perf_counter() - started)
        assert line == "ready\n", line
        sb.terminate()
        time.sleep(0.3)  # as a caller thinking between sandboxes; lets the pool refill
    return times


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--warm", type=int, default=1)
    parser.add_argument("--cold", action="store_true", help="also measure with no warm pool")
    parser.add_argument("--isolation", default="gvisor,runc")
    args = parser.parse_args()
    import mctl

    modes = [args.warm] + ([0] if args.cold and args.warm else [])
    print(f"{'isolation':<14} {'warm':>4} {'n':>4} {'p50 s':>7} {'p95 s':>7} {'max s':>7}")
    for warm in modes:
        os.environ["MCTL_SANDBOX_WARM"] = str(warm)
        app = mctl.App("bench-sandbox")
        with app.run():
            for isolation in args.isolation.split(","):
                if warm and isolation in ("gvisor", "runc"):  # the first starts the pool
                    mctl.Sandbox.create(app=app, isolation=isolation).terminate()
                    time.sleep(1.0)
                t = measure(app, isolation, args.n)
                print(f"{isolation:<14} {warm:>4} {len(t):>4} {statistics.median(t):>7.3f} "
                      f"{pct(t, 0.95):>7.3f} {max(t):>7.3f}", flush=True)


if __name__ == "__main__":
    main()
