"""The Image recipe (Modal's spellings), its content-hash id, Mount's old spelling, and which
builder takes a recipe. Fast: nothing here builds."""

from pathlib import Path

import pytest

import mctl
from mctl.core.images import ImageBuildError, builder_for
from mctl.core.spec import ImageSpec
from mctl.exception import InvalidError


def spec(image):
    return ImageSpec(image_id=image.object_id, recipe=image.recipe())


def test_every_method_returns_a_new_image_and_leaves_its_base_alone():
    base = mctl.Image.debian_slim()
    grown = base.pip_install("six").apt_install("jq").env({"A": "1"}).workdir("/srv")
    assert base.steps == () and len(grown.steps) == 4
    assert base.object_id != grown.object_id
    assert [s["kind"] for s in grown.recipe()["steps"]] == ["pip_install", "apt_install", "env",
                                                            "workdir"]


def test_id_is_a_content_hash_of_recipe_and_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("one")
    first = mctl.Image.debian_slim().add_local_dir(data, "/root/data", copy=True)
    again = mctl.Image.debian_slim().add_local_dir(data, "/root/data", copy=True)
    assert first.object_id == again.object_id
    (data / "a.txt").write_text("two")
    changed = mctl.Image.debian_slim().add_local_dir(data, "/root/data", copy=True)
    assert changed.object_id != first.object_id
    assert set(changed.blobs()) == {changed.recipe()["steps"][0]["blob"]}


def test_force_build_rebuilds_the_same_id():
    plain = mctl.Image.debian_slim().pip_install("six")
    forced = mctl.Image.debian_slim().pip_install("six", force_build=True)
    assert plain.object_id == forced.object_id
    assert forced.recipe()["steps"][0]["force_build"] is True


def test_requirements_and_pyproject_become_pip_steps(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("six==1.16.0  # pinned\n\ntomli-w\n")
    assert mctl.Image.debian_slim().pip_install_from_requirements(req).steps[0]["packages"] == [
        "six==1.16.0", "tomli-w"]
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["six"]\n'
                         '[project.optional-dependencies]\ndev = ["tomli-w"]\n')
    image = mctl.Image.debian_slim().pip_install_from_pyproject(pyproject,
                                                                 optional_dependencies=["dev"])
    assert image.steps[0]["packages"] == ["six", "tomli-w"]


def test_bad_arguments_say_what_to_write():
    with pytest.raises(InvalidError, match="absolute"):
        mctl.Image.debian_slim().workdir("srv")
    with pytest.raises(InvalidError, match="no file"):
        mctl.Image.debian_slim().add_local_file("/nonexistent/file", "/root/file")
    with pytest.raises(InvalidError, match="named secret"):
        mctl.Image.from_registry("127.0.0.1:5000/x:1", secret=mctl.Secret.from_dict({"a": "b"}))
    with pytest.raises(InvalidError, match="must return an Image"):
        mctl.Image.debian_slim().pipe(lambda image: None)


def test_pipe_composes_user_recipes():
    def with_tools(image):
        return image.apt_install("jq").env({"TOOLS": "1"})

    assert [s["kind"] for s in mctl.Image.debian_slim().pipe(with_tools).steps] == [
        "apt_install", "env"]


def test_mount_works_with_a_warning_naming_the_new_spelling(tmp_path):
    (tmp_path / "t.txt").write_text("x")
    with pytest.warns(DeprecationWarning, match=r"image\.add_local_dir"):
        mount = mctl.Mount.from_local_dir(tmp_path, remote_path="/root/data")
    app = mctl.App("mounts")
    with pytest.warns(DeprecationWarning, match="mounts=.*deprecated"):
        @app.function(mounts=[mount], serialized=True)
        def f():
            pass
    step = f.options["image"].steps[-1]
    assert (step["kind"], step["remote_path"], step["copy"]) == ("add_local_dir", "/root/data",
                                                                  False)
    with pytest.warns(DeprecationWarning, match="add_local_python_source"):
        mctl.Mount.from_local_python_packages("mctl")


