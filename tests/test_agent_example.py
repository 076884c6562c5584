"""The reference's coding agent (examples/agent/agent.py), end to end with the stand-in model:
`mctl run` → a function writes the code → a Sandbox (gVisor) runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_sandbox import _needs_podman  # noqa: F401 - autouse: podman, runsc, the base

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_agent_solves_factorial_in_a_sandbox():
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    done = subprocess.run([sys.executable, "-m", "mctl", "run", str(ROOT / "examples/agent/agent.py"),
                           "--task", "Create a function that calculates the factorial of a number"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "model: stand-in, tries: 1, sandbox: gvisor" in done.stdout
    assert "factorial(10) = 3628800" in done.stdout


@pytest.mark.slow
def test_agent_gives_up_after_three_tries_on_an_unknown_task():
    done = subprocess.run([sys.executable, "-m", "mctl", "run", str(ROOT / "examples/agent/agent.py"),
                           "--task", "sort a list"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "tries: 3" in done.stdout and "only knows: factorial" in done.stdout
