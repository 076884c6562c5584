"""The `oci` image builder: a Dockerfile rendered from the recipe, built with buildah (or podman, or
docker), tagged by image id, pushed to `MCTL_IMAGE_REGISTRY` when one is configured.

It builds every recipe the `venv` builder cannot: apt_install, run_commands, a registry or
Dockerfile base, files at absolute paths, entrypoint. A build is skipped when the image (or the
registry's tag) already exists. Builds reach package indexes the way the host does: the host's pip
settings become build arguments, its CA bundle and find-links directories are mounted read-only.

Settings (environment of the control plane):
- `MCTL_IMAGE_REGISTRY`: host:port[/prefix] to push images to, for backends whose nodes pull.
- `MCTL_IMAGE_BASE_DEBIAN_SLIM`: the image `debian_slim` starts from (default
  `localhost/mctl/debian-slim:bookworm`, made by `scripts/images-dev up` with debootstrap).
- `MCTL_INSECURE_REGISTRIES`: registries spoken to over plain HTTP (loopback ones always are).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mctl
from mctl.core.plugin_types import ImageBuilder

if TYPE_CHECKING:
    from mctl.core.images import BuildContext
    from mctl.core.spec import ImageSpec

HOST_CA_IN_BUILD = "/etc/ssl/host-ca.crt"
PYTHON_SOURCE_ROOT = "/root"
MOUNTED_SOURCE_ROOT = "/opt/mctl/src"


def build_tool() -> str | None:
    for tool in ("buildah", "podman", "docker"):
        if shutil.which(tool):
            return tool
    return None


def run_tool() -> str | None:
    for tool in ("podman", "docker"):
        if shutil.which(tool):
            return tool
    return None


def local_tag(image_id: str, version: str = "latest") -> str:
    return f"localhost/mctl/{image_id}:{version}"


def handles(image: ImageSpec) -> bool:
    return True  # the fallback builder: asked after the others


def _container_steps(image: ImageSpec) -> list[str]:
    """What in the recipe needs a container build, for the error when no tool is installed."""
    from mctl.plugins.image_venv import VENV_STEPS

    base = image.recipe.get("base")
    out = []
    if base is not None and base.get("kind") != "debian_slim":
        out.append(f"Image.{'from_' + base['kind'] if base['kind'] != 'micromamba' else 'micromamba'}")
    out += sorted({s["kind"] for s in image.recipe.get("steps", []) if s["kind"] not in VENV_STEPS})
    return out or ["the image's base"]


def build(image: ImageSpec, ctx: BuildContext) -> dict[str, Any]:
    from mctl.core.images import ImageBuildError, cache_dir, extract_blob

    tool = build_tool()
    if tool is None:
        raise ImageBuildError(
            f"Image {image.image_id} needs a container build for {', '.join(_container_steps(image))}"
            ", but neither buildah nor podman is installed. Install them (apt-get install buildah "
            "podman runc, or `scripts/images-dev up`), or keep the image to pip_install, env and "
            "add_local_python_source steps.")
    registry = os.environ.get("MCTL_IMAGE_REGISTRY", "").rstrip("/")
    # A registry base is resolved on every deploy: its tag may have moved (the digest names the
    # build), and credentials that stopped working should say so now, not when a node pulls.
    version = "latest"
    base = image.recipe.get("base") or {}
    if base.get("kind") == "registry":
        from mctl.plugins import registry_v2

        pinned = registry_v2.resolve(base["tag"], _registry_creds(base, ctx))
        ctx.say(f"image {image.image_id}: {base['tag']} is {pinned.digest}")
        version = (pinned.digest or "").split(":")[-1][:16] or "latest"
    tag = local_tag(image.image_id, version)
    ref = f"{registry}/mctl/{image.image_id}:{version}" if registry else tag
    files, env = _start_files(image, ctx, cache_dir() / "files", extract_blob)
    result = {"python": "python3", "runtime": "oci", "image": ref, "env": env, "files": files}
    if foreign_python(image):  # mctl's dependencies are in the image (see `render`)
        result["python_deps"] = "image"
    forced = bool((image.recipe.get("base") or {}).get("force_build")) or any(
        s.get("force_build") for s in image.recipe.get("steps", []))
    if not forced and _exists(tool, tag, ref, registry):
        ctx.say(f"image {image.image_id}: {ref} exists, nothing to build")
        if not registry and tool != "docker" and base.get("kind", "debian_slim") == "debian_slim":
            _ensure_python_link(tag, ctx)
        return result
    context = cache_dir() / "oci" / image.image_id
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    try:
        origins: dict[str, str] = {}
        dockerfile, build_flags = render(image, ctx, context, origins)
        (context / "Dockerfile.mctl").write_text(dockerfile)
        ctx.say(f"image {image.image_id}: building with {tool}; Dockerfile:")
        for line in dockerfile.splitlines():
            ctx.say(f"  {line}")
        argv = _build_argv(tool, tag, context, build_flags)
        ctx.run(argv, what=lambda: _failed_step(ctx.lines, origins, image.image_id, tool))
        if registry:
            push = [tool, "push"] + (["--tls-verify=false"] if tool != "docker" and _insecure(registry)
                                     else []) + [tag, ("docker://" if tool != "docker" else "") + ref]
            if tool == "docker":
                ctx.run(["docker", "tag", tag, ref], what="tagging for the registry")
                push = ["docker", "push", ref]
            ctx.run(push, what=f"pushing {ref}")
    finally:
        shutil.rmtree(context, ignore_errors=True)
        shutil.rmtree(secrets_dir(context), ignore_errors=True)
    ctx.say(f"image {image.image_id}: built {ref}")
    return result


def _insecure(registry: str) -> bool:
    from mctl.plugins.registry_v2 import insecure

    return insecure(registry.split("/", 1)[0])


def _exists(tool: str, tag: str, ref: str, registry: str) -> bool:
    import subprocess

    if registry:
        from mctl.plugins.registry_v2 import manifest_digest, parse

        try:
            return manifest_digest(parse(ref)) is not None
        except Exception:
            return False
    argv = ([tool, "inspect", "--type", "image", tag] if tool == "buildah"
            else [tool, "image", "inspect", tag])
    return subprocess.run(argv, capture_output=True).returncode == 0


def _build_argv(tool: str, tag: str, context: Path, flags: list[str]) -> list[str]:
    if tool == "docker":
        return ["docker", "build", "--network", "host", "-t", tag, "-f",
                str(context / "Dockerfile.mctl"), *[f for f in flags if not f.startswith("-v")
                                                    and not f.startswith("/")], str(context)]
    argv = [tool, "bud" if tool == "buildah" else "build", "--network", "host", "--layers",
            "-t", tag, "-f", str(context / "Dockerfile.mctl"), *flags]
    if shutil.which("runc"):  # crun fails on hosts with hybrid cgroups
        argv[2:2] = ["--runtime", "runc"]
    return argv + [str(context)]


def _failed_step(log: list[str], origins: dict[str, str], image_id: str, tool: str) -> str:
    """Which recipe step a failed build stopped at, from the last `STEP i/n: INSTRUCTION` line
    buildah and podman print (`origins`: instruction -> the step that wrote it)."""
    general = f"building image {image_id} with {tool}"
    for line in reversed(log):
        match = re.match(r"STEP \d+/\d+: (.*)", line.strip())
        if match:
            step = origins.get(match.group(1).strip())
            return f"{step} of image {image_id}" if step else general
    return general


def render(image: ImageSpec, ctx: BuildContext, context: Path,
           origins: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """The Dockerfile of a recipe, and the build flags it needs (build args, read-only mounts,
    registry credentials). `origins`, when given, gets each instruction a recipe step wrote
    mapped to a description of that step ("step 3 (run_commands: `make`)")."""
    from mctl.core.images import ImageBuildError, extract_blob, host_ca_bundle, host_pip_settings

    recipe = image.recipe
    base = recipe.get("base") or {"kind": "debian_slim"}
    flags: list[str] = []
    # The host's pip settings, with its CA bundle and find-links directories mounted read-only.
    args = host_pip_settings()
    ca = host_ca_bundle()
    if ca:
        flags += ["-v", f"{ca}:{HOST_CA_IN_BUILD}:ro"]
        args["PIP_CERT"] = HOST_CA_IN_BUILD
        args["SSL_CERT_FILE"] = HOST_CA_IN_BUILD
    for links in args.get("PIP_FIND_LINKS", "").split():
        if os.path.isdir(links):
            flags += ["-v", f"{links}:{links}:ro"]
    args.pop("PIP_REQUIRE_VIRTUALENV", None)
    for key, value in sorted(args.items()):
        flags += ["--build-arg", f"{key}={value}"]
    arg_lines = [f"ARG {key}" for key in sorted(args)]

    lines: list[str] = []
    kind = base["kind"]
    if kind == "debian_slim":
        lines.append(f"FROM {_debian_slim_base(ctx, recipe.get('python_version'))}")
        lines += PYTHON_LINK  # Modal's images have `python` (the base has python3 only)
    elif kind == "registry":
        from mctl.plugins import registry_v2

        creds = _registry_creds(base, ctx)
        pinned = registry_v2.resolve(base["tag"], creds)
        if creds:
            flags += ["--creds", f"{creds[0]}:{creds[1]}"]
        if registry_v2.insecure(pinned.registry):
            flags.append("--tls-verify=false")
        lines.append(f"FROM {pinned.pinned}")
        lines += list(base.get("setup") or [])
        if recipe.get("python_version"):
            lines.append("RUN " + add_python_script(recipe["python_version"]))
        else:  # say it at build time, not as a worker that cannot start
            lines.append("RUN command -v python3 >/dev/null 2>&1 || { echo 'mctl: this image has "
                         "no python3, which mctl runs functions with; give one with "
                         f"Image.from_registry(..., add_python=\"{host_python()}\")' >&2; "
                         "exit 1; }")
    elif kind == "dockerfile":
        extract_blob(ctx, base["context_blob"], context)
        for key, value in sorted((base.get("build_args") or {}).items()):
            flags += ["--build-arg", f"{key}={value}"]
        lines += base["dockerfile"].splitlines()
        if recipe.get("python_version"):
            lines.append("RUN " + add_python_script(recipe["python_version"]))
    elif kind == "micromamba":
        lines.append(f"FROM {_micromamba_base(recipe)}")
        if recipe.get("python_version"):
            lines.append("RUN micromamba install -y -n base " + " ".join(
                f"-c {shlex.quote(c)}" for c in _conda_channels(())) +
                f" python={shlex.quote(recipe['python_version'])} && micromamba clean -a -y")
    else:
        raise ImageBuildError(f"Image base {kind!r} cannot be built here; use Image.debian_slim, "
                              "Image.from_registry or Image.from_dockerfile.")
    # The host's pip settings reach every stage's RUN lines (ARG values are not kept in the image).
    lines = _after_each_from(lines, arg_lines)
    lines.append("ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore")
    if foreign_python(image):
        # The host's mctl environment cannot be lent to another Python version (compiled
        # dependencies): install mctl's dependencies in the image; mctl's own (pure Python)
        # package is still bound from the host when a worker starts.
        lines.append("RUN python3 -m pip install --no-input --no-cache-dir "
                     + " ".join(shlex.quote(r) for r in mctl_requirements()))
    python_path = False
    for n, step in enumerate(recipe.get("steps", []), 1):
        if origins is not None and n > 1:
            _note_origins(origins, lines, first, n - 1, recipe["steps"][n - 2])
        first = len(lines)
        kind = step["kind"]
        secret = _step_secrets(step, n, ctx, context, flags)  # "" or a RUN prefix
        if kind == "pip_install":
            from mctl.core.images import pip_args

            lines.append(f"RUN {secret}python3 -m pip install --no-input --no-cache-dir "
                         + " ".join(shlex.quote(a) for a in pip_args(step)))
        elif kind == "micromamba_install":
            if (recipe.get("base") or {}).get("kind") != "micromamba":
                raise ImageBuildError(f"Image.micromamba_install (step {n}) needs an image made "
                                      "with Image.micromamba(); this one has no micromamba.")
            channels = " ".join(f"-c {shlex.quote(c)}" for c in _conda_channels(step["channels"]))
            if step.get("spec"):
                src = f"mctl-files/{n}"
                (context / src).mkdir(parents=True, exist_ok=True)
                (context / src / "environment.yml").write_text(step["spec"])
                lines.append(f"COPY {src}/environment.yml /tmp/mctl-env-{n}.yml")
                lines.append(f"RUN micromamba install -y -n base {channels} -f "
                             f"/tmp/mctl-env-{n}.yml && rm /tmp/mctl-env-{n}.yml")
            if step["packages"]:
                lines.append(f"RUN micromamba install -y -n base {channels} "
                             + " ".join(map(shlex.quote, step["packages"])))
            lines.append("RUN micromamba clean -a -y")
        elif kind == "apt_install":
            lines.append(f"RUN {secret}apt-get update && DEBIAN_FRONTEND=noninteractive "
                         "apt-get install -y "
                         "--no-install-recommends " + " ".join(map(shlex.quote, step["packages"]))
                         + " && rm -rf /var/lib/apt/lists/*")
        elif kind in ("run_commands", "dockerfile_commands"):
            prefix = f"RUN {secret}" if kind == "run_commands" else ""
            lines += [prefix + cmd for cmd in step["commands"]]
        elif kind == "cmd":
            lines.append(f"CMD {json.dumps(step['command'])}")
        elif kind == "env":
            lines.append("ENV " + " ".join(f"{k}={json.dumps(v)}" for k, v in
                                           sorted(step["vars"].items())))
        elif kind == "workdir":
            lines.append(f"WORKDIR {step['path']}")
        elif kind == "entrypoint":
            lines.append(f"ENTRYPOINT {json.dumps(step['command'])}")
        elif kind in ("add_local_file", "add_local_dir", "add_local_python_source"):
            if not step.get("copy"):
                continue  # bound when the container starts (`_start_files`)
            src = f"mctl-files/{n}"
            extract_blob(ctx, step["blob"], context / src)
            if kind == "add_local_file":
                name = Path(step["remote_path"]).name
                lines.append(f"COPY {src}/{name} {step['remote_path']}")
            else:
                lines.append(f"COPY {src}/ {step['remote_path']}/")
            if kind == "add_local_python_source":
                python_path = True
        elif kind == "run_function":
            if foreign_python(image):
                raise ImageBuildError(
                    f"Image.run_function({step['name']}) (step {n}) cannot run in an image of "
                    f"Python {recipe.get('python_version') or 'other'}: the function travels as "
                    f"cloudpickle bytes made by Python {host_python()}, which another Python "
                    "version cannot load. Use run_commands (e.g. `python3 -c ...` or a script "
                    "added with add_local_file(copy=True)) in this image.")
            src = f"mctl-files/{n}"
            extract_blob(ctx, step["blob"], context / src)
            lines.append(f"COPY {src}/function.pkl /tmp/mctl-function-{n}.pkl")
            lines.append("RUN python3 -c 'import cloudpickle' 2>/dev/null || python3 -m pip install "
                         "--no-input -q cloudpickle")
            lines.append(f"RUN {secret}python3 -c \"import cloudpickle; f, a, k = "
                         "cloudpickle.loads("
                         f"open('/tmp/mctl-function-{n}.pkl', 'rb').read()); f(*a, **k)\" "
                         f"&& rm /tmp/mctl-function-{n}.pkl")
        else:
            raise ImageBuildError(f"Image step {kind!r} (step {n}) is unknown to the oci "
                                  "builder; upgrade mctl on the control plane.")
        if python_path:
            lines.append(f"ENV PYTHONPATH={PYTHON_SOURCE_ROOT}")
            python_path = False
    steps = recipe.get("steps", [])
    if origins is not None and steps:
        _note_origins(origins, lines, first, len(steps), steps[-1])
    return "\n".join(lines) + "\n", flags


def _note_origins(origins: dict[str, str], lines: list[str], first: int, n: int,
                  step: dict[str, Any]) -> None:
    """Map the instructions `lines[first:]` (written by recipe step `n`) to that step."""
    secret_mount = re.compile(r"^RUN (--mount=\S+ )+")
    for line in lines[first:]:
        command = secret_mount.sub("RUN ", line).removeprefix("RUN ")
        if len(command) > 200:
            command = command[:200] + "..."
        origins.setdefault(line.strip(), f"step {n} ({step['kind']}: `{command}`)")


def add_python_script(version: str) -> str:
    """A shell script that gives an image `python3` of `version` (with pip), or fails saying why.

    It uses what the image has first: a `python3` of that version, or a `python<version>` to
    link as python3. Otherwise it installs the distribution's own Python with its package
    manager (apt-get, apk, dnf or microdnf) and checks the version it got: a distribution ships
    one Python per release, and no portable Python build can be fetched on machines like these
    (mctl downloads none). Tested on Debian images; the apk and dnf branches are not (no Alpine
    or Fedora base can be had offline here)."""
    want = shlex.quote(version)
    return " ".join(f"""
        set -e; want={want};
        v() {{ "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true; }};
        have() {{ command -v python3 >/dev/null && [ "$(v python3)" = "$want" ]; }};
        if ! have && command -v "python$want" >/dev/null; then
            ln -sf "$(command -v "python$want")" /usr/local/bin/python3; fi;
        if ! have || ! python3 -m pip --version >/dev/null 2>&1; then
            if command -v apt-get >/dev/null; then
                apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q
                --no-install-recommends python3 python3-pip python3-venv ca-certificates
                && rm -rf /var/lib/apt/lists/*;
            elif command -v apk >/dev/null; then apk add --no-cache python3 py3-pip;
            elif command -v dnf >/dev/null; then dnf install -y python3 python3-pip && dnf clean all;
            elif command -v microdnf >/dev/null; then
                microdnf install -y python3 python3-pip && microdnf clean all;
            else echo "mctl add_python: the image has no python3 $want and no apt-get, apk or dnf
                to install one with; use an image with Python $want." >&2; exit 1; fi; fi;
        if ! have; then echo "mctl add_python: this image's distribution provides Python
            $(v python3 | grep . || echo none), not $want; use add_python=\"$(v python3)\",
            Image.debian_slim(python_version=\"$want\"), or an image that has Python $want."
            >&2; exit 1; fi
        """.split())


def _step_secrets(step: dict[str, Any], n: int, ctx: BuildContext, context: Path,
                  flags: list[str]) -> str:
    """A step's named secrets as a build secret (`--secret`, mounted only while its RUN lines
    run, never in a layer): returns the RUN prefix that exports them, or ""."""
    import re

    from mctl.exception import InvalidError

    names = step.get("secrets") or []
    if not names:
        return ""
    values: dict[str, str] = {}
    for name in names:
        got = ctx.resolve_secret(name)
        if got is None:
            raise InvalidError(f"Secret {name!r} (step {n}, {step['kind']}) does not exist; "
                               f"create it with `mctl secret create {name} KEY=VALUE`.")
        values.update(got)
    bad = [k for k in values if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
    if bad:
        raise InvalidError(f"Secret key {bad[0]!r} (step {n}) is not a valid environment "
                           "variable name.")
    where = secrets_dir(context)
    where.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = where / f"step-{n}.env"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(values.items())))
    flags += ["--secret", f"id=mctl-step-{n},src={path}"]
    target = f"/run/secrets/mctl-step-{n}"
    return f"--mount=type=secret,id=mctl-step-{n},target={target} . {target} && "


def secrets_dir(context: Path) -> Path:
    """Where a build's secret files wait (outside its context, removed after the build)."""
    return context.with_name(context.name + ".secrets")


def _after_each_from(lines: list[str], extra: list[str]) -> list[str]:
    out: list[str] = []
    for line in lines:
        out.append(line)
        if line.strip().upper().startswith("FROM "):
            out += extra
    return out


# `python` -> python3 in a debian_slim image, as in Modal's (and the default sandbox image, see
# server/sandboxes._default_image); a layer the build cache shares between images of one base.
PYTHON_LINK = ["RUN [ -e /usr/bin/python ] || ln -s python3 /usr/bin/python",
               "LABEL mctl.python=python3"]


def _ensure_python_link(tag: str, ctx: BuildContext) -> None:
    """A debian_slim image built here before they had `python` (no mctl.python label) gets the
    link as one small layer on the same tag: seconds once, not a rebuild of its steps."""
    import io
    import subprocess
    import tarfile
    import tempfile

    label = subprocess.run(["podman", "image", "inspect", "-f",
                            '{{index .Labels "mctl.python"}}', tag], capture_output=True, text=True)
    if label.returncode != 0 or label.stdout.strip() or not shutil.which("buildah"):
        return
    ctr = subprocess.run(["buildah", "from", "--pull=never", tag], capture_output=True, text=True)
    if ctr.returncode != 0:
        return
    name = ctr.stdout.strip()
    try:
        with tempfile.NamedTemporaryFile(suffix=".tar") as tmp:
            with tarfile.open(tmp.name, "w") as tar:
                link = tarfile.TarInfo("usr/bin/python")
                link.type, link.linkname = tarfile.SYMTYPE, "python3"
                tar.addfile(link, io.BytesIO(b""))
            for argv in (["buildah", "add", name, tmp.name, "/"],
                         ["buildah", "config", "--label", "mctl.python=python3", name],
                         ["buildah", "commit", "-q", name, tag]):
                if subprocess.run(argv, capture_output=True).returncode != 0:
                    return
        ctx.say(f"image {tag}: added python -> python3 (built before debian_slim images had it)")
    finally:
        subprocess.run(["buildah", "rm", name], capture_output=True)


def _debian_slim_base(ctx: BuildContext, version: str | None) -> str:
    """The base of `debian_slim(python_version=version)`, made from Debian's packages if missing
    (see `debian_slim_base`)."""
    from mctl.plugins import debian_slim_base

    tag, suite = debian_slim_base.base_for(version)
    debian_slim_base.ensure(tag, suite, run_tool() or build_tool() or "podman", ctx)
    return tag


def host_python() -> str:
    import sys

    return f"{sys.version_info.major}.{sys.version_info.minor}"


def foreign_python(image: ImageSpec) -> bool:
    """True when the image's Python is declared and is not the version mctl runs on here."""
    version = image.recipe.get("python_version")
    base = image.recipe.get("base") or {"kind": "debian_slim"}
    if version is None and base.get("kind") == "debian_slim":
        from mctl.plugins.debian_slim_base import DEFAULT_PYTHON

        version = DEFAULT_PYTHON
    return version is not None and version != host_python()


def mctl_requirements() -> list[str]:
    """mctl's own runtime dependencies, as declared (extras left out)."""
    from importlib.metadata import requires

    return [r for r in requires("mctl") or [] if "extra ==" not in r]


def _micromamba_base(recipe: dict[str, Any]) -> str:
    """The image `Image.micromamba()` starts from: MCTL_IMAGE_BASE_MICROMAMBA (an image that has
    `micromamba` on its PATH, e.g. a copy of mambaorg/micromamba in the site's registry)."""
    from mctl.core.images import ImageBuildError

    base = os.environ.get("MCTL_IMAGE_BASE_MICROMAMBA")
    if not base:
        raise ImageBuildError(
            "Image.micromamba() needs a base image with micromamba and a conda channel the "
            "build can reach, and this control plane has neither: micromamba and conda are not "
            "in Debian's packages or on PyPI, and conda channels (conda-forge) are not reachable "
            "from machines like these. Set MCTL_IMAGE_BASE_MICROMAMBA to an image with "
            "micromamba and MCTL_CONDA_CHANNELS to your channel mirror, or use "
            "Image.debian_slim(python_version=...) with pip_install and apt_install.")
    return base


def _conda_channels(channels: Any) -> list[str]:
    """A step's channels, else MCTL_CONDA_CHANNELS (comma-separated; a site's mirror)."""
    configured = [c for c in os.environ.get("MCTL_CONDA_CHANNELS", "").split(",") if c.strip()]
    return list(channels) or [c.strip() for c in configured]


def _registry_creds(base: dict[str, Any], ctx: BuildContext) -> tuple[str, str] | None:
    from mctl.exception import InvalidError

    name = base.get("secret")
    if not name:
        return None
    values = ctx.resolve_secret(name)
    if values is None:
        raise InvalidError(f"Secret {name!r} (the credentials of {base['tag']}) does not exist; "
                           f"create it with `mctl secret create {name} REGISTRY_USERNAME=... "
                           "REGISTRY_PASSWORD=...`.")
    user, password = values.get("REGISTRY_USERNAME"), values.get("REGISTRY_PASSWORD")
    if not user or not password:
        raise InvalidError(f"Secret {name!r} needs the keys REGISTRY_USERNAME and "
                           "REGISTRY_PASSWORD for registry credentials.")
    return user, password


def _start_files(image: ImageSpec, ctx: BuildContext, root: Path, extract: Any
                 ) -> tuple[list[list[str]], dict[str, str]]:
    """copy=False files: extracted once on this host, bound read-only when a container starts."""
    files: list[list[str]] = []
    env: dict[str, str] = {}
    sources: list[str] = []
    for step in image.recipe.get("steps", []):
        if step["kind"] not in ("add_local_file", "add_local_dir", "add_local_python_source") \
                or step.get("copy"):
            continue
        where = root / step["blob"]
        if not where.exists():
            tmp = root / (step["blob"] + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            extract(ctx, step["blob"], tmp)
            os.replace(tmp, where)
        if step["kind"] == "add_local_file":
            name = Path(step["remote_path"]).name
            files.append([str(where / name), step["remote_path"]])
        elif step["kind"] == "add_local_dir":
            files.append([str(where), step["remote_path"]])
        else:
            inside = f"{MOUNTED_SOURCE_ROOT}/{step['blob']}"
            files.append([str(where), inside])
            sources.append(inside)
    if sources:
        env["PYTHONPATH"] = ":".join([*sources, PYTHON_SOURCE_ROOT])
    return files, env


@mctl.hookimpl
def mctl_register_image_builders():
    yield ImageBuilder(name="oci", build=build, handles=handles)
