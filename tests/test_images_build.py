"""Images built for real at deploy: the venv fast path, OCI builds with buildah run in podman
containers, and images from a local registry with and without credentials.

The container tests need what `scripts/images-dev up` installs and starts (podman, buildah, the
debootstrap base, two registries); they skip when it is not up, and fail under
MCTL_REQUIRE_SERVERS=1 (as CI runs).
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mctl
from conftest import APPS, ROOT, ServerProcess, free_port

pytestmark = pytest.mark.integration


def mctl_cli(*args, env=None, check=True, timeout=600):
    out = subprocess.run([sys.executable, "-m", "mctl", *args], capture_output=True, text=True,
                         env=env or os.environ, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"mctl {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out


def apps_listed():
    return json.loads(mctl_cli("app", "list", "--json").stdout)


def podman_containers(label):
    out = subprocess.run(["podman", "ps", "-a", "--filter", f"label={label}", "--format",
                          "{{.Names}}"], capture_output=True, text=True)
    return out.stdout.split()


@pytest.fixture(scope="session")
def images_dev():
    """The variables of `scripts/images-dev env`, once its tools and base are there."""
    out = subprocess.run(["bash", str(ROOT / "scripts" / "images-dev"), "env"], capture_output=True,
                         text=True, check=True).stdout
    env = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines())
    problem = None
    if not (shutil.which("podman") and shutil.which("buildah")):
        problem = "podman and buildah are not installed"
    elif subprocess.run(["podman", "image", "exists", env["MCTL_IMAGE_BASE_DEBIAN_SLIM"]]
                        ).returncode != 0:
        problem = f"the base image {env['MCTL_IMAGE_BASE_DEBIAN_SLIM']} is not built"
    if problem:
        message = f"Container tools are not ready ({problem}); run `sudo scripts/images-dev up`."
        if os.environ.get("MCTL_REQUIRE_SERVERS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return env


# --- the venv fast path --------------------------------------------------------------------------
def test_pip_installed_package_imports_and_an_unchanged_image_builds_nothing(server_process):
    assert importlib.util.find_spec("tomli_w") is None, "the test needs a package the host lacks"
    out = mctl_cli("deploy", str(APPS / "image_pip.py"))
    assert "venv builder" in out.stdout and "Successfully installed tomli-w" in out.stdout
    assert "built virtualenv" in out.stdout
    dump = mctl.Function.from_name("image-pip", "dump")
    assert dump.remote({"a": 1}) == ('a = 1\n', "venv")
    assert mctl.Function.from_name("image-pip", "plain").remote() == "default image"

    again = mctl_cli("deploy", str(APPS / "image_pip.py"))
    assert "nothing to build" in again.stdout and "pip install" not in again.stdout
    assert "version 2" in again.stdout
    logs = mctl_cli("app", "logs", "image-pip").stdout
    assert "built virtualenv" in logs and "(venv builder), nothing to build" in logs


def test_a_package_that_does_not_exist_fails_the_deploy_with_the_log_tail(server_process):
    env = dict(os.environ, IMAGE_PIP_PACKAGE="mctl-no-such-package-4d1e")
    out = mctl_cli("deploy", str(APPS / "image_pip.py"), env=env, check=False)
    assert out.returncode != 0
    assert "failed at step 1 (pip_install): pip install mctl-no-such-package-4d1e" in out.stderr
    assert "No matching distribution found for mctl-no-such-package-4d1e" in out.stderr
    assert apps_listed() == []  # nothing stored, no worker started


# --- OCI builds, run in podman --------------------------------------------------------------------
@pytest.fixture
def oci_server(images_dev, tmp_path, monkeypatch):
    for key, value in images_dev.items():
        monkeypatch.setenv(key, value)
    env = dict(os.environ)
    srv = ServerProcess(tmp_path / "server-state", free_port(), env)
    srv.start()
    monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
    try:
        yield srv
    finally:
        srv.stop()


def test_apt_commands_mounts_and_dockerfiles_take_effect_in_containers(oci_server):
    out = mctl_cli("deploy", str(APPS / "image_oci.py"))
    assert "oci builder" in out.stdout
    tools = mctl.Function.from_name("image-oci", "tools").remote()
    assert tools["jq"].startswith("jq-") and tools["built"] == "built"
    assert (tools["cwd"], tools["flavour"], tools["python"]) == ("/srv", "oci", "/usr/bin/python3")
    assert mctl.Function.from_name("image-oci", "read_data").remote() == "rows: 3\n"
    assert mctl.Function.from_name("image-oci", "from_dockerfile").remote() == [
        "from the build context", "built for mctl", "yes"]
    assert podman_containers("mctl.pool")  # the workers are containers

    again = mctl_cli("deploy", str(APPS / "image_oci.py"))
    assert again.stdout.count("nothing to build") == 3
    assert "STEP" not in again.stdout


def test_a_broken_dockerfile_fails_the_deploy_with_the_build_log_tail(oci_server):
    env = dict(os.environ, IMAGE_DOCKERFILE="broken")
    out = mctl_cli("deploy", str(APPS / "image_oci.py"), env=env, check=False)
    assert out.returncode != 0
    assert "Building the image failed at building image" in out.stderr
    assert "mctl-no-such-command" in out.stderr and "about to fail" in out.stderr
    assert apps_listed() == []


# --- registries ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pushed(images_dev):
    """A marked image pushed to the anonymous registry, the one with basic auth and the one with
    bearer tokens."""
    tag = "localhost/mctl-test/registry-marked:1"
    dockerfile = (f"FROM {images_dev['MCTL_IMAGE_BASE_DEBIAN_SLIM']}\n"
                  "RUN echo from-registry > /etc/mctl-registry-marker\n")
    subprocess.run(["buildah", "bud", "--runtime", "runc", "--network", "host", "-t", tag, "-f",
                    "-", "."], input=dockerfile, text=True, check=True, capture_output=True,
                   cwd=str(APPS))
    refs = {}
    login = f"{images_dev['MCTL_TEST_REGISTRY_USER']}:{images_dev['MCTL_TEST_REGISTRY_PASSWORD']}"
    for name, creds in (("MCTL_TEST_REGISTRY", None), ("MCTL_TEST_AUTH_REGISTRY", login),
                        ("MCTL_TEST_TOKEN_REGISTRY", login)):
        ref = f"{images_dev[name]}/mctl-test/marked:1"
        subprocess.run(["podman", "push", "--tls-verify=false", *(["--creds", creds] if creds else []),
                        tag, f"docker://{ref}"], check=True, capture_output=True)
        refs[name] = ref
    return refs


def test_from_registry_anonymous_and_with_credentials(oci_server, pushed, images_dev):
    env = dict(os.environ, IMAGE_REGISTRY_TAG=pushed["MCTL_TEST_REGISTRY"])
    out = mctl_cli("deploy", str(APPS / "image_registry.py"), env=env)
    assert "is sha256:" in out.stdout
    assert mctl.Function.from_name("image-registry", "where").remote() == "from-registry registry"

    mctl_cli("secret", "create", "regcred",
             f"REGISTRY_USERNAME={images_dev['MCTL_TEST_REGISTRY_USER']}",
             f"REGISTRY_PASSWORD={images_dev['MCTL_TEST_REGISTRY_PASSWORD']}")
    for registry in ("MCTL_TEST_AUTH_REGISTRY", "MCTL_TEST_TOKEN_REGISTRY"):  # basic, bearer
        env = dict(os.environ, IMAGE_REGISTRY_TAG=pushed[registry], IMAGE_REGISTRY_SECRET="regcred")
        out = mctl_cli("deploy", str(APPS / "image_registry.py"), env=env)
        assert f"{pushed[registry]} is sha256:" in out.stdout
        assert mctl.Function.from_name("image-registry", "where").remote() == \
            "from-registry registry"


@pytest.mark.parametrize("registry", ["MCTL_TEST_AUTH_REGISTRY", "MCTL_TEST_TOKEN_REGISTRY"])
def test_registry_credentials_missing_or_wrong_say_so(oci_server, pushed, registry):
    env = dict(os.environ, IMAGE_REGISTRY_TAG=pushed[registry])
    out = mctl_cli("deploy", str(APPS / "image_registry.py"), env=env, check=False)
    assert out.returncode != 0 and "requires authentication" in out.stderr

    mctl_cli("secret", "create", "badcred", "REGISTRY_USERNAME=mctl",
             "REGISTRY_PASSWORD=not-the-password")
    out = mctl_cli("deploy", str(APPS / "image_registry.py"), check=False,
                   env=dict(env, IMAGE_REGISTRY_SECRET="badcred"))
    assert out.returncode != 0
    assert "refused the credentials for user 'mctl' (invalid username or password)" in out.stderr
    assert "not-the-password" not in out.stderr + out.stdout
    assert apps_listed() == []


def test_without_container_tools_the_deploy_names_the_steps_and_what_to_install(tmp_path,
                                                                               monkeypatch):
    """A control plane on a machine without podman or buildah (PATH without them)."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    srv = ServerProcess(tmp_path / "server-state", free_port(), dict(os.environ, PATH=str(empty_bin)))
    srv.start()
    monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
    try:
        out = mctl_cli("deploy", str(APPS / "image_oci.py"), check=False)
        assert out.returncode != 0
        # whichever of the app's three images is built first is named with its steps
        assert re.search(r"needs a container build for (apt_install, run_commands|apt_install|"
                         r"Image\.from_dockerfile),", out.stderr), out.stderr
        assert "neither buildah nor podman is installed. Install them" in out.stderr
        assert apps_listed() == []
    finally:
        srv.stop()


