"""`mctl run` against a separate control plane (a shared server, a cluster's) prints what the
functions print, as it does with its embedded control plane."""

import os
import subprocess
import sys
import textwrap

APP = textwrap.dedent('''
    import mctl

    app = mctl.App()


    @app.function()
    def square(x):
        print(f"squaring {x}", flush=True)
        return x * x


    @app.local_entrypoint()
    def main():
        print("total", sum(square.map(range(3))))
''')


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mctl", *args], capture_output=True, text=True,
                          timeout=120, env=env or os.environ)


def test_mctl_run_on_a_separate_server_prints_function_output(server_process, tmp_path):
    app = tmp_path / "squares.py"
    app.write_text(APP)
    out = run("run", str(app))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "total 5" in lines
    for x in range(3):  # each once (the follower's last page does not repeat lines)
        assert lines.count(f"squaring {x}") == 1, out.stdout


def test_mctl_run_detach_prints_function_output_while_it_runs(server_process, tmp_path):
    """`--detach` keeps the app after the command; what its functions print during the command
    is shown all the same (Modal's `run --detach` streams too)."""
    app = tmp_path / "squares.py"
    app.write_text(APP)
    out = run("run", "--detach", str(app))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "total 5" in lines and "mctl: detached: app" in out.stderr
    for x in range(3):
        assert lines.count(f"squaring {x}") == 1, out.stdout
    app_id = out.stderr.split("mctl: detached: app ", 1)[1].split()[0]
    row = [line.split() for line in run("app", "list").stdout.splitlines()
           if line.startswith(app_id)]
    assert row and row[0][3] == "running", row  # still there: detached
    run("app", "stop", app_id)
