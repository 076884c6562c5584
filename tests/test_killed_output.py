"""A worker killed by a signal (the OOM killer's SIGKILL, a segfault) keeps what it printed just
before: its keeper copies the rest of its output pipe to the output the backend reads, and the
control plane adds the lines the worker never sent, exactly once, before the error."""

import os
import subprocess
import sys

import pytest

from conftest import APPS

KILLED = str(APPS / "killed.py")
PRINTED = [*(f"line {i}" for i in range(5)), "on stderr", "last words"]


def mctl_cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "mctl", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or os.environ)


def printed_then_error(both, attempts):
    """Each printed line once per attempt, in order, all of them before the error."""
    ours = [line for line in both.splitlines() if line in PRINTED]
    assert ours == PRINTED * attempts, both
    error = both.index("was killed by signal 9 (SIGKILL) before it finished")
    assert both.rindex("last words") < error, both


@pytest.mark.integration
@pytest.mark.parametrize("function,attempts", [("once", 1), ("twice", 2)])
def test_output_before_sigkill_reaches_mctl_run_once_per_attempt(function, attempts):
    out = mctl_cli("run", f"{KILLED}::{function}")
    both = out.stdout + out.stderr
    assert out.returncode != 0, both
    printed_then_error(both, attempts)
    assert "out of memory?" in both, both


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
    assert _how_it_ended(-9) == ("was killed by signal 9 (SIGKILL) before it finished "
                                 "\N{EM DASH} out of memory?")