def write_marker(path):
    import sys

    with open(path, "w") as fh:
        fh.write(sys.prefix)


def test_run_function_runs_at_build_time_in_the_image_environment(tmp_path):
    from mctl.core.images import BuildContext, build_image
    from mctl.core.spec import ImageSpec

    marker = tmp_path / "marker"
    image = mctl.Image.debian_slim().run_function(write_marker, args=(str(marker),))
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for blob, data in image.blobs().items():
        (blobs / blob).write_bytes(data)
    lines = []
    built = build_image(ImageSpec(image_id=image.object_id, recipe=image.recipe()),
                        BuildContext(log=lines.append, blob_path=lambda b: blobs / b))
    assert built["builder"] == "venv"
    assert marker.read_text() == str(Path(built["python"]).parent.parent)  # ran in the venv


# --- other Python versions ----------------------------------------------------------------------
@pytest.mark.slow
def test_debian_slim_of_another_python_version_runs_in_that_python(oci_server):
    """3.13 is trixie's python3: the base is bootstrapped from Debian's packages if missing, and
    mctl's dependencies are installed in the image (the host's 3.11 ones cannot be lent)."""
    out = mctl_cli("deploy", str(APPS / "image_python_version.py"))
    assert "oci builder" in out.stdout
    got = mctl.Function.from_name("image-python-version", "version").remote({"a": 1})
    assert got == ("3.13", "a = 1\n", "/usr/bin/python3")


