"""Messages a new-user trial found unhelpful: each says what was wrong and what to do."""

import pytest

import mctl
from mctl.exception import InvalidError

app = mctl.App("trial-messages")
run_app = mctl.App("trial-embedded")


@run_app.function()
def hello():
    return "hi"


@app.cls()
class WithInit:
    def __init__(self, x):
        self.x = x

    @mctl.method()
    def go(self):
        return self.x


@app.cls()
class NoParams:
    @mctl.method()
    def go(self):
        return 1


def test_a_class_with_its_own_init_is_pointed_to_modal_parameter():
    for call in (lambda: WithInit(3), lambda: WithInit(x=3)):
        with pytest.raises(InvalidError) as info:
            call()
        text = str(info.value)
        assert "__init__(self, x)" in text and "Modal deprecates a custom __init__" in text
        assert "`x: int = modal.parameter()`" in text and "WithInit(x=...)" in text
    with pytest.raises(InvalidError, match=r"it declares none: .*`name: str = modal.parameter\(\)`"):
        NoParams(3)
    with pytest.raises(InvalidError, match=r"its parameters are none \(declare one in the class "
                                           r"body as `y: str = modal.parameter\(\)`\)"):
        NoParams(y=3)


def test_sandbox_keywords_get_a_did_you_mean_as_app_function_does():
    """Refused before anything is asked of a control plane (none runs here)."""
    with pytest.raises(InvalidError, match=r"Sandbox.create\(\) got an unknown keyword 'timout'. "
                                           r"Did you mean 'timeout'\?"):
        mctl.Sandbox.create(app=app, timout=5)
    with pytest.raises(InvalidError, match=r"Sandbox.create\(\) got an unknown keyword 'wrkdir'. "
                                           r"Did you mean 'workdir'\?"):
        mctl.Sandbox.create(wrkdir="/tmp")


def test_the_docs_import_statements_work():
    """docs/guide.md said `from modal.dict import Dict` works; no `modal` package exists."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    statements = set()
    for doc in ("README.md", "docs/guide.md", "docs/architecture.md"):
        text = (root / doc).read_text()
        for m in re.finditer(r"`((?:from [\w.]+ import [\w, ]+|import [\w.]+(?: as \w+)?))`",
                             text):
            stmt = m.group(1)
            if re.match(r"(from|import) modal\b", stmt):  # only as what to write instead
                before, after = text[:m.start()], text[m.end():]
                assert re.search(r"(for|in)\s*$", before) or re.match(
                    r"\s*(becomes|fails)", after), f"{doc}: {before[-80:]}{stmt}{after[:20]}"
            else:
                statements.add(stmt)
    assert "from mctl.dict import Dict" in statements
    for stmt in sorted(statements):
        exec(stmt, {})  # each one the docs name imports


def test_import_modal_says_how_to_alias(tmp_path):
    import subprocess
    import sys

    (tmp_path / "plain_modal.py").write_text("import modal\napp = modal.App()\n")
    out = subprocess.run([sys.executable, "-m", "mctl", "run", str(tmp_path / "plain_modal.py")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "No module named 'modal'" in out.stderr
    assert "installs no `modal` package: write `import mctl as modal`" in out.stderr


def test_cli_says_a_live_mctl_run_has_its_own_control_plane(server_process, monkeypatch):
    """While `mctl run` (here `app.run()`) is live on its embedded control plane, `mctl app list`,
    `sandbox list`, `container list` and `sandbox exec` reach another (or none): they say so."""
    import os

    from click.testing import CliRunner

    from mctl.cli.main import cli

    def cli_says(*args):
        out = CliRunner().invoke(cli, list(args))
        return out.output

    url = os.environ.pop("MCTL_SERVER_URL")
    with run_app.run():
        note = f"A `mctl run` is live (pid {os.getpid()}: app trial-embedded) on its own control"
        monkeypatch.setenv("MCTL_SERVER_URL", url)  # the CLI talks to the background server
        for args in (["app", "list"], ["sandbox", "list"], ["container", "list"],
                     ["sandbox", "exec", "sb-nosuch", "--", "echo", "hi"]):
            text = cli_says(*args)
            assert note in text and "start a server first" in text, (args, text)
        assert "No sandbox 'sb-nosuch'" in cli_says("sandbox", "exec", "sb-nosuch", "--", "true")
        monkeypatch.delenv("MCTL_SERVER_URL")  # no server at all
        assert note in cli_says("sandbox", "list") and note in cli_says("app", "list")
    monkeypatch.setenv("MCTL_SERVER_URL", url)
    assert "live" not in cli_says("app", "list")  # the run ended: its record went with it


COUNTER = '''
import mctl as modal

app = modal.App()
d = modal.Dict.from_name("trial-counter", create_if_missing=True)


@app.function()
def bump():
    d["n"] = d.get("n", 0) + 1
    return d["n"]


@app.local_entrypoint()
def main():
    print("count:", bump.remote(), d["n"])
'''


@pytest.mark.integration
def test_a_named_dict_on_mctl_runs_own_control_plane_says_it_will_go(tmp_path, isolated_home,
                                                                     server_process,
                                                                     monkeypatch):
    """Modal's named Dicts outlive a run; on `mctl run`'s own control plane (no server) they
    cannot: one line says so and how to keep them. On a server, nothing is said."""
    import os
    import subprocess
    import sys

    app_file = tmp_path / "counter.py"
    app_file.write_text(COUNTER)
    note = "mctl: Dict 'trial-counter' lives in this run's own control plane and is gone when"

    def run(env):
        out = subprocess.run([sys.executable, "-m", "mctl", "run", str(app_file)],
                             capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr
        return out

    on_server = run(os.environ)
    assert "count: 1 1" in on_server.stdout and note not in on_server.stderr
    alone = {k: v for k, v in os.environ.items() if k != "MCTL_SERVER_URL"}
    alone["MCTL_HOME"] = str(tmp_path / "another-home")  # no server configured there
    out = run(alone)
    assert "count: 1 1" in out.stdout
    assert out.stderr.count(note) == 1, out.stderr
    assert "start a server (`mctl server start`, or set MCTL_SERVER_URL)" in out.stderr
