"""What a function prints to stderr stays stderr: on `mctl run`'s stderr (embedded control plane
and a separate one), in the app's logs (`"stream"` of each row; `mctl app logs` prints stderr
lines to stderr), and in the backend's tail of a killed worker."""

import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest

APP = textwrap.dedent('''
    import sys

    import mctl

    app = mctl.App("streams")


    @app.function()
    def talk(n):
        for i in range(n):
            print(f"out {i}", flush=True)
            print(f"err {i}", file=sys.stderr, flush=True)
        sys.stderr.write("no newline at the end")
        return n


    @app.local_entrypoint()
    def main():
        print("result", talk.remote(3))
''')
OUT = [f"out {i}" for i in range(3)]
ERR = [f"err {i}" for i in range(3)] + ["no newline at the end"]


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mctl", *args], capture_output=True, text=True,
                          timeout=120, env=env or os.environ)


def ours(text, wanted):
    return [line for line in text.splitlines() if line in wanted]


def assert_separated(out):
    assert out.returncode == 0, out.stdout + out.stderr
    # Each once, in order. (Against a separate control plane the lines arrive by long poll and
    # may be printed in the middle of the entrypoint's own print: "result 3" is matched alone.)
    text = out.stdout.replace("result 3", "\n")
    assert ours(text, OUT) == OUT, repr(out.stdout) + repr(out.stderr)
    assert "result 3" in out.stdout
    assert ours(out.stdout, ERR) == [], out.stdout
    assert ours(out.stderr, ERR) == ERR, out.stderr
    assert ours(out.stderr, OUT) == [], out.stderr


@pytest.mark.integration
def test_embedded_mctl_run_prints_stderr_lines_on_stderr(tmp_path):
    app = tmp_path / "streams_app.py"
    app.write_text(APP)
    assert_separated(run("run", str(app)))


@pytest.mark.integration
def test_separate_server_run_and_app_logs_keep_the_stream(server_process, tmp_path):
    app = tmp_path / "streams_app.py"
    app.write_text(APP)
    assert_separated(run("run", str(app)))

    deployed = run("deploy", str(app))
    assert deployed.returncode == 0, deployed.stderr
    import mctl

    assert mctl.Function.from_name("streams", "talk").remote(3) == 3
    logs = run("app", "logs", "streams")
    assert logs.returncode == 0, logs.stderr
    assert ours_suffix(logs.stdout, OUT) == OUT, logs.stdout
    assert ours_suffix(logs.stderr, ERR) == ERR, logs.stderr
    only_err = run("app", "logs", "streams", "--stream", "stderr")
    assert ours_suffix(only_err.stderr, ERR) == ERR and ours_suffix(only_err.stdout, OUT) == []
    import json
    import urllib.request

    request = urllib.request.Request(f"{server_process.url}/api/apps/streams/logs", headers={
        "Authorization": f"Bearer {server_process.token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        rows = json.load(response)
    streams = {row["line"]: row["stream"] for row in rows}
    assert all(streams[line] == "stdout" for line in OUT), rows
    assert all(streams[line] == "stderr" for line in ERR), rows
    run("app", "stop", "streams")


def ours_suffix(text, wanted):
    """Lines of `mctl app logs` (date time function task text) whose text is wanted."""
    rows = [line.split(None, 4) for line in text.splitlines()]
    return [row[4] for row in rows if len(row) == 5 and row[4] in wanted]


def test_log_frames_and_the_tail_carry_the_stream(tmp_path):
    """The control plane stores the stream of each line, from frames (the `stderr` indexes, also
    past lines it had already) and from the tail of a killed worker (tagged lines)."""
    import asyncio

    from mctl.core.runtime.logcapture import STDERR_TAG, marker
    from mctl.core.server.control import Conn, ControlPlane
    from mctl.core.server.store import Store
    from mctl.core.worker_output import OutputTail

    async def main():
        seen = []
        control = ControlPlane(Store(tmp_path / "state"),
                               log_sink=lambda app, task, fn, line, stream: seen.append(
                                   (line, stream)))
        conn = Conn(lambda data: None)
        conn.role, conn.task_id, conn.app_id, conn.function_id = "worker", "ta-k", "ap-x", "fu-f"
        control._task_log(conn)
        control.handle(conn, {"type": "log", "lines": ["a", "b"], "seq": 0, "stderr": [1]}, [])
        tail = OutputTail("ta-k")
        for line in [marker("ta-k"), "a", STDERR_TAG + "b", "c", STDERR_TAG + "d"]:
            tail.add(line)
        control.worker_gone("ta-k", -9, tail)
        # in flight when it died: the frame repeats c and d, then e (stderr)
        control.handle(conn, {"type": "log", "lines": ["c", "d", "e"], "seq": 2,
                              "stderr": [1, 2]}, [])
        control.store.commit()
        return seen, control.store.logs("ap-x")

    seen, rows = asyncio.run(main())
    assert seen == [("a", "stdout"), ("b", "stderr"), ("c", "stdout"), ("d", "stderr"),
                    ("e", "stderr")]
    assert [(r[4], r[5]) for r in rows if r[2] == "ta-k"] == seen


def test_migration_gives_old_log_lines_stdout(tmp_path):
    from mctl.core.server import store as store_module

    path = tmp_path / "state"
    path.mkdir()
    db = sqlite3.connect(path / "state.db")
    before = next(i for i, step in enumerate(store_module.MIGRATIONS)
                  if "ADD COLUMN stream" in step)  # the version before the step
    for step in store_module.MIGRATIONS[:before]:
        db.executescript(step)
    db.execute(f"PRAGMA user_version = {before}")
    db.execute("INSERT INTO logs (app_id, ts, task_id, function, line) "
               "VALUES ('ap-old', 1.0, 'ta-1', 'f', 'from before')")
    db.commit()
    db.close()
    store = store_module.Store(path)
    assert store.logs("ap-old")[0][4:] == ("from before", "stdout")