def test_a_python_version_debian_does_not_ship_is_refused_naming_the_ones_it_does(oci_server):
    env = dict(os.environ, IMAGE_PYTHON_VERSION="3.12")
    out = mctl_cli("deploy", str(APPS / "image_python_version.py"), env=env, check=False)
    assert out.returncode != 0
    assert "debian_slim(python_version='3.12') cannot be built here" in out.stderr
    assert "3.9 (bullseye), 3.11 (bookworm), 3.13 (trixie), 3.14 (forky)" in out.stderr
    assert "MCTL_IMAGE_BASE_DEBIAN_SLIM_3_12" in out.stderr
    assert apps_listed() == []


@pytest.fixture(scope="session")
def pushed_without_python(images_dev, pushed):
    """The marked image with Python removed, in the anonymous registry."""
    tag = "localhost/mctl-test/registry-nopython:1"
    dockerfile = ("FROM localhost/mctl-test/registry-marked:1\n"
                  "RUN apt-get purge -y -q python3 python3-pip python3-venv 'python3.11*' "
                  "'libpython3.11*' && apt-get autoremove -y -q --purge && ! command -v python3\n")
    subprocess.run(["buildah", "bud", "--runtime", "runc", "--network", "host", "-t", tag, "-f",
                    "-", "."], input=dockerfile, text=True, check=True, capture_output=True,
                   cwd=str(APPS))
    ref = f"{images_dev['MCTL_TEST_REGISTRY']}/mctl-test/nopython:1"
    subprocess.run(["podman", "push", "--tls-verify=false", tag, f"docker://{ref}"], check=True,
                   capture_output=True)
    return ref


