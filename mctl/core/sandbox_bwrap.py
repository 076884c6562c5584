"""The `bwrap` isolation: an image-less sandbox under bubblewrap, for a host without podman.

The file system is the host's own `/usr` (and the `/bin`, `/lib`... links into it) read-only, a
few files of `/etc` read-only (the dynamic linker's cache, alternatives, certificates; a
`passwd`/`group`/`hosts`/`hostname` of the sandbox's own, not the host's), a fresh `/proc` of
its pid namespace, a minimal `/dev`, and tmpfs for `/tmp` (the scratch space, HOME) and the
working directory; only the declared volumes besides (read-only unless asked). No `/sys`, no
`/home`, no `/run`, no `/var`.

As root, bwrap isolates nothing by default (verified 2026-11-29: `bwrap --unshare-all --ro-bind
/ /` kept every capability, and a bind remount deleted a host file). So bwrap itself runs as an
unprivileged uid of its own per sandbox (`setpriv --reuid`: `UID_BASE` + a hash of the id, with
no groups, an empty bounding set), in new user, pid, network, ipc, uts and cgroup namespaces
(`--unshare-all`; no further user namespaces: `--disable-userns`), with `--cap-drop ALL`, as
uid/gid 65534 inside, with no_new_privs (bwrap always sets it) and a seccomp filter that denies
what container runtimes' default profiles deny (`DENIED_SYSCALLS`: mount, unshare, setns, bpf,
keyctl, io_uring, perf_event_open...). The host's files owned by root (`/etc/shadow`, anything
0600) are out of reach by ownership, not only by what is mounted. Limits come from cgroups the
control plane creates and joins before bwrap starts (v1: memory with no swap, pids, cpu quota,
freezer; v2: the same files of one group): `memory=`, `pids=`, `cpu=` as for the other
isolations.

Needs: root (for the cgroups and the uid switch), bwrap, setpriv (util-linux), `/usr/bin/python3`
on the host (the agent, `core/bwrap_agent`, runs inside on it). No network: `block_network=False`,
ports and `cidr_allowlist` are refused. A bwrap sandbox dies with its control plane
(`--die-with-parent`); one that restarts records those sandboxes as lost.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

from mctl.core.sandbox_runtime import (
    DEFAULT_CPU, DEFAULT_MEMORY_MB, DEFAULT_PIDS, SandboxConfig, SandboxIsolationError)

BWRAP = os.environ.get("MCTL_BWRAP", "/usr/bin/bwrap")
PYTHON = "/usr/bin/python3"
UID_BASE = 300000  # host uids UID_BASE .. UID_BASE + 65535 run bwrap sandboxes
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PREFIX = "mctl-sandboxes"
AGENT_PATH = "/.mctl-agent.py"
# /etc entries the code may see (read-only), if the host has them
ETC_SHARED = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "localtime",
              "nsswitch.conf", "ssl", "ca-certificates", "mime.types", "bash.bashrc", "profile",
              "inputrc", "debian_version", "os-release", "python3", "terminfo")
ETC_OWN = {
    "passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/tmp:/bin/sh\n",
    "group": "root:x:0:\nnogroup:x:65534:\n",
    "hostname": "sandbox\n",
    "hosts": "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n",
}


def run_root() -> Path:
    """Where each bwrap sandbox gets its host-side directory (root's only, 0700): the agent's
    socket, the main command's output, the sandbox's own /etc files. Short: a Unix socket path
    has at most 107 bytes."""
    return Path(os.environ.get("MCTL_SANDBOX_RUN_DIR", "/run/mctl-sandboxes"))


def _cgroup_v2() -> bool:
    return (CGROUP_ROOT / "cgroup.controllers").exists()


def problem() -> str | None:
    """Why this host cannot run bwrap sandboxes; None when it can."""
    if not os.access(BWRAP, os.X_OK):
        return f"bubblewrap is not installed ({BWRAP}; scripts/sandbox-dev install)"
    if not shutil.which("setpriv"):
        return "setpriv (util-linux) is not installed"
    if os.geteuid() != 0:
        return ("bwrap sandboxes need a control plane running as root (for their cgroups and "
                "an unprivileged uid of their own)")
    if not os.access(PYTHON, os.X_OK):
        return f"{PYTHON} is missing (the sandbox's agent runs on it)"
    try:
        _libseccomp()
    except OSError:
        return "libseccomp is missing (Debian: libseccomp2)"
    if _cgroup_v2():
        controllers = (CGROUP_ROOT / "cgroup.subtree_control").read_text().split()
        missing = [c for c in ("memory", "pids", "cpu") if c not in controllers]
        if missing:
            return f"cgroup v2 controllers not enabled at {CGROUP_ROOT}: {', '.join(missing)}"
    else:
        missing = [c for c in ("memory", "pids", "cpu", "freezer")
                   if not os.access(CGROUP_ROOT / c, os.W_OK)]
        if missing:
            return f"cgroup v1 controllers not writable under {CGROUP_ROOT}: {', '.join(missing)}"
    return None


# Denied with EPERM in a bwrap sandbox (a seccomp filter made with libseccomp): the kernel
# interfaces container runtimes' default profiles deny to unprivileged code (podman's and
# Docker's lists, less ptrace and personality), namespaces and mounts first. Other
# architectures' system calls (int 0x80 on x86-64) kill the process: libseccomp's default.
DENIED_SYSCALLS = (
    "acct", "add_key", "bpf", "clock_adjtime", "clock_settime", "create_module",
    "delete_module", "finit_module", "fsconfig", "fsmount", "fsopen", "fspick",
    "get_kernel_syms", "get_mempolicy", "init_module", "io_uring_enter", "io_uring_register",
    "io_uring_setup", "ioperm", "iopl", "kcmp", "kexec_file_load", "kexec_load", "keyctl",
    "lookup_dcookie", "mbind", "mount", "mount_setattr", "move_mount", "move_pages",
    "name_to_handle_at", "nfsservctl", "open_by_handle_at", "open_tree", "perf_event_open",
    "pivot_root", "query_module", "quotactl", "quotactl_fd", "reboot", "request_key",
    "set_mempolicy", "setns", "settimeofday", "stime", "swapoff", "swapon", "sysfs", "_sysctl",
    "umount", "umount2", "unshare", "uselib", "userfaultfd", "ustat", "vm86", "vm86old")


def _libseccomp() -> Any:
    import ctypes
    import ctypes.util

    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                     ctypes.c_uint]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def write_seccomp(path: Path) -> None:
    """The sandbox's seccomp filter, as the BPF program bwrap's `--seccomp FD` loads."""
    import errno

    lib = _libseccomp()
    ctx = lib.seccomp_init(0x7FFF0000)  # SCMP_ACT_ALLOW
    if not ctx:
        raise SandboxIsolationError("libseccomp could not make a filter.")
    try:
        for name in DENIED_SYSCALLS:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:  # not a system call on this architecture
                continue
            if lib.seccomp_rule_add(ctx, 0x00050000 | errno.EPERM, nr, 0) != 0:  # ERRNO(EPERM)
                raise SandboxIsolationError(f"libseccomp refused a rule for {name}.")
        with open(path, "wb") as f:
            if lib.seccomp_export_bpf(ctx, f.fileno()) != 0:
                raise SandboxIsolationError("libseccomp could not export the filter.")
        os.chmod(path, 0o600)
    finally:
        lib.seccomp_release(ctx)


def host_uid(sandbox_id: str) -> int:
    digest = hashlib.sha256(sandbox_id.encode()).digest()
    return UID_BASE + int.from_bytes(digest[:2], "big")


def check(cfg: SandboxConfig) -> None:
    """Refuse what a bwrap sandbox cannot do, saying what to use instead."""
    if cfg.image:
        raise SandboxIsolationError("bwrap sandboxes are image-less (the host's /usr, read-only): "
                                    "drop image=, or use isolation='gvisor' or 'runc' (podman).")
    if cfg.ports or not cfg.block_network or cfg.cidr_allowlist is not None:
        raise SandboxIsolationError("bwrap sandboxes have no network: drop block_network=False, "
                                    "ports and cidr_allowlist, or use isolation='runc' (podman).")
    for m in cfg.mounts:
        if m["path"] in ("/", "/usr", "/proc", "/dev", "/etc") or m["path"].startswith(
                ("/usr/", "/proc/", "/dev/")):
            raise SandboxIsolationError(f"A bwrap sandbox cannot mount a volume at {m['path']}.")


# --- cgroups -----------------------------------------------------------------------------------
def cgroups(sandbox_id: str) -> list[Path]:
    name = f"{CGROUP_PREFIX}/{sandbox_id.lower()}"
    if _cgroup_v2():
        return [CGROUP_ROOT / name]
    return [CGROUP_ROOT / c / name for c in ("memory", "pids", "cpu", "freezer")]


def make_cgroups(cfg: SandboxConfig) -> list[Path]:
    """Create the sandbox's cgroups with its limits; the launcher joins them before bwrap."""
    memory = (cfg.memory_mb or DEFAULT_MEMORY_MB) * 1024 * 1024
    pids = cfg.pids or DEFAULT_PIDS
    period = 100000
    quota = int((cfg.cpu or DEFAULT_CPU) * period)
    groups = cgroups(cfg.sandbox_id)
    for g in groups:
        g.mkdir(parents=True, exist_ok=True)
    if _cgroup_v2():
        parent = groups[0].parent
        (CGROUP_ROOT / parent.name / "cgroup.subtree_control").write_text("+memory +pids +cpu")
        g = groups[0]
        (g / "memory.max").write_text(str(memory))
        (g / "memory.swap.max").write_text("0")
        (g / "pids.max").write_text(str(pids))
        (g / "cpu.max").write_text(f"{quota} {period}")
        return groups
    mem, pid, cpu, _ = groups
    (mem / "memory.limit_in_bytes").write_text(str(memory))
    try:  # no swap: memory.memsw exists only where swap accounting is on
        (mem / "memory.memsw.limit_in_bytes").write_text(str(memory))
    except OSError:
        pass
    (pid / "pids.max").write_text(str(pids))
    (cpu / "cpu.cfs_period_us").write_text(str(period))
    (cpu / "cpu.cfs_quota_us").write_text(str(quota))
    return groups


def _procs(groups: list[Path]) -> set[int]:
    out: set[int] = set()
    for g in groups:
        try:
            out |= {int(p) for p in (g / "cgroup.procs").read_text().split()}
        except OSError:
            pass
    return out


def kill(sandbox_id: str) -> None:
    """SIGKILL every process of the sandbox (freeze first, so a fork bomb cannot outrun it)."""
    groups = cgroups(sandbox_id)
    if _cgroup_v2():
        try:
            (groups[0] / "cgroup.kill").write_text("1")
            return
        except OSError:
            pass
    freezer = next((g for g in groups if "freezer" in g.parts), None)
    for _ in range(50):
        if freezer is not None:
            try:
                (freezer / "freezer.state").write_text("FROZEN")
            except OSError:
                pass
        procs = _procs(groups)
        for p in procs:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        if freezer is not None:
            try:
                (freezer / "freezer.state").write_text("THAWED")
            except OSError:
                pass
        if not procs:
            return
        time.sleep(0.02)


def remove_cgroups(sandbox_id: str) -> None:
    for g in cgroups(sandbox_id):
        for _ in range(50):
            try:
                g.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:  # processes still leaving
                time.sleep(0.05)


def sandbox_pids(sandbox_id: str) -> set[int]:
    return _procs(cgroups(sandbox_id))


# --- the host directory and the argv -----------------------------------------------------------
def prepare(cfg: SandboxConfig) -> tuple[Path, socket.socket]:
    """The sandbox's host directory (root's only) with its own /etc files and the agent's socket,
    bound and listening here: its descriptor is handed to the agent inside."""
    root = run_root()
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    d = root / cfg.sandbox_id.lower()
    d.mkdir(mode=0o700)
    etc = d / "etc"
    etc.mkdir()
    for name, text in ETC_OWN.items():
        (etc / name).write_text(text)
    write_seccomp(d / "seccomp.bpf")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(d / "agent.sock"))
    os.chmod(d / "agent.sock", 0o600)
    sock.listen(64)
    return d, sock


