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
