"""Every code example of the Modal reference the project started from (tests/seed/, a copy of
../shared/seed/modal-reference.txt), read from that file and run as written with only the import
changed (`import mctl as modal`), against a real control plane and real workers.

Fragments that use a name defined elsewhere on the page (`app`, `my_function`, `input_list`,
`my_app`, `asyncio`) get that name from a small prelude, as the page's reader would. Examples
that need what a test machine lacks (a GPU, a public registry, LangChain and an OpenAI key) are
defined and checked, not called; the sandbox example runs in a Sandbox (needs podman)."""

import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import mctl
from conftest import ROOT

pytestmark = pytest.mark.integration

SEED = ROOT / "tests" / "seed" / "modal-reference.txt"
SHARED = ROOT.parent / "shared" / "seed" / "modal-reference.txt"


def blocks(lang):
    text = SEED.read_text()
    found = [textwrap.dedent(b) for lg, b in re.findall(r"```(\w+)\n(.*?)```", text, re.S)
             if lg == lang]
    return found


def as_mctl(code):
    return (code.replace("import modal\n", "import mctl as modal\n")
            .replace("from modal import", "from mctl import"))


PRELUDE = """\
import asyncio
import mctl as modal

app = modal.App("seed")
my_app = app
input_list = [1, 2, 3]

"""
# "Batch Processing" maps a `my_function` of one argument; the page's other `my_function`
# ("Environment Variables") takes none, so this one lives in its own app.
MAP_PRELUDE = PRELUDE + """

@app.function()
def my_function(x):
    return 2 * x
"""


def matches(marker, block):
    """A marker is a piece of one example's text, or `==` and the whole example."""
    return block == marker[2:] if marker.startswith("==") else marker in block


def find(code_blocks, marker):
    (block,) = [b for b in code_blocks if matches(marker, b)]
    return block


def write_module(tmp_path, name, body):
    path = tmp_path / f"{name}.py"
    path.write_text(body)
    return path


def load(path):
    from mctl.cli.main import import_app_file

    module, app, _ = import_app_file(str(path))
    return module, app


def mctl_cli(*args, check=True):
    out = subprocess.run([sys.executable, "-m", "mctl", *args], capture_output=True, text=True,
                         timeout=300, env=os.environ)
    if check:
        assert out.returncode == 0, f"mctl {' '.join(args)}: {out.stdout}\n{out.stderr}"
    return out


RUNNABLE = ["def hello(name)", 'Secret.from_name("my-env-vars")', "def get_env_info",
            "def secure_function", "concurrency_limit=10", "async def batched_multiply",
            "schedule=modal.Period(days=1)", "async def async_task", "class MyClass",
            "def hello_web"]
DEFINITIONS = ["==import modal\n\napp = modal.App()\n", 'pip_install("numpy")', "Mount.from_local_dir",
               '==secret = modal.Secret.from_name("my-api-key")\n', "Volume.from_name",
               "def gpu_function", "your-docker-image:tag", "from_dockerfile",
               "us-east1-docker.pkg.dev", "def gpu_task"]
OTHERS = ["my_function.map(input_list)", "==sandbox = modal.Sandbox.create(app=my_app)\n", "from langgraph.graph",
          "deploy_app(app"]


def test_the_copy_is_the_reference():
    if SHARED.exists():
        assert SEED.read_text() == SHARED.read_text()
    markers = RUNNABLE + DEFINITIONS + OTHERS
    for block in blocks("python"):  # each example is run by exactly one test below
        assert len([m for m in markers if matches(m, block)]) == 1, block
    assert len(blocks("python")) == len(markers) and len(blocks("bash")) == 5


def test_runnable_examples_run(server_process, tmp_path, monkeypatch):
    py = blocks("python")
    body = PRELUDE + "\n\n".join(as_mctl(find(py, m)) for m in RUNNABLE)
    module_path = write_module(tmp_path, "seed_all", body)
    mctl_cli("secret", "create", "my-env-vars", "MY_ENV_VAR=from-the-secret")
    mctl_cli("secret", "create", "my-api-key", "KEY=k")
    from mctl.sdk import deprecated

    deprecated._warned.clear()  # each older spelling warns once per process
    with warnings.catch_warnings(record=True) as record:
        module, app = load(module_path)
    messages = [str(w.message) for w in record]
    assert any("concurrency_limit" in m for m in messages)
    assert any("fastapi_endpoint" in m for m in messages)
    with app.run():
        assert module.hello.remote("World") == "Hello, World!"
        assert module.my_function.remote() is None  # prints MY_ENV_VAR (KeyError without it)
        assert module.get_env_info.remote() is None  # every MODAL_* variable is set
        assert module.secure_function.remote() is None
        assert module.limited_concurrency_function.remote() is None
        assert list(module.batched_multiply.map([1, 2], [5, 6])) == [1, 4]
        assert module.daily_task.remote() is None and module.weekday_morning_task.remote() is None
        assert module.async_task.remote() == "Task completed"
        assert module.MyClass(foo="f").baz.remote(qux="q") == (
            "This code is running in container pool (f, 10), with input qux=q")
        import urllib.request

        url = module.hello_web.get_web_url()
        with urllib.request.urlopen(url + "?name=seed", timeout=60) as resp:  # a public endpoint
            assert resp.read() == b'"Hello, seed!"'

    module, app = load(write_module(tmp_path, "seed_map", MAP_PRELUDE))
    with app.run():
        # "Batch Processing": a statement run where the page's `my_function` is defined
        namespace = dict(vars(module))
        exec(as_mctl(find(py, "my_function.map(input_list)")), namespace)
        assert list(namespace["results"]) == [2, 4, 6]