def launch(cfg: SandboxConfig, run_dir: Path, listen_fd: int, groups: list[Path]
           ) -> tuple[list[str], list[int]]:
    """The launcher's argv and the descriptors it must inherit (the caller closes them once it
    started): a shell that joins the sandbox's cgroups, then becomes bwrap as the sandbox's own
    unprivileged uid, with the agent as the sandbox's first process. Everything of the control
    plane's that bwrap puts in the sandbox (its /etc files, the agent, the seccomp filter, the
    volumes) is opened here, as root, and handed over by descriptor: bwrap, already
    unprivileged, need not reach the paths (the run directory stays 0700, a volume may lie
    below a directory only root may enter), and nothing on a path can be swapped meanwhile."""
    import glob

    fds: list[int] = []

    def fd(path: str | Path, flags: int = os.O_RDONLY) -> str:
        fds.append(os.open(path, flags | os.O_CLOEXEC))
        return str(fds[-1])

    uid = host_uid(cfg.sandbox_id)
    workdir = cfg.workdir or "/tmp"
    try:
        bw = [BWRAP, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session",
              "--disable-userns", "--assert-userns-disabled",
              "--seccomp", fd(run_dir / "seccomp.bpf"),
              "--uid", "65534", "--gid", "65534", "--cap-drop", "ALL", "--hostname", "sandbox",
              "--ro-bind", "/usr", "/usr"]
        for link in ("bin", "lib", "lib32", "lib64", "libx32", "sbin"):
            target = Path("/") / link
            if target.is_symlink():
                bw += ["--symlink", os.readlink(target), f"/{link}"]
            elif target.is_dir():
                bw += ["--ro-bind", str(target), f"/{link}"]
        bw += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--dir", "/etc"]
        shared = [f"/etc/{n}" for n in ETC_SHARED] + sorted(glob.glob("/etc/python3.*"))
        for path in shared:  # world-readable system files: bound by path
            if os.path.lexists(path) and os.path.basename(path) not in ETC_OWN:
                bw += ["--ro-bind", path, path]
        for name in ETC_OWN:
            bw += ["--ro-bind-data", fd(run_dir / "etc" / name), f"/etc/{name}"]
        bw += ["--ro-bind-data", fd(Path(__file__).with_name("bwrap_agent.py")), AGENT_PATH]
        # Volumes: bwrap (unprivileged, and it resolves every source path) could not reach a
        # volume below a directory only root may enter. So the launcher, still root, binds each
        # onto a staging tmpfs in a mount namespace of its own (over the run root, nowhere else
        # visible) and bwrap binds them from there.
        stage = str(run_root())
        staging = []
        for i, m in enumerate(cfg.mounts):
            staging.append(f'mkdir "{stage}/{i}" && mount --bind {shlex.quote(m["host_path"])} '
                           f'"{stage}/{i}" || exit 125')
            bw += ["--ro-bind" if m.get("read_only", True) else "--bind", f"{stage}/{i}",
                   m["path"]]
    except BaseException:
        for f in fds:
            os.close(f)
        raise
    if workdir != "/tmp" and not any(workdir == m["path"] for m in cfg.mounts):
        bw += ["--tmpfs", workdir]  # scratch space, as /tmp
    # the root (bwrap's own tmpfs) read-only: writes go to /tmp, the workdir, rw volumes only
    bw += ["--remount-ro", "/", "--chdir", workdir,
           PYTHON, "-I", AGENT_PATH, "agent", str(listen_fd), workdir, "--",
           *(cfg.command or ["sleep", "infinity"])]
    script = [f'echo $$ > "{g}/cgroup.procs" || exit 125' for g in groups]
    if staging:
        script += [f'mount -t tmpfs -o mode=0711,size=64k mctl-stage "{stage}" || exit 125',
                   *staging]
    argv = ["/bin/sh", "-c", "; ".join(script) + '; exec "$@"', "sh",
            "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", *bw]
    if staging:
        argv = ["unshare", "--mount", "--propagation", "private", *argv]
    return argv, fds


