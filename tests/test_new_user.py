"""What a new user met on main: schedules that can never fire, cron strings, a module-level
deploy, FunctionCall.from_id inside a run, CLI targets and arguments, detached apps by name."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mctl
from mctl.exception import InvalidError


def mctl_cli(*args, cwd=None, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "mctl", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env or os.environ)


def with_cron(spec, tag, cron):
    """`spec` with function `tag`'s schedule replaced, as an older client could have sent it."""
    from mctl.core.spec import ScheduleSpec

    fspec = spec.functions[tag].model_copy(
        update={"schedule": ScheduleSpec(kind="cron", cron=cron)})
    return spec.model_copy(update={"functions": {**spec.functions, tag: fspec}})


# --- cron strings --------------------------------------------------------------------------------
@pytest.mark.parametrize("expr, field", [("0 25 * * *", "hour field '25'"),
                                         ("61 * * * *", "minute field '61'"),
                                         ("0 0 32 * *", "day of month field '32'"),
                                         ("0 0 * 13 *", "month field '13'"),
                                         ("0 0 * * 9", "day of week field '9'")])
def test_a_cron_field_out_of_range_is_named(expr, field):
    with pytest.raises(InvalidError) as info:
        mctl.Cron(expr)
    assert field in str(info.value) and "five fields" not in str(info.value)


def test_a_six_field_cron_is_refused():
    with pytest.raises(InvalidError, match="six fields.*takes five"):
        mctl.Cron("* * * * * *")
    with pytest.raises(InvalidError, match="has 3 fields; use five"):
        mctl.Cron("* * *")


def test_valid_crons_still_pass():
    for expr in ("* * * * *", "0 9 * * 1-5", "*/15 * * * *", "0 0 29 2 *", "@daily",
                 "0 9 * * mon-fri"):
        mctl.Cron(expr)


def test_a_cron_that_can_never_fire_is_refused_naming_the_function():
    app = mctl.App("never")
    with pytest.raises(InvalidError, match=r"Function f has schedule Cron\('0 0 31 2 \*'\), which "
                                           "can never fire"):
        @app.function(schedule=mctl.Cron("0 0 31 2 *"), serialized=True)
        def f():
            pass


def test_mctl_deploy_refuses_a_cron_that_can_never_fire(tmp_path):
    path = tmp_path / "m_c.py"
    path.write_text("import mctl as modal\napp = modal.App('cron-t')\n"
                    "@app.function(schedule=modal.Cron('0 0 31 2 *'))\ndef f(): pass\n")
    out = mctl_cli("deploy", str(path))
    assert out.returncode == 1
    assert "Function f has schedule Cron('0 0 31 2 *'), which can never fire" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (Path(os.environ["MCTL_HOME"]) / "server.json").exists()  # nothing was started


def test_the_control_plane_refuses_a_cron_that_can_never_fire():
    """A client that skips the SDK's check (an older one, a hand-written spec) is refused too."""
    from mctl.core.client import run_sync
    from mctl.core.compile import compile_app
    from mctl.core.runner import _publish, embedded_server
    app = mctl.App("never-http")

    @app.function(schedule=mctl.Cron("0 0 * * *"), serialized=True, name="f")
    def f():
        pass

    spec, blobs = compile_app(app, "ap-neverhttp", "never-http")
    spec = with_cron(spec, "f", "0 0 31 2 *")
    with embedded_server() as url:
        with pytest.raises(InvalidError, match="Function f's schedule.*can never fire"):
            run_sync(_publish(url, spec, blobs, "deployed", "ap-neverhttp", {}, set()))


def test_a_schedule_that_cannot_fire_leaves_the_others_firing(tmp_path):
    """An app stored with a never-firing cron (before deploys refused them) is logged once; the
    other apps' schedules keep firing."""
    from mctl.core import transport
    from mctl.core.client import close_client, run_sync
    from mctl.core.compile import compile_app
    from mctl.core.runner import _publish, _start_embedded
    good = mctl.App("ticks")

    @good.function(schedule=mctl.Period(seconds=0.5), serialized=True, name="tick")
    def tick():
        pass

    bad = mctl.App("feb31")

    @bad.function(schedule=mctl.Cron("0 0 * * *"), serialized=True, name="never")
    def never():
        pass

    server, token = run_sync(_start_embedded(tmp_path / "state"))
    transport.use_token(server.url, token)
    try:
        bad_spec, _ = compile_app(bad, "ap-feb31", "feb31")
        bad_spec = with_cron(bad_spec, "never", "0 0 31 2 *")
        run_sync(server.control.create_app(bad_spec, "deployed", "ap-feb31"))
        spec, blobs = compile_app(good, "ap-ticks", "ticks")
        run_sync(_publish(server.url, spec, blobs, "deployed", "ap-ticks", {}, set()))

        def lines(app_id):
            return [row[4] for row in server.control.store.logs(app_id)]

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if sum("schedule fired" in line for line in lines("ap-ticks")) >= 3:
                break
            time.sleep(0.2)
        assert sum("schedule fired" in line for line in lines("ap-ticks")) >= 3
        broken = [line for line in lines("ap-feb31") if "can never fire" in line]
        assert len(broken) == 1 and "0 0 31 2 *" in broken[0], lines("ap-feb31")
    finally:
        run_sync(close_client(server.url))
        run_sync(server.close())
        transport.forget_token(server.url)


