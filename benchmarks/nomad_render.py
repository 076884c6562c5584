"""Render and contract-check the Nomad jobs of an app with 1,000 functions (target: under 10 s).

    python benchmarks/nomad_render.py [--functions 1000]

Writes a generated app (a mix of plain, GPU, scheduled, secret and volume functions), compiles
it, renders every job (`nomad_render.render_app`) and passes them all through
tools/nomad-jobcheck in one process. The checker is built first (cached by source hash) and its
build is not timed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FEATURES = [
    "@app.function()",
    "@app.function(gpu='A100:2', cpu=4, memory=8192, min_containers=1, max_containers=10)",
    "@app.function(schedule=mctl.Cron('*/5 * * * *', timezone='Europe/Berlin'))",
    "@app.function(schedule=mctl.Period(hours=1))",
    "@app.function(secrets=[keys], volumes={'/data': data}, retries=3, timeout=600)",
]


def write_app(directory: Path, n: int) -> Path:
    lines = ["import mctl", "app = mctl.App('bench-nomad')",
             "keys = mctl.Secret.from_name('api-keys')",
             "data = mctl.Volume.from_name('data', create_if_missing=True)", ""]
    for i in range(n):
        lines += [FEATURES[i % len(FEATURES)], f"def f{i}(x=None):", "    return x", ""]
    path = directory / "bench_nomad_app.py"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--functions", type=int, default=1000)
    args = parser.parse_args()
    checker = subprocess.run([str(ROOT / "tools" / "nomad-jobcheck" / "build")], check=True,
                             capture_output=True, text=True).stdout.strip()
    from mctl.cli.main import import_app_file
    from mctl.core.compile import compile_app
    from mctl.core.server.control import deployed_app_id
    from mctl.plugins.nomad_render import NomadOptions, render_app

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        _, app, _ = import_app_file(str(write_app(Path(tmp), args.functions)))
        app_id = deployed_app_id(app.name)
        spec, _ = compile_app(app, app_id, app.name)
        compiled = time.perf_counter()
        jobs = render_app(spec, app_id, NomadOptions.parse({"datacenters": "dc1"}))
        data = "".join(json.dumps(job) + "\n" for job in jobs)
        rendered = time.perf_counter()
        done = subprocess.run([checker, "-q"], input=data, capture_output=True, text=True)
        checked = time.perf_counter()
    if done.returncode != 0:
        sys.exit(f"the checker rejected jobs:\n{done.stdout[-2000:]}")
    total = checked - start
    print(f"functions {args.functions}, jobs {len(jobs)} ({len(data) / 1e6:.1f} MB JSON)")
    print(f"import+compile {compiled - start:.2f} s, render {rendered - compiled:.2f} s, "
          f"check {checked - rendered:.2f} s, total {total:.2f} s "
          f"({'under' if total < 10 else 'OVER'} the 10 s target)")
    print(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
