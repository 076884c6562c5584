"""A worker killed by a signal (the OOM killer's SIGKILL, a segfault) keeps what it printed just
before: its keeper copies the rest of its output pipe to the output the backend reads, and the
control plane adds the lines the worker never sent, exactly once, before the error."""

import os
import subprocess
import sys

import pytest

from conftest import APPS
from test_images_build import images_dev  # noqa: F401 - the fixture
from test_slurm import slurm_server  # noqa: F401 - the fixture

KILLED = str(APPS / "killed.py")
PRINTED = [*(f"line {i}" for i in range(5)), "on stderr", "last words"]
ON_STDOUT = [line for line in PRINTED if line != "on stderr"]


def mctl_cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "mctl", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or os.environ)


def printed_then_error(out, attempts):
    """Each printed line once per attempt, in order, on the stream it was printed to; the error
    (on stderr) after the stderr lines."""
    both = out.stdout + out.stderr
    assert [line for line in out.stdout.splitlines() if line in PRINTED] == \
        ON_STDOUT * attempts, both
    assert [line for line in out.stderr.splitlines() if line in PRINTED] == \
        ["on stderr"] * attempts, both
    # the last one: the caller's error (each failed attempt is in the logs too)
    error = out.stderr.rindex("was killed by signal 9 (SIGKILL) before it finished")
    assert out.stderr.rindex("on stderr") < error, both


@pytest.mark.integration
@pytest.mark.parametrize("function,attempts", [("once", 1), ("twice", 2)])
def test_output_before_sigkill_reaches_mctl_run_once_per_attempt(function, attempts):
    out = mctl_cli("run", f"{KILLED}::{function}")
    both = out.stdout + out.stderr
    assert out.returncode != 0, both
    printed_then_error(out, attempts)
    assert "out of memory" not in both, both  # no guess: the local backend cannot tell why


# Not yet fixed: a signal between the capture thread's read of a pipe chunk and its copy to the
# original stdout loses that chunk (tens of lines, sometimes); the keeper must become the reader.
_CHUNK_LOSS = pytest.mark.xfail(strict=False, reason="a chunk read but not yet copied when killed")


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["raise", "exit", pytest.param("segv", marks=_CHUNK_LOSS),
                                  pytest.param("kill", marks=_CHUNK_LOSS)])
def test_many_lines_printed_before_any_ending_arrive_in_order_once(kind):
    """20,000 lines printed as fast as a loop can, then an exception, os._exit(3), a segfault or
    SIGKILL: all of them, in order, once, and no dropped-lines notice (nothing was dropped)."""
    import re

    out = mctl_cli("run", str(APPS / "crash_many.py"), "--kind", kind)
    both = out.stdout[-2000:] + out.stderr[-2000:]
    assert out.returncode != 0, both
    numbers = [int(m.group(1)) for m in re.finditer(r"^line (\d+) x+$", out.stdout, re.M)]
    missing = sorted(set(range(20000)) - set(numbers))
    assert numbers == list(range(20000)), (len(numbers), missing[:3], missing[-3:], both)
    assert "unterminated" in out.stdout, both
    assert "dropped" not in out.stderr, both


def test_output_tail_numbers_lines_after_the_marker(tmp_path):
    from mctl.core.runtime.logcapture import OOM_NOTE, marker
    from mctl.core.worker_output import OutputTail

    tail = OutputTail("ta-x", max_lines=3)
    for line in ["Trying to pull image...", marker("ta-x"), "a", "b", "c", "d\n", OOM_NOTE]:
        tail.add(line)
    assert tail.numbered() == [(2, "c"), (3, "d"), (4, OOM_NOTE)]
    assert tail.oom is True
    assert OutputTail("ta-y").numbered() == []  # no marker: nothing can be matched

    # A job's output file: only the end is read; lines before it are counted.
    path = tmp_path / "job.out"
    body = "".join(f"{i:06d}\n" for i in range(100_000))
    path.write_text(f"pulling\n{marker('ta-x')}\n{body}partial")
    tail = OutputTail("ta-x", max_lines=5)
    tail.add_file(path)
    assert tail.numbered() == [(99_996, "099996"), (99_997, "099997"), (99_998, "099998"),
                               (99_999, "099999"), (100_000, "partial")]
    small = tmp_path / "small.out"
    small.write_text(f"{marker('ta-x')}\na\nb\n")
    tail = OutputTail("ta-x")
    tail.add_file(small)
    assert tail.numbered() == [(0, "a"), (1, "b")]
    nomarker = tmp_path / "none.out"
    nomarker.write_text("sbatch: error\n")
    tail = OutputTail("ta-x")
    tail.add_file(nomarker)
    assert tail.numbered() == [] and tail.text() == "sbatch: error"


def test_how_it_ended_with_oom():
    from mctl.core.server.control import _how_it_ended

    assert _how_it_ended(-9, oom=True).startswith(
        "was killed by signal 9 (SIGKILL) before it finished \N{EM DASH} out of memory (")
    assert _how_it_ended(-9) == "was killed by signal 9 (SIGKILL) before it finished"