# --- a module-level deploy -----------------------------------------------------------------------
PROGRAMMATIC_DEPLOY = '''import mctl as modal
app = modal.App("{name}")

@app.function()
def hello(name):
    return f"Hello, {{name}}!"

{deploy}
print("deployed; calling")
print(modal.Function.from_name("{name}", "hello").remote("x"))
'''


@pytest.mark.parametrize("deploy", ["app.deploy()",
                                    "import mctl.runner\nmctl.runner.deploy_app(app, name='prog')"])
def test_a_module_level_deploy_is_skipped_in_workers(tmp_path, server_process, deploy):
    """The workers import the file again: the deploy there is not run again (its token could not
    deploy), and the app stays healthy; `mctl deploy` on the same file works too."""
    import json

    path = tmp_path / "progdeploy.py"
    path.write_text(PROGRAMMATIC_DEPLOY.format(name="prog", deploy=deploy))
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "Hello, x!" in out.stdout, out.stdout + out.stderr
    out = mctl_cli("deploy", str(path))
    assert out.returncode == 0 and "Deployed app prog" in out.stdout, out.stdout + out.stderr
    assert mctl.Function.from_name("prog", "hello").remote("y") == "Hello, y!"
    apps = json.loads(mctl_cli("app", "list", "--json").stdout)
    assert [(a["name"], a["state"], a.get("failing") or None) for a in apps] == [
        ("prog", "running", None)]
    logs = mctl_cli("app", "logs", "prog").stdout
    assert "AuthError" not in logs and "deployed; calling" not in logs, logs


# --- FunctionCall.from_id inside a run -----------------------------------------------------------
FROM_ID = '''import mctl as modal
app = modal.App()

@app.function()
def f(x): return x * 2

{body}
'''


@pytest.mark.parametrize("shape", ["entrypoint", "script"])
def test_from_id_inside_a_run_uses_the_running_apps_control_plane(tmp_path, shape):
    body = ("@app.local_entrypoint()\ndef main():\n    c = f.spawn(4)\n"
            "    print('got', modal.FunctionCall.from_id(c.object_id).get())\n" if shape == "entrypoint"
            else "with app.run():\n    c = f.spawn(4)\n"
                 "    print('got', modal.FunctionCall.from_id(c.object_id).get())\n")
    path = tmp_path / "m_fromid.py"
    path.write_text(FROM_ID.format(body=body))
    command = ["-m", "mctl", "run", str(path)] if shape == "entrypoint" else [str(path)]
    out = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "got 8" in out.stdout, out.stdout + out.stderr


# --- mctl run: targets, arguments, generators ----------------------------------------------------
@pytest.mark.parametrize("command, target, says", [
    ("run", "examples", "is a directory; pass one app's .py file"),
    ("deploy", "examples", "is a directory; pass one app's .py file"),
    ("run", "README.md", "is not a Python file; pass your app's .py file"),
    ("deploy", "README.md", "is not a Python file; pass your app's .py file")])
def test_a_target_that_is_no_app_file_says_what_it_must_be(command, target, says):
    root = Path(__file__).resolve().parent.parent
    out = mctl_cli(command, target, cwd=root)
    assert out.returncode == 2 and says in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "AssertionError" not in out.stderr


RUN_APP = '''import mctl as modal
app = modal.App("cli-shapes")

@app.function()
def gen(n: int = 3):
    for i in range(n):
        yield f"item {i}"

@app.function()
def nothing():
    pass

@app.function()
def echo(items: str, times: int = 1, loud: bool = False):
    return (items.upper() if loud else items) * times

@app.local_entrypoint()
def main(items: str, times: int = 1):
    print("main got", items * times)
'''


def test_run_takes_name_equals_value_and_prints_generators_and_no_none(tmp_path):
    path = tmp_path / "shapes.py"
    path.write_text(RUN_APP)
    out = mctl_cli("run", "-q", f"{path}::main", "--items=x", "--times=3")
    assert out.returncode == 0 and "main got xxx" in out.stdout, out.stdout + out.stderr
    out = mctl_cli("run", "-q", f"{path}::echo", "--items=ab", "--times", "2", "--loud=true")
    assert out.returncode == 0 and out.stdout.splitlines()[-1] == "ABAB", out.stdout + out.stderr
    out = mctl_cli("run", "-q", f"{path}::gen", "--n=2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert [line for line in out.stdout.splitlines() if line.startswith("item")] == [
        "item 0", "item 1"]
    out = mctl_cli("run", "-q", f"{path}::nothing")
    assert out.returncode == 0 and "None" not in out.stdout, out.stdout + out.stderr