@pytest.mark.slow
def test_add_python_installs_the_images_own_python_or_says_which_it_can_have(
        oci_server, pushed_without_python):
    env = dict(os.environ, IMAGE_REGISTRY_TAG=pushed_without_python)
    out = mctl_cli("deploy", str(APPS / "image_registry.py"), env=env, check=False)
    assert out.returncode != 0  # no python3 and no add_python: said at build time
    assert "this image has no python3" in out.stderr and 'add_python="3.11"' in out.stderr

    out = mctl_cli("deploy", str(APPS / "image_registry.py"), check=False,
                   env=dict(env, IMAGE_ADD_PYTHON="3.13"))  # bookworm ships 3.11 only
    assert out.returncode != 0
    assert "this image's distribution provides Python 3.11, not 3.13" in out.stderr
    assert apps_listed() == []

    mctl_cli("deploy", str(APPS / "image_registry.py"), env=dict(env, IMAGE_ADD_PYTHON="3.11"))
    assert mctl.Function.from_name("image-registry", "where").remote() == "from-registry registry"
    assert mctl.Function.from_name("image-registry", "python").remote() == "3.11 /usr/bin/python3"


def read_token_into(path):
    import os

    with open(path, "w") as fh:
        fh.write(os.environ.get("BUILD_TOKEN", "unset"))


def test_run_function_secrets_are_in_its_environment_only(tmp_path):
    from mctl.core.images import BuildContext, build_image
    from mctl.core.spec import ImageSpec

    marker = tmp_path / "marker"
    image = mctl.Image.debian_slim().run_function(
        read_token_into, args=(str(marker),), secrets=[mctl.Secret.from_name("build-token")])
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for blob, data in image.blobs().items():
        (blobs / blob).write_bytes(data)
    lines = []
    build_image(ImageSpec(image_id=image.object_id, recipe=image.recipe()),
                BuildContext(log=lines.append, blob_path=lambda b: blobs / b,
                             resolve_secret=lambda name: {"BUILD_TOKEN": "t0ken"}))
    assert marker.read_text() == "t0ken"
    assert not any("t0ken" in line for line in lines)


def test_build_secrets_reach_run_commands_and_stay_out_of_the_image(oci_server):
    mctl_cli("secret", "create", "build-token", "BUILD_TOKEN=not-in-any-layer-7f3")
    out = mctl_cli("deploy", str(APPS / "image_oci.py"), env=dict(os.environ,
                                                                  IMAGE_BUILD_SECRET="build-token"))
    assert "not-in-any-layer-7f3" not in out.stdout + out.stderr
    tools = mctl.Function.from_name("image-oci", "tools").remote()
    assert (tools["secret_seen"], tools["token_at_run_time"]) == ("yes", None)
    image = subprocess.run(["podman", "ps", "--filter", "label=mctl.pool", "--format",
                            "{{.Image}}"], capture_output=True, text=True).stdout.split()
    history = subprocess.run(["podman", "history", "--no-trunc", image[0]], capture_output=True,
                             text=True, check=True).stdout
    assert "not-in-any-layer-7f3" not in history
    saved = subprocess.run(["podman", "image", "inspect", image[0]], capture_output=True,
                           text=True, check=True).stdout
    assert "not-in-any-layer-7f3" not in saved


