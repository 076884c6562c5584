"""`mctl --help` and the groups' help as a new user reads them: every backend named, no command
described by a sentence cut off with "..."."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from mctl.cli.main import cli


def _help(*args: str) -> str:
    result = CliRunner().invoke(cli, [*args, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


def test_the_top_level_help_names_every_backend():
    text = " ".join(_help().split())
    assert "Slurm" in text and "Nomad" in text and "mctl run app.py" in text


@pytest.mark.parametrize("group", [(), ("sandbox",), ("app",)])
def test_command_lists_are_not_cut_off(group):
    commands = _help(*group).split("Commands:", 1)[1]
    cut = [line.strip() for line in commands.splitlines() if line.rstrip().endswith("...")]
    assert not cut, cut


def test_sandbox_list_and_exec_help_say_what_they_take():
    text = " ".join(_help("sandbox", "list").split())
    assert "its name or id" in text and "List the running sandboxes" in text
    assert "exit code 124" in " ".join(_help("sandbox", "exec").split())