# --- apps by name --------------------------------------------------------------------------------
DETACHED = '''import mctl as modal
app = modal.App("{name}")

@app.function()
def square(x: int):
    print("squaring", x)
    return x * x
'''


def test_a_detached_app_is_found_by_its_name(tmp_path, server_process):
    import json

    path = tmp_path / "det.py"
    path.write_text(DETACHED.format(name="detached-app"))
    for _ in range(2):
        out = mctl_cli("run", "--detach", f"{path}::square", "--x", "3")
        assert out.returncode == 0, out.stderr
    ids = [a["app_id"] for a in json.loads(mctl_cli("app", "list", "--json").stdout)
           if a["name"] == "detached-app"]
    assert len(ids) == 2
    out = mctl_cli("app", "logs", "detached-app")  # two run under that name: say which they are
    assert out.returncode == 1 and "2 running apps are named 'detached-app'" in out.stderr
    assert all(app_id in out.stderr for app_id in ids), out.stderr
    assert mctl_cli("app", "stop", ids[0]).returncode == 0
    out = mctl_cli("app", "logs", "detached-app")
    assert out.returncode == 0 and "squaring 3" in out.stdout, out.stdout + out.stderr
    out = mctl_cli("app", "stop", "detached-app")
    assert out.returncode == 0 and out.stdout.strip() == f"Stopped detached-app ({ids[1]})"
    out = mctl_cli("app", "stop", "no-such-app")
    assert out.returncode == 1 and "No app named 'no-such-app'" in out.stderr


def test_rollback_of_a_single_version_app_says_there_is_nothing_earlier(tmp_path, server_process):
    path = tmp_path / "once.py"
    path.write_text(DETACHED.format(name="once"))
    assert mctl_cli("deploy", str(path)).returncode == 0
    out = mctl_cli("app", "rollback", "once")
    assert out.returncode == 1
    assert "App once has only one version (v1): there is no earlier version" in out.stderr


# --- cosmetic CLI --------------------------------------------------------------------------------
def test_lists_have_headers_and_long_names_keep_columns(tmp_path, server_process):
    out = mctl_cli("secret", "create", "a-secret-with-a-rather-long-name", "A=1", "B=2")
    assert out.returncode == 0, out.stderr
    lines = mctl_cli("secret", "list").stdout.splitlines()
    assert lines[0].split() == ["NAME", "UPDATED", "KEYS"]
    assert lines[0].index("UPDATED") == lines[1].index(lines[1].split()[1])

    vol = mctl.Volume.from_name("listed", create_if_missing=True)
    with vol.batch_upload() as batch:
        batch.put_file(__file__, "/test.py")
    lines = mctl_cli("volume", "ls", "listed").stdout.splitlines()
    assert lines[0].split() == ["TYPE", "SIZE", "MODIFIED", "PATH"] and "test.py" in lines[1]

    path = tmp_path / "long.py"
    path.write_text(DETACHED.format(name="an-app-name-longer-than-twenty-characters"))
    assert mctl_cli("deploy", str(path)).returncode == 0
    lines = mctl_cli("app", "list").stdout.splitlines()
    assert lines[0].index("MODE") == lines[1].index("deployed"), "\n".join(lines)


def test_secret_create_without_a_name_says_so(server_process):
    out = mctl_cli("secret", "create", "A=1")
    assert out.returncode == 2 and "The secret's name is missing: 'A=1' is a KEY=VALUE pair" in \
        out.stderr, out.stderr


def test_config_show_says_when_server_toml_is_not_there(tmp_path, monkeypatch):
    out = mctl_cli("config", "show")
    line = [x for x in out.stdout.splitlines() if x.startswith("server_config")][0]
    assert line.endswith("server.toml (not present)"), line
    settings = tmp_path / "server.toml"
    settings.write_text("port = 0\n")
    out = mctl_cli("config", "show", env=dict(os.environ, MCTL_SERVER_CONFIG=str(settings)))
    line = [x for x in out.stdout.splitlines() if x.startswith("server_config")][0]
    assert line.split()[-1] == str(settings), line


def test_deleting_a_missing_dict_fails_before_asking(server_process):
    out = subprocess.run([sys.executable, "-m", "mctl", "dict", "delete", "nope"], input="",
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "No dict named 'nope'" in out.stderr, out.stdout + out.stderr
    assert "[y/N]" not in out.stdout + out.stderr
    d = mctl.Dict.from_name("present", create_if_missing=True)
    d["k"] = 1
    out = subprocess.run([sys.executable, "-m", "mctl", "dict", "delete", "present"], input="y\n",
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Deleted dict present" in out.stdout, out.stdout + out.stderr
