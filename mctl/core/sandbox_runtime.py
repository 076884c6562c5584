"""How a sandbox is isolated: the podman argv that starts one and the one that runs a command in it.

A sandbox runs untrusted code, so it is never a plain process. In order of preference:

- `gvisor`: podman with gVisor's `runsc` as the OCI runtime (a user-space kernel between the code
  and the host). Debian's runsc only works here with `--runtime-flag network=none`, so a sandbox
  that asks for network (ports, `block_network=False`) cannot use it and falls back to runc.
- `runc`: podman with runc, plus a user namespace (root inside is an unprivileged uid outside).
- `bwrap`: bubblewrap, for an image-less sandbox where podman is missing (`core/sandbox_bwrap`:
  the host's /usr read-only, an unprivileged uid of its own, every namespace, seccomp, cgroups).

A sandbox with network gets runc. With a `cidr_allowlist` (Modal's meaning: outbound traffic only
to those networks) its container is created and initialised but not started (`podman create`,
`podman init`: the runtime waits before the main command's exec, so no code of the sandbox has
run), firewall rules are loaded into its network namespace from the host (`allowlist_rules`,
`apply_allowlist`), and only then is it started. The network namespace belongs to the host's
user namespace, so even root inside the sandbox has no CAP_NET_ADMIN over it.

Both get the same restrictions: a non-root user inside, every capability dropped,
`no-new-privileges`, the image read-only below a writable copy-on-write scratch layer (the
container's own layer, thrown away with it), only the declared mounts (read-only unless asked),
and cpu, memory and pids limits. No runtime that isolates → `SandboxIsolationError`, never an
unisolated process. `MCTL_SANDBOX_ISOLATION` (gvisor | runc | bwrap) or `isolation=` picks one.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

from mctl.exception import InvalidError

RUNSC = os.environ.get("MCTL_RUNSC", "/usr/bin/runsc")
# gvisor and runc run under podman; bwrap (core/sandbox_bwrap) runs image-less sandboxes on the
# host's own /usr where podman is missing, on the control plane's host only
ISOLATIONS = ("gvisor", "runc", "bwrap")
PODMAN_ISOLATIONS = ("gvisor", "runc")
# The uid and gid code runs as inside (nobody): not root, even in the sandbox's own namespace.
SANDBOX_USER = "65534:65534"
# Root inside a runc sandbox is this uid outside (a user namespace of 65536 ids).
USERNS_BASE = 200000
DEFAULT_MEMORY_MB = 1024
DEFAULT_CPU = 1.0
DEFAULT_PIDS = 512
# gVisor's own threads (and, on its ptrace platform, a host stub per guest process) count against
# the host pids cgroup: its limit must leave them room (256 crashed the sandbox at 64 guest tasks).
GVISOR_PIDS_SLACK = 1024
DEFAULT_IMAGE = "localhost/mctl/debian-slim:bookworm"
LABEL = "mctl.sandbox"


class SandboxIsolationError(InvalidError):
    """No runtime on this machine can isolate a sandbox."""


@dataclass
class SandboxConfig:
    """What a backend needs to start one sandbox (all of it JSON-able, kept in the store)."""

    sandbox_id: str
    image: str
    command: list[str] = field(default_factory=list)
    workdir: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    cpu: float | None = None
    memory_mb: int | None = None
    pids: int | None = None
    block_network: bool = True
    ports: list[int] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)  # host_path, path, read_only
    isolation: str | None = None  # requested; None: the best available
    idle_timeout: int | None = None  # seconds without activity before the control plane ends it
    pty: dict[str, Any] | None = None  # the main command on a terminal: rows, cols, term...
    # Outbound traffic only to these networks (normalised by `normalize_cidrs`); None: no
    # allowlist (all or nothing, as block_network says); []: no outbound traffic, ports still work
    cidr_allowlist: list[str] | None = None
    gpu: str | None = None  # `gpu=` as asked ("A100:1", "any"); the devices come from CDI

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SandboxConfig:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def container_name(sandbox_id: str) -> str:
    return "mctl-" + sandbox_id.lower().replace("_", "-")


@functools.lru_cache(maxsize=None)
def _have(path_or_name: str) -> bool:
    return bool(shutil.which(path_or_name)) or os.access(path_or_name, os.X_OK)


def runc_path() -> str | None:
    for p in ("/usr/sbin/runc", "/usr/bin/runc"):
        if os.access(p, os.X_OK):
            return p
    return shutil.which("runc")


# `runsc flags` lists `-nvproxy` in releases from 2023 on; gVisor passes NVIDIA GPUs to a
# sandbox only with it (`--runtime-flag nvproxy=true`). Debian bookworm's runsc (20221219) has not.
def nvproxy_check() -> str:
    """The shell test, on a node, that its runsc has nvproxy (the job script of a Slurm GPU
    sandbox under gVisor runs it)."""
    import shlex

    return f"{shlex.quote(RUNSC)} flags 2>&1 | grep -q -- '-nvproxy\\b'"


@functools.lru_cache(maxsize=None)
def runsc_nvproxy() -> bool:
    """Whether this host's runsc can pass GPUs to a sandbox (it has the nvproxy flag)."""
    if not os.access(RUNSC, os.X_OK):
        return False
    try:
        out = subprocess.run([RUNSC, "flags"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return bool(re.search(r"-nvproxy\b", out.stdout + out.stderr))


def gpu_count(cfg: SandboxConfig) -> int:
    """How many GPUs `cfg` asks for (0: none)."""
    if not cfg.gpu:
        return 0
    from mctl.core.spec import GpuRequest

    request = GpuRequest.parse(cfg.gpu)
    return request.count if request is not None else 0


def gvisor_gpu_problem(host: str | None = None) -> str:
    """Why a GPU sandbox cannot run under gVisor on `host` (default: this one), and what to
    do."""
    return (f"gVisor passes GPUs to a sandbox only through runsc's nvproxy, and {RUNSC} on "
            f"{host or os.uname().nodename} has no nvproxy flag (a runsc release from 2023 or later has "
            "it; Debian bookworm's 20221219 has not). Use isolation='runc' (the default for a "
            "GPU sandbox where runsc lacks nvproxy), or install a newer runsc.")


def available() -> list[str]:
    """The isolations this machine offers, best first."""
    out = []
    if _have("podman"):
        if os.access(RUNSC, os.X_OK):
            out.append("gvisor")
        if runc_path():
            out.append("runc")
    from mctl.core import sandbox_bwrap

    if sandbox_bwrap.problem() is None:
        out.append("bwrap")
    return out


def wanted_isolation(isolation: str | None) -> str | None:
    """The isolation asked for (`isolation=`, else MCTL_SANDBOX_ISOLATION), checked."""
    wanted = isolation or os.environ.get("MCTL_SANDBOX_ISOLATION") or None
    if wanted is not None and wanted not in ISOLATIONS:
        raise InvalidError(f"Unknown sandbox isolation {wanted!r}; use one of "
                           f"{', '.join(ISOLATIONS)}.")
    return wanted


def image_less_bwrap(isolation: str | None, has_image: bool) -> bool:
    """Whether a sandbox gets bwrap: asked for, or image-less on a host whose podman cannot
    run one (then its image is "" and `choose` says bwrap)."""
    wanted = wanted_isolation(isolation)
    if wanted == "bwrap":
        return True
    if wanted is not None or has_image:
        return False
    have = available()
    return "bwrap" in have and not [i for i in have if i != "bwrap"]


def choose(cfg: SandboxConfig) -> str:
    """The isolation `cfg` gets; raises SandboxIsolationError when none can run it."""
    wanted = wanted_isolation(cfg.isolation)
    have = available()
    needs_network = bool(cfg.ports) or not cfg.block_network or cfg.cidr_allowlist is not None
    if wanted == "bwrap" or not cfg.image:  # image-less: bubblewrap on the host's /usr
        from mctl.core import sandbox_bwrap

        try:
            sandbox_bwrap.check(cfg)
        except SandboxIsolationError as exc:
            if wanted == "bwrap":
                raise
            raise SandboxIsolationError(
                "Only bubblewrap can isolate a sandbox on this machine (no podman with runsc "
                f"or runc), and {exc}") from None
        if "bwrap" in have:
            return "bwrap"
        raise SandboxIsolationError(f"bwrap sandboxes cannot run here: "
                                    f"{sandbox_bwrap.problem()}.")
    candidates = [wanted] if wanted else list(PODMAN_ISOLATIONS)
    if needs_network and "gvisor" in candidates and len(candidates) > 1:
        candidates.remove("gvisor")  # Debian's runsc runs here only with network=none
    if cfg.gpu and "gvisor" in candidates and "gvisor" in have and not runsc_nvproxy():
        if wanted == "gvisor":
            raise SandboxIsolationError(gvisor_gpu_problem())
        candidates.remove("gvisor")  # GPUs under gVisor need nvproxy: runc instead
    for iso in candidates:
        if iso in have and not (iso == "gvisor" and needs_network):
            return iso
    if wanted == "gvisor" and needs_network and "gvisor" in have:
        raise SandboxIsolationError(
            "gVisor sandboxes cannot have network on this machine (runsc runs only with "
            "network=none); drop the ports, block_network=False and cidr_allowlist, or use "
            "isolation='runc'.")
    if not wanted and "bwrap" in have:
        raise SandboxIsolationError(
            "Only bubblewrap can isolate a sandbox on this machine (no podman with runsc or "
            "runc), and it runs image-less sandboxes without network only: drop image=, "
            "block_network=False, ports and cidr_allowlist, or install podman "
            "(`scripts/sandbox-dev install`).")
    raise SandboxIsolationError(
        "No runtime on this machine can isolate a sandbox "
        f"({'wanted ' + wanted + '; ' if wanted else ''}found: {', '.join(have) or 'none'}). "
        "Install podman with runsc (gVisor) or runc: `scripts/sandbox-dev install`.")


def poolable(cfg: SandboxConfig) -> bool:
    """Whether a warm container started ahead of time can serve `cfg`: the default shape (no
    command, the default image, no env, mounts, ports or network, default limits)."""
    return (not cfg.command and not cfg.env and not cfg.mounts and not cfg.ports
            and cfg.pty is None and not cfg.gpu
            and cfg.block_network and cfg.cidr_allowlist is None and cfg.workdir is None
            and cfg.cpu is None and cfg.memory_mb is None and cfg.pids is None)


# gVisor's runtime as podman calls it: Debian's runsc has no `exec --tty` flag (the terminal is
# already in the process spec podman passes, with --console-socket), and podman 4 passes one for
# `podman exec -t`. This wrapper drops that one flag and runs runsc with the rest, so a
# terminal (`exec(pty=True)`) works in gVisor sandboxes. Written where the runtime's state lives
# (/run: gone at a reboot, with the containers that name it).
RUNSC_TTY_SCRIPT = """#!/bin/sh
# mctl: runsc without exec's --tty flag (core/sandbox_runtime.py, RUNSC_TTY_SCRIPT)
for a in "$@"; do shift; [ "$a" = --tty ] && continue; set -- "$@" "$a"; done
exec {runsc} "$@"
"""


def runtime_dir() -> str:
    """Where mctl keeps the runsc wrapper and the stdin FIFOs on a sandbox's host (the control
    plane's, or a Slurm node running as the same user): /run/mctl for root, else the user's
    runtime directory ($XDG_RUNTIME_DIR/mctl, or /tmp/mctl-<uid>). Gone at a reboot, with the
    containers that use it."""
    uid = os.geteuid()
    if uid == 0:
        return "/run/mctl"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(xdg, "mctl") if xdg else f"/tmp/mctl-{uid}"


def _private_dir(path: str) -> bool:
    """Whether `path` is a directory of ours that no one else may write (a runtime that podman
    runs must not be someone else's file)."""
    import stat

    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
            and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def runsc_tty_path() -> str:
    """Where the runsc wrapper lives on a host (the control plane's, or a Slurm node)."""
    return os.path.join(runtime_dir(),
                        f"runsc-tty-{hashlib.sha256(RUNSC.encode()).hexdigest()[:8]}")


def runsc_tty_script() -> str:
    return RUNSC_TTY_SCRIPT.format(runsc=RUNSC)


def ensure_runsc_tty() -> str:
    """Write the runsc wrapper on this host if it is missing; its path (RUNSC itself when it
    cannot be written: everything but a terminal in a gVisor sandbox still works)."""
    path = runsc_tty_path()
    body = runsc_tty_script()
    try:
        os.makedirs(os.path.dirname(path), mode=0o755 if os.geteuid() == 0 else 0o700,
                    exist_ok=True)
    except OSError:
        return RUNSC
    if not _private_dir(os.path.dirname(path)):
        return RUNSC
    try:
        with open(path) as fh:
            if fh.read() == body:
                return path
    except OSError:
        pass
    try:
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(body)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
        return path
    except OSError:
        return RUNSC


# The main command's stdin (`sb.stdin`). The container runs with `podman run -i`; its stdin is
# fed from a FIFO on the sandbox's host (`stdin_fifo`), kept open by a holder process that has it
# open for reading and writing (so writers come and go without the command seeing an end). Each
# `sb.stdin` connection writes into the FIFO (`STDIN_WRITE_SCRIPT`); `write_eof` ends the holder
# and the other writers (`STDIN_EOF_SCRIPT`): the reader sees the end and closes the container's
# stdin. The holder is its own process, not the control plane's: a restart of the
# control plane loses nothing. Locally the reader is `podman attach` (`STDIN_HOLD_SCRIPT`); in a
# Slurm job it is the job's own foreground `podman run -i` (plugins/sandbox_slurm).
STDIN_HOLD_SCRIPT = (
    'mkdir -p -m 700 "${1%/*}" && rm -f "$1" "$1.pid"; mkfifo -m 600 "$1" || exit 1; exec 3<>"$1"; echo $$ > "$1.pid"; '
    'podman attach --sig-proxy=false --detach-keys "" "$2" <"$1" >/dev/null 2>&1 3>&-; '
    'rm -f "$1" "$1.pid" "$1.writers"')
STDIN_CLOSED = 75  # the exit code of STDIN_WRITE_SCRIPT when stdin is closed
STDIN_WRITE_SCRIPT = (
    f'[ -p "$1" ] && kill -0 "$(cat "$1.pid" 2>/dev/null)" 2>/dev/null || exit {STDIN_CLOSED}; '
    'echo $$ >> "$1.writers"; echo ready; exec cat > "$1"')
# The end for every writer: the holder, and the other connections' writers (what they still
# hold is dropped, as after a close); the caller's own writer has finished first.
STDIN_EOF_SCRIPT = ('kill "$(cat "$1.pid" 2>/dev/null)" $(cat "$1.writers" 2>/dev/null) '
                    '2>/dev/null; rm -f "$1" "$1.pid" "$1.writers"; exit 0')


def stdin_fifo(container: str) -> str:
    """The FIFO that feeds a sandbox's main command, on the host where it runs."""
    return os.path.join(runtime_dir(), f"stdin-{container}")


def run_argv(cfg: SandboxConfig, isolation: str, name: str | None = None,
             labels: dict[str, str] | None = None, timeout_s: int | None = None,
             runsc: str | None = None) -> list[str]:
    """`podman run -d ...` for one sandbox under `isolation` (container `name`, default from
    the sandbox id). `timeout_s`: conmon kills the container then, whoever watches or not (the
    control plane ends it at its own timeout first; this is the net under a crashed one).
    A main command gets `-i` (its stdin is kept open for `sb.stdin`). `runsc`: gVisor's runtime
    path on the host that runs it (default: this host's wrapper, `ensure_runsc_tty`)."""
    pids = cfg.pids or DEFAULT_PIDS
    memory = cfg.memory_mb or DEFAULT_MEMORY_MB
    argv = ["podman", "run", "-d", "--name", name or container_name(cfg.sandbox_id),
            "--label", f"{LABEL}={cfg.sandbox_id}", "--pull", "never",
            "--user", SANDBOX_USER, "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges",
            "--memory", f"{memory}m", "--memory-swap", f"{memory}m",
            "--cpus", str(cfg.cpu or DEFAULT_CPU),
            "--env", "HOME=/tmp", "--hostname", "sandbox",
            "--log-driver", "k8s-file",
            # catatonit as pid 1: orphans are reaped, so a fork bomb's zombies free their pids
            "--init"]
    if cfg.command:
        argv.insert(3, "-i")
        if cfg.pty is not None:
            argv.insert(4, "-t")
    if isolation == "gvisor":
        argv += ["--runtime", runsc or ensure_runsc_tty(), "--runtime-flag", "network=none",
                 "--network", "none",
                 # gVisor's sentry threads are host tasks: leave them room above the code's own.
                 "--pids-limit", str(2 * pids + GVISOR_PIDS_SLACK)]
        if cfg.gpu:  # GPUs through gVisor's nvproxy (the devices: containers.GPU_SCRIPT)
            argv[argv.index("--runtime-flag") + 2:argv.index("--runtime-flag") + 2] = [
                "--runtime-flag", "nvproxy=true"]
    elif isolation == "runc":
        argv += ["--runtime", runc_path() or "runc", "--pids-limit", str(pids),
                 "--uidmap", f"0:{USERNS_BASE}:65536", "--gidmap", f"0:{USERNS_BASE}:65536"]
        if cfg.block_network and not cfg.ports and cfg.cidr_allowlist is None:
            argv += ["--network", "none"]
        else:
            argv += ["--network", "bridge"]
            for port in cfg.ports:
                argv += ["-p", f"127.0.0.1::{int(port)}"]
    else:
        raise SandboxIsolationError(f"Unknown isolation {isolation!r}.")
    if timeout_s:
        argv += ["--timeout", str(int(timeout_s))]
    for key, value in (labels or {}).items():
        argv += ["--label", f"{key}={value}"]
    for m in cfg.mounts:
        ro = ",ro" if m.get("read_only", True) else ""
        argv += ["--mount", f"type=bind,source={m['host_path']},destination={m['path']}{ro}"]
    if cfg.workdir:
        argv += ["--workdir", cfg.workdir]
    for key in sorted(cfg.env):
        argv += ["--env", key]  # the value comes from podman's own environment
    if cfg.command and cfg.pty is not None:
        from mctl.core import terminal

        for key, value in sorted(terminal.pty_env(cfg.pty).items()):
            argv += ["--env", f"{key}={value}"]  # TERM and friends: no secrets
        argv.append(cfg.image)
        # podman gives a detached terminal no size (0x0): the command's shell sets it first
        # (the image needs /bin/sh and stty, as Debian's have)
        argv += ["/bin/sh", "-c", 'stty rows "$1" cols "$2" 2>/dev/null; shift 2; exec "$@"',
                 "sh", str(int(cfg.pty.get("rows") or terminal.DEFAULT_ROWS)),
                 str(int(cfg.pty.get("cols") or terminal.DEFAULT_COLS))]
    else:
        argv.append(cfg.image)
    # The user's command through FIND_COMMAND: a missing one says "CMD: command not found" (127),
    # not catatonit's "failed to exec pid1" (1). The shell execs it: same pid, same tree.
    argv += ([*FIND_COMMAND, *cfg.command] if cfg.command else ["sleep", "infinity"])
    return argv


# Runs "$@" after finding its command: a shell's message and code (127) when it is missing.
FIND_COMMAND = ["/bin/sh", "-c", 'command -v "$1" >/dev/null 2>&1 || { echo "$1: command not '
                'found" >&2; exit 127; }; exec "$@"', "sh"]


def create_argv(cfg: SandboxConfig, isolation: str, name: str | None = None,
                labels: dict[str, str] | None = None, timeout_s: int | None = None) -> list[str]:
    """`podman create ...`: `run_argv` without starting the container, for a sandbox whose
    network namespace gets its firewall (`apply_allowlist`) before any of its code runs."""
    argv = run_argv(cfg, isolation, name=name, labels=labels, timeout_s=timeout_s)
    return ["podman", "create", *argv[3:]]


# --- cidr_allowlist: outbound traffic only to some networks --------------------------------------
def normalize_cidrs(cidrs: Any) -> list[str]:
    """`cidr_allowlist` as networks in canonical form ("10.1.2.3/8" → "10.0.0.0/8", a bare
    address → /32 or /128), duplicates dropped; InvalidError for anything else. The result is
    the only form that reaches the firewall rules."""
    if isinstance(cidrs, (str, bytes)) or not isinstance(cidrs, (list, tuple)):
        raise InvalidError("cidr_allowlist takes a list of networks, e.g. ['10.0.0.0/8', "
                           f"'2001:db8::/32'], not {type(cidrs).__name__} {cidrs!r}.")
    out: list[str] = []
    for cidr in cidrs:
        if not isinstance(cidr, str):
            raise InvalidError(f"cidr_allowlist: {cidr!r} is not a string; write each network "
                               "as a string such as '203.0.113.0/24'.")
        try:
            net = str(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError as exc:
            raise InvalidError(f"cidr_allowlist: {cidr!r} is not an IPv4 or IPv6 network "
                               f"({exc}); write an address with a prefix length, such as "
                               "'203.0.113.0/24' or '2001:db8::/32' (a domain name is not "
                               "accepted).") from None
        if net not in out:
            out.append(net)
    return out


def allowlist_rules(cidrs: list[str], version: int) -> str:
    """The `iptables-restore` (version 4) or `ip6tables-restore` (6) input that lets the
    sandbox's network namespace send only to `cidrs` (of that version), to itself (loopback) and
    as part of connections already allowed (replies to tunnels and to allowed destinations);
    everything else it sends is rejected at once (EHOSTUNREACH, "No route to host"), not left
    to time out. Inbound traffic (published ports) is not filtered: Modal's allowlist is
    outbound only."""
    nets = [n for n in normalize_cidrs(cidrs) if ipaddress.ip_network(n).version == version]
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT DROP [0:0]",
             "-A OUTPUT -o lo -j ACCEPT",
             "-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"]
    if version == 6:  # neighbour discovery: without it no IPv6 address on the link answers
        lines += [f"-A OUTPUT -p ipv6-icmp --icmpv6-type {t} -j ACCEPT"
                  for t in ("router-solicitation", "neighbour-solicitation",
                            "neighbour-advertisement")]
    lines += [f"-A OUTPUT -d {net} -j ACCEPT" for net in nets]
    reject = "icmp-admin-prohibited" if version == 4 else "icmp6-adm-prohibited"
    lines += [f"-A OUTPUT -j REJECT --reject-with {reject}", "COMMIT", ""]
    return "\n".join(lines)


def _sbin(name: str) -> str | None:
    for d in ("/usr/sbin", "/sbin", "/usr/bin"):
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return shutil.which(name)


def allowlist_tools() -> str | None:
    """What this host lacks to enforce a cidr_allowlist (None: nothing)."""
    missing = [t for t in ("nsenter", "iptables-restore", "ip6tables-restore", "iptables-save")
               if _sbin(t) is None]
    if missing:
        return (f"cidr_allowlist needs {', '.join(missing)} on {os.uname().nodename} (Debian: "
                "apt-get install iptables util-linux)")
    return None


def apply_allowlist(netns: str, cidrs: list[str]) -> None:
    """Load the allowlist's rules into the network namespace `netns` (a path: podman's
    SandboxKey, or /proc/<pid>/ns/net) and check they are there. Fails closed: any error raises
    SandboxIsolationError, and the caller removes the container instead of starting it."""
    problem = allowlist_tools()
    if problem:
        raise SandboxIsolationError(problem + "; or create the sandbox without it.")
    enter = [_sbin("nsenter") or "nsenter", f"--net={netns}"]

    def run(argv: list[str], data: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(enter + argv, input=data, capture_output=True, text=True,
                              timeout=30)

    for version, tool in ((4, "iptables-restore"), (6, "ip6tables-restore")):
        done = run([_sbin(tool) or tool], allowlist_rules(cidrs, version))
        if done.returncode != 0:
            if version == 6 and run(["/bin/cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6"]
                                    ).returncode != 0:
                continue  # a kernel without IPv6: nothing to filter
            raise SandboxIsolationError(
                f"Could not apply cidr_allowlist to the sandbox's network ({tool}: "
                f"{done.stderr.strip()[-400:]}); the sandbox was not started.")
    saved = run([_sbin("iptables-save") or "iptables-save", "-t", "filter"])
    if saved.returncode != 0 or ":OUTPUT DROP" not in saved.stdout:
        raise SandboxIsolationError("The cidr_allowlist rules did not hold in the sandbox's "
                                    "network namespace; the sandbox was not started.")


def allowlist_script(cidrs: list[str], container: str) -> list[str]:
    """Shell lines that do `apply_allowlist` for the created container `$name` (`container`)
    on a node (the Slurm job script): exit 125 with a message on any failure."""
    lines = [f"netns=$(podman inspect -f '{{{{.NetworkSettings.SandboxKey}}}}' {container}) "
             "&& [ -n \"$netns\" ] || { echo \"mctl: no network namespace for the sandbox on "
             "$(hostname)\" >&2; exit 125; }",
             "PATH=$PATH:/usr/sbin:/sbin",
             "for t in nsenter iptables-restore ip6tables-restore iptables-save; do "
             "command -v $t >/dev/null || { echo \"mctl: "
             "cidr_allowlist needs $t on $(hostname) (apt-get install iptables util-linux)\" "
             ">&2; exit 125; }; done"]
    fail = "{ echo \"mctl: could not apply cidr_allowlist (%s) on $(hostname)\" >&2; exit 125; }"
    for version, tool in ((4, "iptables-restore"), (6, "ip6tables-restore")):
        rules = allowlist_rules(cidrs, version)  # canonical CIDRs only: no quote in it
        load = f"printf '%s' '{rules}' | nsenter --net=\"$netns\" {tool}"
        if version == 4:
            lines.append(f"{load} || {fail % tool}")
        else:  # a kernel without IPv6 has nothing to filter
            lines.append(f"if ! {load}; then nsenter --net=\"$netns\" cat "
                         "/proc/sys/net/ipv6/conf/all/disable_ipv6 >/dev/null 2>&1 && "
                         f"{fail % tool}; fi")
    lines.append("nsenter --net=\"$netns\" iptables-save -t filter "
                 "| grep -q '^:OUTPUT DROP' || { echo \"mctl: the cidr_allowlist rules did not "
                 "hold on $(hostname)\" >&2; exit 125; }")
    return lines


RUNC_ROOT = "/run/runc"  # where podman's runc keeps its containers' state (root's default)


def runc_netns(container_id: str) -> str | None:
    """/proc/<pid>/ns/net of a runc container's init process (also while `podman init` holds
    it before the main command), from runc's state file; None when it is not there."""
    import json

    if not container_id or "/" in container_id:
        return None
    try:
        with open(os.path.join(RUNC_ROOT, container_id, "state.json")) as f:
            pid = int(json.load(f)["init_process_pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path = f"/proc/{pid}/ns/net"
    return path if pid > 0 and os.path.exists(path) else None


def _direct_exec(isolation: str | None, container_id: str | None) -> list[str] | None:
    """The runtime command that can exec in this container without podman, if any."""
    if not container_id:
        return None
    if isolation == "gvisor" and os.access(RUNSC, os.X_OK):
        return [RUNSC]
    runc = runc_path()
    if isolation == "runc" and runc and os.path.isdir(os.path.join(RUNC_ROOT, container_id)):
        return [runc, "--root", RUNC_ROOT]
    return None


# An exec with a timeout runs with `MCTL_EXEC_ID=<token>` in its environment: the timeout kills
# every process in the sandbox whose /proc/PID/environ holds it (the command and what it started),
# found from a second exec; no pid file is left in the sandbox's /tmp (or in its snapshots).
MARKER_ENV = "MCTL_EXEC_ID"


def exec_marker() -> str:
    """A fresh token for `exec_argv(marker=...)`."""
    import secrets

    return secrets.token_hex(8)


def kill_marked_command(marker: str) -> list[str]:
    """The command to run inside the sandbox (an exec of its own) that SIGKILLs the processes
    of the exec started with `marker`. It names the token only in its argv, so it never
    matches itself; it runs twice over, for a child forked while the first pass ran."""
    if not re.fullmatch(r"[0-9a-f]+", marker):
        raise ValueError(f"bad exec marker {marker!r}")
    needle = f"{MARKER_ENV}={marker}"
    return ["/bin/sh", "-c",
            'for _ in 1 2; do for d in /proc/[0-9]*; do '
            f'grep -qa "{needle}" "$d/environ" 2>/dev/null && kill -KILL "${{d#/proc/}}" '
            '2>/dev/null; done; done; exit 0']


def exec_argv(container: str, cmd: list[str], *, workdir: str | None = None,
              env_names: list[str] = (), marker: str | None = None,  # type: ignore[assignment]
              nproc: int | None = None, isolation: str | None = None,
              container_id: str | None = None, check: bool = True,
              tty: bool = False) -> list[str]:
    """`podman exec -i ...` for one command in a running sandbox (`-t` with `tty`: on a
    terminal, which the caller gives podman as its own stdin and stdout). With `marker` (from
    `exec_marker()`) the command runs with it in its environment, so a timeout can kill it and
    what it started with `kill_marked_command(marker)`, leaving no file behind; with `nproc` it
    lowers its own RLIMIT_NPROC first (gVisor: `podman exec` does not carry the container's
    rlimits, and the host's pids cgroup counts gVisor's threads, not the code's processes).

    With `check` (the default) a small `/bin/sh` script enters `workdir` and finds the command
    first, so a missing one reads as a shell's "CMD: command not found" (127) and a missing
    workdir says so (1), not as the runtime's or prlimit's own error about its wrapper."""
    if isolation == "bwrap":
        # through the sandbox's agent (core/bwrap_agent): `container` is its host directory.
        # No pid file: a client that goes away (the timeout kills it) takes the command along.
        import sys

        argv = [sys.executable, "-m", "mctl.core.bwrap_agent", "exec",
                os.path.join(container, "agent.sock")]
        if workdir:
            argv += ["--workdir", workdir]
        for key in env_names:
            argv += ["--env", key]
        return argv + ["--", *cmd]
    direct = _direct_exec(isolation, container_id) if not (env_names or tty) else None
    shell_workdir = workdir if check else None  # entered by the script, with its own message
    if shell_workdir:
        workdir = None
    if direct:
        # The OCI runtime's own exec (~0.07 s, against ~0.3 s through podman exec). The process
        # gets the container's spec (no capabilities, no_new_privs, its cgroups and rlimits,
        # env) and this user. Values would show in the runtime's argv, so an exec with env goes
        # through podman.
        argv = [*direct, "exec", "--user", SANDBOX_USER]
        if workdir:  # else the container's own working directory, as podman exec does
            argv += ["--cwd", workdir]
        argv.append(container_id)  # type: ignore[arg-type]
    else:
        argv = ["podman", "exec", "-i", *(["-t"] if tty else []), "--user", SANDBOX_USER]
        if workdir:
            argv += ["--workdir", workdir]
        for key in env_names:
            argv += ["--env", key]
        argv.append(container)
    if not (nproc or marker or check):
        return argv + list(cmd)
    script = f"{MARKER_ENV}={marker}; export {MARKER_ENV}; " if marker else ""
    if shell_workdir:
        script += ('cd "$1" 2>/dev/null || { echo "mctl: workdir $1 does not exist in the sandbox '
                   '(or is not a directory it may enter)" >&2; exit 1; }; shift; ')
    if check:
        script += ('command -v "$1" >/dev/null 2>&1 || { echo "$1: command not found" >&2; '
                   'exit 127; }; ')
    if nproc:
        # prlimit (util-linux) execs the command in this same process. An image without it
        # runs the command unlimited inside; the host's pids cgroup still bounds the sandbox.
        n = int(nproc)
        script += (f'command -v prlimit >/dev/null 2>&1 && exec prlimit --nproc={n}:{n} -- "$@"; ')
    return argv + ["/bin/sh", "-c", script + 'exec "$@"', "sh",
                   *([shell_workdir] if shell_workdir else []), *cmd]


# Counts the sandbox's activity for `idle_timeout`, run inside it with `/bin/sh -c`: the processes
# started by an exec (in the container's pid namespace an exec'd process has parent 0, the main
# command descends from pid 1; this shell itself is left out), then the established TCP
# connections on the sandbox's published ports ($1: their numbers in /proc/net/tcp's hex).
ACTIVITY_SCRIPT = (
    'n=0; for d in /proc/[0-9]*; do p=${d#/proc/}; [ "$p" = 1 ] && continue; '
    '[ "$p" = "$$" ] && continue; read -r l < "$d/stat" 2>/dev/null || continue; '
    'set -- ${l##*) }; [ "$2" = 0 ] && n=$((n+1)); done; c=0; '
    'for f in /proc/net/tcp /proc/net/tcp6; do [ -r "$f" ] || continue; '
    'while read -r _ loc _ st _; do [ "$st" = 01 ] || continue; '
    'case " $PORTS " in *" ${loc##*:} "*) c=$((c+1));; esac; done < "$f"; done; '
    'echo "$n $c"')


def activity_argv(container: str, ports: list[int], *, isolation: str | None = None,
                  container_id: str | None = None) -> list[str]:
    """The command that prints "<running execs> <tunnel connections>" for a sandbox."""
    if isolation == "bwrap":  # the agent counts its running execs; no ports
        import sys

        return [sys.executable, "-m", "mctl.core.bwrap_agent", "activity",
                os.path.join(container, "agent.sock")]
    return exec_argv(container, activity_command(ports), isolation=isolation,
                     container_id=container_id, check=False)


def activity_command(ports: list[int]) -> list[str]:
    """`ACTIVITY_SCRIPT` as a command to run inside the sandbox, for its published `ports`."""
    hexports = " ".join(f"{int(p):04X}" for p in ports)
    return ["/bin/sh", "-c", f"PORTS='{hexports}'; " + ACTIVITY_SCRIPT]


def logs_argv(rec: dict[str, Any]) -> list[str]:
    """The command that follows a running sandbox's main output (stdout, stderr) to its end."""
    if rec.get("isolation") == "bwrap":
        import sys

        d = rec["run_dir"]
        return [sys.executable, "-m", "mctl.core.bwrap_agent", "follow",
                os.path.join(d, "stdout"), os.path.join(d, "stderr"), os.path.join(d, "exit")]
    return ["podman", "logs", "-f", rec["container"]]