def test_a_failing_run_commands_step_is_named_and_mctl_run_says_run_again(oci_server, tmp_path):
    path = tmp_path / "failing_step.py"
    path.write_text("import mctl\n"
                    "image = (mctl.Image.debian_slim().run_commands('echo first-ok')\n"
                    "         .run_commands('echo about-to-fail && exit 7'))\n"
                    "app = mctl.App('failing-step')\n\n"
                    "@app.function(image=image)\ndef f():\n    return 1\n")
    out = mctl_cli("run", str(path), check=False)
    assert out.returncode != 0
    first = out.stderr.splitlines()[0] if out.stderr else ""
    assert ("failed at step 2 (run_commands: `echo about-to-fail && exit 7`) of image im-"
            in first), out.stderr
    assert "(exit 7); fix that step and run again." in first, out.stderr
    out = mctl_cli("deploy", str(path), check=False)
    assert out.returncode != 0 and "fix that step and deploy again" in out.stderr, out.stderr


def test_ctrl_c_while_the_image_builds_abandons_the_deploy(oci_server):
    """A deploy the user interrupted (Ctrl-C on `mctl deploy` while its image builds) does not
    go live when the build finishes."""
    import signal
    import time
    import uuid

    env = dict(os.environ, IMAGE_SLOW_NONCE=uuid.uuid4().hex)
    proc = subprocess.Popen([sys.executable, "-m", "mctl", "deploy", str(APPS / "image_slow.py")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    time.sleep(3)  # into the build's `sleep 5`
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    time.sleep(12)  # the build has finished on the server by now
    assert apps_listed() == [], "an interrupted deploy went live"
    assert "abandoned by its client" in (oci_server.state_dir.parent / "server.log").read_text()

    out = mctl_cli("deploy", str(APPS / "image_slow.py"), env=env)  # the image stayed cached
    assert "nothing to build" in out.stdout
    assert mctl.Function.from_name("image-slow", "nonce").remote() == env["IMAGE_SLOW_NONCE"]


@pytest.mark.slow
def test_debian_slim_images_have_python_and_older_ones_get_it(images_dev, tmp_path, monkeypatch):
    """Modal's images have `python`; a sandbox on debian_slim().pip_install(...) had not (rc 127).
    An image built before (no mctl.python label) gets the link as one layer, not a rebuild."""
    from mctl.core.images import BuildContext
    from mctl.core.spec import ImageSpec
    from mctl.plugins import image_oci

    for key, value in images_dev.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MCTL_IMAGE_REGISTRY", raising=False)
    image = mctl.Image.debian_slim().run_commands(f"echo {tmp_path.name}")  # a new image id
    spec = ImageSpec(image_id=image.object_id, recipe=image.recipe())
    lines = []
    ctx = BuildContext(log=lines.append, blob_path=lambda b: tmp_path / b)
    tag = image_oci.build(spec, ctx)["image"]

    def python_runs():
        return subprocess.run(["podman", "run", "--rm", tag, "python", "-c", "print(6 * 7)"],
                              capture_output=True, text=True).stdout.strip() == "42"

    try:
        assert python_runs()
        # as built before: no link, no label
        ctr = subprocess.run(["buildah", "from", "--pull=never", tag], capture_output=True,
                             text=True, check=True).stdout.strip()
        subprocess.run(["buildah", "run", ctr, "rm", "/usr/bin/python"], check=True)
        subprocess.run(["buildah", "config", "--label", "mctl.python-", ctr], check=True)
        subprocess.run(["buildah", "commit", "-q", ctr, tag], check=True, capture_output=True)
        subprocess.run(["buildah", "rm", ctr], capture_output=True)
        assert not python_runs()
        lines.clear()
        image_oci.build(spec, ctx)
        assert any("exists, nothing to build" in line for line in lines), lines
        assert python_runs()
    finally:
        subprocess.run(["podman", "rmi", "-f", tag], capture_output=True)