def environment(cfg: SandboxConfig) -> dict[str, str]:
    """The launcher's whole environment, which bwrap passes on (values never in an argv, and
    nothing of the control plane's own)."""
    return {"HOME": "/tmp", "LANG": "C.UTF-8",
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin", **cfg.env}


def cleanup(sandbox_id: str, run_dir: str | Path | None) -> None:
    kill(sandbox_id)
    remove_cgroups(sandbox_id)
    if run_dir:
        sock = Path(run_dir) / "agent.sock"
        try:
            sock.unlink()
        except OSError:
            pass


def remove_dir(run_dir: str | Path | None) -> None:
    """The host directory (with the main command's output) goes once the record's logs do."""
    if run_dir and Path(run_dir).parent == run_root():
        for _ in range(5):  # the watcher may add its exit marker while this removes
            shutil.rmtree(run_dir, ignore_errors=True)
            if not os.path.exists(run_dir):
                return
            time.sleep(0.05)


def read_logs(run_dir: str | Path) -> dict[str, Any]:
    out = {}
    for key in ("stdout", "stderr"):
        try:
            out[key] = (Path(run_dir) / key).read_bytes().decode(errors="replace")
        except OSError:
            out[key] = None
    return out


def ready(run_dir: str | Path, timeout: float = 15.0) -> bool:
    """Whether the sandbox's agent answers (one activity request) within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(max(0.1, deadline - time.monotonic()))
            s.connect(str(Path(run_dir) / "agent.sock"))
            s.sendall(b'{"activity": true}\n')
            ok = s.recv(4096).startswith(b"{")
            s.close()
            return ok
        except OSError:
            time.sleep(0.02)
    return False