@pytest.mark.integration
def test_in_a_container_killed_and_oom_killed_workers_keep_their_output(images_dev, monkeypatch):
    for key, value in images_dev.items():
        monkeypatch.setenv(key, value)
    killed_oci = str(APPS / "killed_oci.py")
    out = mctl_cli("run", f"{killed_oci}::twice", timeout=600)
    both = out.stdout + out.stderr
    assert out.returncode != 0, both
    printed_then_error(out, 2)

    out = mctl_cli("run", f"{killed_oci}::hog", timeout=300)
    both = out.stdout + out.stderr
    assert out.returncode != 0, both
    assert out.stdout.count("allocating") == 1, both
    error = out.stderr.rindex("was killed by signal 9 (SIGKILL) before it finished \N{EM DASH} "
                             "out of memory (the kernel's OOM killer ended it)")
    assert out.stderr.index("OOM killer ended this worker") < error, both  # its note: stderr


@pytest.mark.slurm
@pytest.mark.parametrize("slurm_server", ["cli"], indirect=True)
def test_on_slurm_the_job_output_file_gives_what_a_killed_worker_printed(slurm_server, tmp_path):
    # `mctl run` against a remote control plane prints no app logs (only the embedded one
    # does): deploy, call, and read the app's logs.
    out = mctl_cli("deploy", KILLED, timeout=300)
    assert out.returncode == 0, out.stderr
    import mctl

    twice = mctl.Function.from_name("killed", "twice")
    with pytest.raises(mctl.exception.ContainerCrashedError,
                       match=r"killed by signal 9 \(SIGKILL\) before it finished"):
        twice.remote()
    logs = mctl_cli("app", "logs", "killed")
    mctl_cli("app", "stop", "killed")

    def printed(text, wanted):
        rows = [line.split(None, 4) for line in text.splitlines()]  # date time fn task text
        return [(row[3], row[4]) for row in rows if len(row) == 5 and row[4] in wanted]

    tasks = list(dict.fromkeys(task for task, _ in printed(logs.stdout, PRINTED)))
    assert len(tasks) == 2, logs.stdout
    assert printed(logs.stdout, PRINTED) == [
        (task, line) for task in tasks for line in ON_STDOUT], logs.stdout
    assert printed(logs.stderr, PRINTED) == [(task, "on stderr") for task in tasks], logs.stderr


def test_the_control_plane_adds_each_line_once_whichever_way_it_comes(tmp_path):
    """Frames that arrive after the backend's tail (they were in flight when the process died)
    and a tail that repeats lines already sent: every line once, in order."""
    import asyncio

    from mctl.core.runtime.logcapture import marker
    from mctl.core.server.control import Conn, ControlPlane
    from mctl.core.server.store import Store
    from mctl.core.worker_output import OutputTail

    async def main():
        seen = []
        control = ControlPlane(Store(tmp_path / "state"),
                               log_sink=lambda app, task, fn, line, stream: seen.append(line))
        conn = Conn(lambda data: None)
        conn.role, conn.task_id, conn.app_id, conn.function_id = "worker", "ta-k", "ap-x", "fu-f"
        control._task_log(conn)
        control.handle(conn, {"type": "log", "lines": ["a", "b"], "seq": 0}, [])
        tail = OutputTail("ta-k")
        for line in ["pulled", marker("ta-k"), "a", "b", "c", "d", "e"]:
            tail.add(line)
        control.worker_gone("ta-k", -9, tail)
        # in flight when it died: c and d again, then a frame from a dropped-lines burst
        control.handle(conn, {"type": "log", "lines": ["c", "d"], "seq": 2}, [])
        control.handle(conn, {"type": "log", "lines": ["f"], "seq": 5, "dropped": 3}, [])
        return seen

    assert asyncio.run(main()) == ["a", "b", "c", "d", "e",
                                   "mctl: 3 log lines were dropped while this worker could not "
                                   "reach the control plane", "f"]


def test_a_slurm_job_ended_out_of_memory_reports_its_output_and_the_oom(tmp_path):
    """Slurm's OUT_OF_MEMORY state (a cluster that enforces memory with cgroups; the development
    cluster does not) marks the tail, and the job's output file is read from the marker on."""
    import asyncio

    from mctl.core.runtime.logcapture import marker
    from mctl.plugins.scheduler_slurm import Job, SlurmScheduler

    reports = []

    class Events:
        def worker_exited(self, pool_id, worker_id, code, detail, output=None):
            reports.append((worker_id, code, detail, output))

    sched = SlurmScheduler({"output_dir": str(tmp_path)})
    sched.events = Events()
    (tmp_path / "42.out").write_text(f"{marker('ta-j')}\nloading\nallocating\n"
                                     "slurmstepd: error: Detected 1 oom_kill event\n")
    asyncio.run(sched._finished("pool", Job("ta-j", "42"), known=("OUT_OF_MEMORY", -9)))
    (task, code, detail, output), = reports
    assert (task, code, output.oom) == ("ta-j", -9, True)
    assert [line for _, line in output.numbered()] == [
        "loading", "allocating", "slurmstepd: error: Detected 1 oom_kill event"]
    assert detail.startswith("Slurm job 42 ended OUT_OF_MEMORY.\nloading"), detail