def test_each_recipe_goes_to_a_builder_that_honours_every_step():
    assert builder_for(spec(mctl.Image())).name == "local"
    assert builder_for(spec(mctl.Image().env({"A": "1"}))).name == "local"
    assert builder_for(spec(mctl.Image.debian_slim().pip_install("six"))).name == "venv"
    assert builder_for(spec(mctl.Image.debian_slim().add_local_python_source("mctl"))).name == "venv"
    for image in (mctl.Image.debian_slim().apt_install("jq"),
                  mctl.Image.debian_slim().run_commands("true"),
                  mctl.Image.debian_slim(python_version="3.9").pip_install("six"),
                  mctl.Image.from_registry("127.0.0.1:5000/x:1"),
                  mctl.Image.debian_slim().add_local_file(__file__, "/root/t.py")):
        assert builder_for(spec(image)).name == "oci", image.recipe()


def test_without_podman_or_buildah_the_build_names_the_step_and_the_fix(monkeypatch, tmp_path):
    from mctl.core.images import BuildContext, build_image

    monkeypatch.setenv("PATH", str(tmp_path))  # no container tool on it
    image = mctl.Image.debian_slim().apt_install("jq").run_commands("true")
    ctx = BuildContext(log=lambda line: None, blob_path=lambda blob: Path("/nonexistent"))
    with pytest.raises(ImageBuildError, match="apt_install, run_commands.*neither buildah nor "
                                               "podman.*Install"):
        build_image(spec(image), ctx)


def test_registry_references_need_a_registry_host():
    from mctl.plugins.registry_v2 import parse

    ref = parse("127.0.0.1:5000/team/tools:1.2")
    assert (ref.registry, ref.repository, ref.tag) == ("127.0.0.1:5000", "team/tools", "1.2")
    assert parse("registry.local/tools").tag == "latest"
    with pytest.raises(InvalidError, match="names no registry"):
        parse("python:3.11")


