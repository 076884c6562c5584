import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"

# CPython 3.11/3.12 keep ast.parse's recursion counter in state shared by threads (see
# gh-106905, pytest#10763): pytest parsing a test's source in the main thread while a thread of
# an in-process control plane formatted a traceback (the ^^^ carets parse the line with ast)
# raised "SystemError: AST constructor recursion depth mismatch" inside pytest, an
# INTERNALERROR that ended a CI run (3.11.7). Tracebacks formatted in this process lose their
# carets; nothing here asserts on them.
import traceback  # noqa: E402

if hasattr(traceback, "_extract_caret_anchors_from_line_segment"):
    traceback._extract_caret_anchors_from_line_segment = lambda segment: None


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Every test gets its own MCTL_HOME and bundle cache, and no inherited server URL."""
    monkeypatch.setenv("MCTL_HOME", str(tmp_path / "mctl-home"))
    monkeypatch.setenv("MCTL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MCTL_SERVER_URL", raising=False)
    yield tmp_path / "mctl-home"


def load_app(name):
    """Import tests/apps/<name>.py the way `mctl run` does."""
    from mctl.cli.main import import_app_file

    module, app, _ = import_app_file(str(APPS / f"{name}.py"))
    return module, app


class ServerProcess:
    """A real `mctl server` subprocess on a fixed port, restartable on the same state.

    On first start it writes an admin token to $MCTL_HOME/token, which clients in the tests pick
    up on their own (`token` reads it); `tls=(cert, key)` serves https."""

    def __init__(self, state_dir, port, env, tls=None, args=()):
        self.state_dir, self.port, self.env, self.tls = state_dir, port, env, tls
        self.args = list(args)  # more `mctl server` options
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        self.proc = None

    @property
    def token(self):
        return (Path(self.env["MCTL_HOME"]) / "token").read_text().strip()

    def start(self):
        tls_args = ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])] if self.tls else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mctl", "server", "--port", str(self.port), "--state-dir",
             str(self.state_dir), *tls_args, *self.args], env=self.env, stdout=subprocess.DEVNULL,
            stderr=open(Path(self.state_dir).parent / "server.log", "ab"))
        context = None
        if self.tls:
            import ssl

            context = ssl.create_default_context(cafile=str(self.tls[0]))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/healthz", timeout=1, context=context).read()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mctl server did not start")

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class TcpProxy:
    """A TCP relay on loopback whose connections the test can cut, to break a worker's
    connection without killing the worker (a network blip, not a crash)."""

    def __init__(self, target_port):
        import socket
        import threading

        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pairs = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.pairs.append((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        import socket

        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        """Reset every open connection (both sides see it drop); new ones are still accepted."""
        import socket
        import struct

        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for sock in pair:
                try:  # RST (linger 0); shutdown first wakes the relay threads blocked on it
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
                except OSError:
                    pass

    def close(self):
        self.listener.close()
        self.cut()


def wait_until(check, timeout=30):
    """Poll `check` until it is true; False after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server_process(tmp_path, isolated_home, monkeypatch):
    env = dict(os.environ)
    srv = ServerProcess(tmp_path / "server-state", free_port(), env)
    srv.start()
    monkeypatch.setenv("MCTL_SERVER_URL", srv.url)
    try:
        yield srv
    finally:
        srv.stop()


class SlurmCluster:
    """The development Slurm cluster that `scripts/slurm-dev up` starts (docs/slurm-dev.md).

    `env` holds only the cluster's variables (SLURM_CONF, MCTL_SLURM_HOST_ADDR,
    MCTL_SLURM_NODES, SLURMRESTD_URL, ...); `client_env()` is the whole environment for a
    Slurm client subprocess. Jobs reach this machine at `host_addr`, never at 127.0.0.1."""

    def __init__(self, env):
        self.env = env
        self.conf = env["SLURM_CONF"]
        self.host_addr = env["MCTL_SLURM_HOST_ADDR"]
        self.nodes = env["MCTL_SLURM_NODES"].split(",")
        self.restd_url = env.get("SLURMRESTD_URL")

    def client_env(self):
        return {**os.environ, **self.env}

    def run(self, *args, timeout=30, check=False):
        """Run a Slurm client command (sbatch, squeue, ...) against the cluster; a client facing
        a dead controller retries for minutes, hence the timeout."""
        return subprocess.run(list(args), env=self.client_env(), capture_output=True, text=True,
                              timeout=timeout, check=check)

    def run_script(self, *args, timeout=60):
        """`scripts/slurm-dev ARGS`, e.g. ("cut", "node1") to take a node's link down."""
        return subprocess.run(["bash", str(ROOT / "scripts" / "slurm-dev"), *args],
                              capture_output=True, text=True, timeout=timeout, check=True)


def _slurm_dev_env():
    """The `export K=V` lines of `scripts/slurm-dev env`, as a dict."""
    out = subprocess.run(["bash", str(ROOT / "scripts" / "slurm-dev"), "env"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    return dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines()
                if line.startswith("export "))


@pytest.fixture(scope="session")
def slurm_cluster():
    """The running development Slurm cluster; skips the test when none is up, and fails it
    instead under MCTL_REQUIRE_SERVERS=1 (as CI runs)."""
    cluster = SlurmCluster(_slurm_dev_env())
    problem = None
    if not Path(cluster.conf).is_file():
        problem = f"no Slurm configuration at {cluster.conf}"
    else:
        try:
            result = cluster.run("sinfo", "-h", "-N", "-o", "%N", timeout=15)
            if result.returncode != 0:
                problem = f"sinfo failed: {result.stderr.strip()}"
        except FileNotFoundError:
            problem = "the Slurm client commands are not installed"
        except subprocess.TimeoutExpired:
            problem = "the Slurm controller did not answer within 15 s"
    if problem:
        message = (f"The development Slurm cluster is not up ({problem}). "
                   "Start it with `sudo scripts/slurm-dev up` (docs/slurm-dev.md).")
        if os.environ.get("MCTL_REQUIRE_SERVERS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return cluster


class VaultServer:
    """The OpenBao dev server that `scripts/vault-dev up` starts (Vault's API on loopback).

    `env(prefix)` is what a control plane needs to use it, with its own KV prefix so that tests
    do not see each other's secrets; `client()` is an hvac client with the root token."""

    def __init__(self, env):
        self.addr, self.token = env["VAULT_ADDR"], env["VAULT_TOKEN"]

    def env(self, prefix):
        return {"VAULT_ADDR": self.addr, "VAULT_TOKEN": self.token, "MCTL_VAULT_PREFIX": prefix}

    def client(self):
        import hvac

        return hvac.Client(url=self.addr, token=self.token)


@pytest.fixture(scope="session")
def vault_server():
    """The running OpenBao dev server; skips the test when none is up, and fails it instead
    under MCTL_REQUIRE_SERVERS=1 (as CI runs)."""
    out = subprocess.run(["bash", str(ROOT / "scripts" / "vault-dev"), "env"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    server = VaultServer(dict(line.removeprefix("export ").split("=", 1)
                              for line in out.splitlines() if line.startswith("export ")))
    try:
        urllib.request.urlopen(f"{server.addr}/v1/sys/health", timeout=3).read()
    except OSError as exc:
        message = (f"The OpenBao dev server is not up at {server.addr} ({exc}). Start it with "
                   "`sudo scripts/vault-dev up`.")
        if os.environ.get("MCTL_REQUIRE_SERVERS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return server