def test_definition_examples_define(tmp_path, monkeypatch):
    """Images, mounts, secrets, volumes, GPUs, registries: defined as written; what they need at
    run time (a GPU, a registry's image) is not on a test machine."""
    py = blocks("python")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "Dockerfile").write_text("FROM debian:bookworm-slim\n")
    body = PRELUDE + "\n\n".join(as_mctl(find(py, m)) for m in DEFINITIONS)
    with warnings.catch_warnings(record=True) as record:
        module, app = load(write_module(tmp_path, "seed_defs", body))
    assert any("Mount" in str(w.message) or "add_local" in str(w.message) for w in record)
    assert isinstance(module.image, mctl.Image) and isinstance(module.secret, mctl.Secret)
    assert isinstance(module.volume, mctl.Volume)
    assert module.gpu_function.options["gpu"].type == "T4"
    assert module.gpu_task.options["gpu"].type == "T4"
    assert module.docker_based_function.options["image"] is not None
    from mctl.core.compile import compile_app

    spec, _ = compile_app(app, "ap-seed")  # the whole page's app compiles to a valid spec
    assert spec.functions["gpu_task"].resources.gpu.type == "T4"


def test_sandbox_example_runs(tmp_path):
    from test_sandbox import _problem

    problem = _problem()
    if problem:
        if os.environ.get("MCTL_REQUIRE_SERVERS") == "1":
            pytest.fail(problem)
        pytest.skip(problem)
    block = find(blocks("python"), OTHERS[1])
    app = mctl.App("seed-sandbox")
    with app.run():
        namespace = {"modal": mctl, "my_app": app}
        exec(block, namespace)
        sandbox = namespace["sandbox"]
        # and the agent example's spelling of what it does next
        assert sandbox.exec("python", "-c", "print(6 * 7)").stdout.read().decode() == "42\n"
        sandbox.terminate()


def test_agent_example_needs_langchain(tmp_path):
    block = find(blocks("python"), "from langgraph.graph import StateGraph")
    try:
        import langgraph  # noqa: F401
    except ImportError:
        path = write_module(tmp_path, "agent", as_mctl(block))
        out = subprocess.run([sys.executable, "-m", "mctl", "run", str(path), "--task", "x"],
                             capture_output=True, text=True, timeout=120, env=os.environ)
        assert out.returncode != 0 and "langgraph" in out.stderr  # a clear import error
        return
    pytest.skip("LangChain is installed but the example also needs an OpenAI key")


def test_cli_examples_run(server_process, tmp_path, monkeypatch):
    """`modal deploy my_app.py`, `app list`, `app history`, `app rollback my-app v3`,
    `app stop my-app`, and `deploy_app(app, name="my-app")`, with `mctl` for `modal`."""
    py = blocks("python")
    monkeypatch.chdir(tmp_path)
    app_file = MAP_PRELUDE.replace('modal.App("seed")', 'modal.App("my-app")') + as_mctl(
        find(py, "def hello(name)"))
    write_module(tmp_path, "my_app", app_file)
    commands = [b.strip() for b in blocks("bash")]
    assert commands[0] == "modal deploy my_app.py"
    for _ in range(3):  # three versions, so that v3 exists
        mctl_cli(*commands[0].split()[1:])
    for command in commands[1:]:
        out = mctl_cli(*command.split()[1:])
        if "list" in command:
            assert "my-app" in out.stdout
        if "history" in command:
            assert "v3" in out.stdout or " 3 " in out.stdout
    module, app = load(tmp_path / "my_app.py")
    namespace = {"app": app}
    with warnings.catch_warnings(record=True):
        exec(as_mctl(find(py, "deploy_app(app")), namespace)
    assert mctl.Function.from_name("my-app", "hello").remote("World") == "Hello, World!"