def test_mctl_import_stays_free_of_image_builders():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import mctl, sys; print(sorted(m for m in "
                          "sys.modules if m.startswith('mctl.plugins') or m == 'mctl.core.images'))"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def render(image, tmp_path):
    from mctl.core.images import BuildContext
    from mctl.plugins.image_oci import render as render_dockerfile

    ctx = BuildContext(log=lambda line: None, blob_path=lambda blob: tmp_path / blob)
    return render_dockerfile(spec(image), ctx, tmp_path)[0]


def test_micromamba_without_a_base_and_channel_says_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.delenv("MCTL_IMAGE_BASE_MICROMAMBA", raising=False)
    image = mctl.Image.micromamba().micromamba_install("numpy")
    with pytest.raises(ImageBuildError, match="not in Debian's packages or on PyPI.*"
                                              "MCTL_IMAGE_BASE_MICROMAMBA"):
        render(image, tmp_path)


def test_micromamba_installs_with_the_configured_base_and_channels(monkeypatch, tmp_path):
    """Rendered only: no micromamba base or conda channel can be had on machines like these."""
    monkeypatch.setenv("MCTL_IMAGE_BASE_MICROMAMBA", "registry.local/micromamba:2")
    monkeypatch.setenv("MCTL_CONDA_CHANNELS", "https://conda.mirror.local/conda-forge")
    env_file = tmp_path / "environment.yml"
    env_file.write_text("dependencies: [pandas]\n")
    image = (mctl.Image.micromamba(python_version="3.12")
             .micromamba_install("numpy", "scipy=1.14", channels=["bioconda"])
             .micromamba_install(spec_file=str(env_file)))
    text = render(image, tmp_path / "ctx")
    assert text.startswith("FROM registry.local/micromamba:2\n")
    assert ("RUN micromamba install -y -n base -c https://conda.mirror.local/conda-forge "
            "python=3.12") in text
    assert "RUN micromamba install -y -n base -c bioconda numpy scipy=1.14" in text
    assert "-f /tmp/mctl-env-2.yml" in text
    assert (tmp_path / "ctx" / "mctl-files" / "2" / "environment.yml").read_text() == \
        "dependencies: [pandas]\n"
    with pytest.raises(ImageBuildError, match="needs an image made with Image.micromamba"):
        render(mctl.Image.debian_slim().micromamba_install("numpy"), tmp_path / "other")


def test_other_python_versions_get_mctls_dependencies_and_refuse_run_function(tmp_path,
                                                                             monkeypatch):
    from mctl.plugins import debian_slim_base

    monkeypatch.setattr(debian_slim_base, "ensure", lambda *a: None)  # no base build here
    text = render(mctl.Image.debian_slim(python_version="3.13").pip_install("six"), tmp_path)
    assert text.startswith("FROM localhost/mctl/debian-slim:trixie\n")
    assert "RUN python3 -m pip install --no-input --no-cache-dir 'aiohttp>=3.9'" in text
    assert "'pydantic>=2.5'" in text and "hvac" not in text  # extras left out
    with pytest.raises(ImageBuildError, match="cloudpickle bytes made by Python 3.11"):
        render(mctl.Image.debian_slim(python_version="3.13").run_function(print), tmp_path / "x")
    assert "pip install --no-input --no-cache-dir 'aiohttp" not in render(
        mctl.Image.debian_slim().pip_install("six"), tmp_path / "y")


def test_build_steps_take_named_secrets_and_refuse_unknown_keywords():
    image = mctl.Image.debian_slim().run_commands("make", secrets=[mctl.Secret.from_name("tok")])
    assert image.recipe()["steps"][0]["secrets"] == ["tok"]
    assert "secrets" not in mctl.Image.debian_slim().pip_install("six").recipe()["steps"][0]
    with pytest.raises(InvalidError, match=r"takes named secrets.*mctl secret create"):
        mctl.Image.debian_slim().pip_install("six", secrets=[mctl.Secret.from_dict({"A": "b"})])
    with pytest.raises(InvalidError, match="unexpected keyword argument 'volumes_typo'"):
        mctl.Image.debian_slim().apt_install("jq", volumes_typo=1)
    with pytest.warns(UserWarning, match=r"pip_install\(gpu=...\) is not applied: image builds "
                                         "run without GPUs"):
        mctl.Image.debian_slim().pip_install("torch", gpu="A10G")
    assert mctl.Image.debian_slim().cmd(["python3"]).steps[0] == {"kind": "cmd",
                                                                 "command": ["python3"]}


def test_oci_build_secrets_are_build_secrets_not_layers(tmp_path):
    image = mctl.Image.debian_slim().run_commands(
        "test \"$TOKEN\" = s3cret", secrets=[mctl.Secret.from_name("tok")])
    from mctl.core.images import BuildContext
    from mctl.plugins import debian_slim_base
    from mctl.plugins.image_oci import render as render_dockerfile, secrets_dir

    ctx = BuildContext(log=lambda line: None, blob_path=lambda blob: tmp_path / blob,
                       resolve_secret=lambda name: {"TOKEN": "s3cret"} if name == "tok" else None)
    orig = debian_slim_base.ensure
    debian_slim_base.ensure = lambda *a: None
    try:
        text, flags = render_dockerfile(spec(image), ctx, tmp_path / "ctx")
    finally:
        debian_slim_base.ensure = orig
    assert ("RUN --mount=type=secret,id=mctl-step-1,target=/run/secrets/mctl-step-1 "
            ". /run/secrets/mctl-step-1 && test \"$TOKEN\" = s3cret") in text
    assert "s3cret\n" not in text.replace('= s3cret', '')
    src = secrets_dir(tmp_path / "ctx") / "step-1.env"
    assert flags[flags.index("--secret") + 1] == f"id=mctl-step-1,src={src}"
    assert src.read_text() == "export TOKEN=s3cret\n" and oct(src.stat().st_mode & 0o777) == "0o600"


def test_debian_slim_images_have_python_as_modals_do(tmp_path, monkeypatch):
    """`python` (not only python3) in every debian_slim image the oci builder makes, as in the
    default sandbox image: a sandbox on debian_slim().pip_install(...) ran `python` with rc 127."""
    from mctl.plugins import debian_slim_base
    from mctl.plugins.image_oci import PYTHON_LINK

    monkeypatch.setattr(debian_slim_base, "ensure", lambda *a: None)  # no base build here
    for n, image in enumerate([mctl.Image.debian_slim().pip_install("six"),
                               mctl.Image.debian_slim(python_version="3.13").apt_install("git")]):
        lines = [ln for ln in render(image, tmp_path / str(n)).splitlines()
                 if not ln.startswith("ARG ")]  # the host's pip settings
        assert lines[1:3] == PYTHON_LINK  # right after FROM: one cached layer for every image
    assert "ln -s python3 /usr/bin/python" in PYTHON_LINK[0]
