"""`Sandbox.create(cidr_allowlist=[...])`: outbound traffic only to those networks, enforced by a
firewall in the sandbox's network namespace, loaded from the host before any of its code runs.
Real traffic: TCP servers on this host, reached from inside sandboxes (podman's bridge gateway is
one of this host's addresses; its other addresses are reachable through it too)."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request

import pytest

import mctl
from mctl.core import sandbox_runtime
from mctl.exception import InvalidError
from test_sandbox import BASE, _problem

GREETING = b"hello from the host\n"


# --- validation (no sandbox needed) ---------------------------------------------------------------
def test_cidrs_are_validated_and_normalised():
    assert sandbox_runtime.normalize_cidrs(
        ["10.1.2.3/8", " 192.0.2.7 ", "2001:db8::1/32", "10.0.0.0/8"]) == [
        "10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]
    assert sandbox_runtime.normalize_cidrs([]) == []
    for bad, message in [("10.0.0.0/8", "takes a list of networks"),
                         (["10.0.0.0/33"], "is not an IPv4 or IPv6 network"),
                         (["example.com"], "a domain name is not accepted"),
                         (["1.2.3.4/32\n-A OUTPUT -j ACCEPT"], "is not an IPv4 or IPv6"),
                         ([42], "is not a string")]:
        with pytest.raises(InvalidError, match=message):
            sandbox_runtime.normalize_cidrs(bad)


def test_the_rules_allow_only_the_list_loopback_and_replies():
    v4 = sandbox_runtime.allowlist_rules(["203.0.113.0/24", "2001:db8::/32"], 4)
    v6 = sandbox_runtime.allowlist_rules(["203.0.113.0/24", "2001:db8::/32"], 6)
    assert ":OUTPUT DROP" in v4 and ":OUTPUT DROP" in v6
    assert "-A OUTPUT -d 203.0.113.0/24 -j ACCEPT" in v4 and "2001:db8" not in v4
    assert "-A OUTPUT -d 2001:db8::/32 -j ACCEPT" in v6 and "203.0.113" not in v6
    for rules in (v4, v6):
        assert "-A OUTPUT -o lo -j ACCEPT" in rules
        assert "--ctstate ESTABLISHED,RELATED -j ACCEPT" in rules
        assert rules.strip().splitlines()[-2].startswith("-A OUTPUT -j REJECT")
    # an empty list: nothing goes out but replies
    assert "-d " not in sandbox_runtime.allowlist_rules([], 4)


def test_the_sdk_refuses_an_allowlist_with_block_network_and_bad_cidrs():
    with pytest.raises(InvalidError, match="cannot be used when `block_network` is enabled"):
        mctl.Sandbox.create(block_network=True, cidr_allowlist=["10.0.0.0/8"])
    with pytest.raises(InvalidError, match="is not an IPv4 or IPv6 network"):
        mctl.Sandbox.create(cidr_allowlist=["10.0.0.300/32"])
    with pytest.raises(InvalidError, match="not both"):
        mctl.Sandbox.create(cidr_allowlist=[], outbound_cidr_allowlist=[])
    with pytest.raises(InvalidError, match="not by domain"):
        mctl.Sandbox.create(outbound_domain_allowlist=["example.com"])
    with pytest.raises(InvalidError, match="inbound_cidr_allowlist= is not supported"):
        mctl.Sandbox.create(inbound_cidr_allowlist=["10.0.0.0/8"])


def test_a_gvisor_sandbox_cannot_have_an_allowlist():
    cfg = sandbox_runtime.SandboxConfig(sandbox_id="sb-x", image=BASE, block_network=False,
                                        cidr_allowlist=["10.0.0.0/8"], isolation="gvisor")
    if "gvisor" not in sandbox_runtime.available():
        pytest.skip("runsc is not installed here")
    with pytest.raises(InvalidError, match="cannot have network.*cidr_allowlist"):
        sandbox_runtime.choose(cfg)
    cfg.isolation = None
    assert sandbox_runtime.choose(cfg) == "runc"
    assert not sandbox_runtime.poolable(cfg)


def test_the_slurm_job_script_fires_the_firewall_before_start():
    from mctl.plugins.sandbox_slurm import job_script

    cfg = sandbox_runtime.SandboxConfig(sandbox_id="sb-abc", image=BASE, command=["true"],
                                        block_network=False, cidr_allowlist=["10.0.0.0/8"])
    script = job_script(cfg, "runc", name="mctl-sb-abc", comment="c", output="/tmp/o",
                        timeout_s=60)
    order = [script.index(s) for s in ("podman create ", 'podman init "$name"',
                                       "iptables-restore", "ip6tables-restore",
                                       "iptables-save",
                                       # a main command: its stdin attached too (sb.stdin)
                                       'podman start --attach --interactive "$name" <"$stdin"')]
    assert order == sorted(order), script
    assert "-A OUTPUT -d 10.0.0.0/8 -j ACCEPT" in script and "podman run" not in script
    cfg.cidr_allowlist = None
    plain = job_script(cfg, "runc", name="mctl-sb-abc", comment="c", output="/tmp/o",
                       timeout_s=60)
    assert "podman run " in plain and "iptables" not in plain


def test_nomad_refuses_an_allowlist():
    from mctl.plugins.sandbox_nomad import render_sandbox

    cfg = sandbox_runtime.SandboxConfig(sandbox_id="sb-abc", image=BASE, block_network=False,
                                        cidr_allowlist=["10.0.0.0/8"])
    with pytest.raises(InvalidError, match="not supported for sandboxes on Nomad"):
        render_sandbox(cfg, "runc", app_id="ap-1")


# --- real traffic ---------------------------------------------------------------------------------
def _addresses() -> tuple[str, str] | None:
    """(podman's bridge gateway, another IPv4 address of this host), both reachable from a
    sandbox with network; None when this host has no second address."""
    out = subprocess.run(["podman", "network", "inspect", "podman"], capture_output=True,
                         text=True, timeout=30).stdout
    try:
        net = json.loads(out)[0]
        gateway = ([s.get("gateway") for s in net.get("subnets") or []]
                   or [r.get("gateway") for p in net["plugins"] if p.get("ipam")
                       for rs in p["ipam"].get("ranges", []) for r in rs])[0]
    except (ValueError, LookupError, KeyError, TypeError):
        return None
    addrs = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for line in addrs.splitlines():
        addr = line.split()[3].split("/")[0]
        ip = ipaddress.ip_address(addr)
        if addr != gateway and not ip.is_loopback and not ip.is_link_local:
            return gateway, addr
    return None


@pytest.fixture
def net_problem():
    problem = _problem() or (sandbox_runtime.allowlist_tools()
                             if "runc" in sandbox_runtime.available() else "runc is missing")
    if problem:
        if os.environ.get("MCTL_REQUIRE_SERVERS") == "1":
            pytest.fail(problem)
        pytest.skip(problem)


@pytest.fixture
def servers(net_problem):
    """A TCP server on the gateway and one on another address of this host, each greeting."""
    found = _addresses()
    if found is None:
        pytest.skip("this host has no IPv4 address besides podman's gateway")
    socks = []
    for addr in found:
        s = socket.socket()
        s.bind((addr, 0))
        s.listen(16)
        socks.append(s)

        def serve(s=s):
            while True:
                try:
                    conn, _ = s.accept()
                except OSError:
                    return
                conn.sendall(GREETING)
                conn.close()
        threading.Thread(target=serve, daemon=True).start()
    yield [s.getsockname()[:2] for s in socks]
    for s in socks:
        s.close()


@pytest.fixture
def app():
    a = mctl.App("sandbox-network-tests")
    with a.run():
        yield a


PROBE = ("import socket, sys\n"
         "for host, port in {targets!r}:\n"
         "    try:\n"
         "        c = socket.create_connection((host, port), timeout=4)\n"
         "        print(host, 'OPEN', c.recv(100).decode().strip())\n"
         "    except OSError as e:\n"
         "        print(host, 'BLOCKED', e)\n"
         "sys.stdout.flush()\n")


def _probe(sb, targets) -> dict[str, str]:
    p = sb.exec("python3", "-c", PROBE.format(targets=targets), timeout=60)
    assert p.wait() == 0, p.stderr.read()
    return {line.split()[0]: " ".join(line.split()[1:]) for line in p.stdout.read().splitlines()}


def _netns(sb) -> str:
    return subprocess.run(["podman", "inspect", "-f", "{{.NetworkSettings.SandboxKey}}",
                           sb._record["container"]], capture_output=True, text=True,
                          timeout=30).stdout.strip()


def test_only_the_allowlisted_network_answers(app, servers):
    (gw, gw_port), (other, other_port) = servers
    targets = [(gw, gw_port), (other, other_port)]
    # without an allowlist both answer: the test below can fail
    open_sb = mctl.Sandbox.create(app=app, block_network=False)
    assert _probe(open_sb, targets) == {gw: "OPEN hello from the host",
                                        other: "OPEN hello from the host"}
    open_sb.terminate()

    # the main command's very first act is already behind the firewall: no race at the start
    sb = mctl.Sandbox.create("python3", "-c", PROBE.format(targets=targets) +
                             "import time; time.sleep(600)",
                             app=app, cidr_allowlist=[f"{gw}/32"], timeout=300)
    assert sb.isolation == "runc"
    assert sb._record["cidr_allowlist"] == [f"{gw}/32"]
    first = ""
    for line in sb.stdout:
        first += line
        if first.count("\n") == 2:
            break
    assert f"{gw} OPEN hello from the host" in first, first
    assert f"{other} BLOCKED" in first and "No route to host" in first, first
    # and every exec (runc exec and podman exec) is in the same namespace
    seen = _probe(sb, targets + [("1.1.1.1", 80)])
    assert seen[gw] == "OPEN hello from the host", seen
    assert seen[other].startswith("BLOCKED") and seen["1.1.1.1"].startswith("BLOCKED"), seen
    p = sb.exec("python3", "-c", PROBE.format(targets=[(other, other_port)]), env={"A": "1"})
    assert "BLOCKED" in p.stdout.read()

    # the rules hold for IPv4 and IPv6, seen from the host
    netns = _netns(sb)
    for tool in ("iptables-save", "ip6tables-save"):
        saved = subprocess.run(["nsenter", f"--net={netns}", tool, "-t", "filter"],
                               capture_output=True, text=True, timeout=30).stdout
        assert ":OUTPUT DROP" in saved, (tool, saved)
    sb.terminate()


def test_a_wider_allowlist_and_an_empty_one(app, servers):
    (gw, gw_port), (other, other_port) = servers
    targets = [(gw, gw_port), (other, other_port)]
    wide = mctl.Sandbox.create(app=app, cidr_allowlist=[f"{gw}/32", f"{other}/24"])
    assert set(_probe(wide, targets).values()) == {"OPEN hello from the host"}
    wide.terminate()
    # []: nothing goes out, yet a tunnel (inbound) still answers
    sb = mctl.Sandbox.create("python3", "-m", "http.server", "8000", "--directory", "/etc",
                             app=app, cidr_allowlist=[], encrypted_ports=[8000])
    assert all(v.startswith("BLOCKED") for v in _probe(sb, targets).values())
    tunnel = sb.tunnels()[8000]
    deadline = time.monotonic() + 30
    while True:
        try:
            body = urllib.request.urlopen(tunnel.url + "/hostname", timeout=5).read()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert body.strip() == b"sandbox"
    sb.terminate()


@pytest.fixture(scope="module")
def iptables_image():
    """The base image plus this host's iptables (Debian's xtables-nft-multi and its libraries),
    so code in a sandbox can try to change its own firewall with the real tool."""
    if _problem() or not shutil.which("buildah"):
        pytest.skip("buildah or the base image is missing")
    tag = "localhost/mctl/test-iptables:1"
    if subprocess.run(["podman", "image", "exists", tag]).returncode == 0:
        return tag
    files = ["/usr/sbin/xtables-nft-multi", "/usr/lib/x86_64-linux-gnu/xtables"]
    ldd = subprocess.run(["ldd", files[0]], capture_output=True, text=True).stdout
    files += [p.split("=>")[1].split()[0] for p in ldd.splitlines() if "=>" in p
              and "libc.so" not in p]
    if not all(os.path.exists(f) for f in files):
        pytest.skip("iptables (nft) is not installed on this host")
    ctr = subprocess.run(["buildah", "from", "--pull=never", BASE], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        for f in files:
            subprocess.run(["buildah", "copy", ctr, f, f], check=True, capture_output=True)
        subprocess.run(["buildah", "run", ctr, "ln", "-sf", "xtables-nft-multi",
                        "/usr/sbin/iptables"], check=True, capture_output=True)
        subprocess.run(["buildah", "commit", "-q", ctr, tag], check=True, capture_output=True)
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True)
    return tag


def test_root_in_the_sandbox_cannot_lift_the_firewall(app, servers, iptables_image):
    (gw, gw_port), (other, other_port) = servers
    sb = mctl.Sandbox.create(app=app, cidr_allowlist=[f"{gw}/32"],
                             image=mctl.Image.from_registry(iptables_image))
    container = sb._record["container"]
    lift = ("iptables -P OUTPUT ACCEPT; iptables -F OUTPUT; iptables -I OUTPUT -j ACCEPT; "
            "echo tried")
    # as the sandbox's user, and as root in its user namespace (podman exec --user 0)
    for argv in (["podman", "exec", container, "sh", "-c", lift],
                 ["podman", "exec", "--user", "0", container, "sh", "-c", lift],
                 ["podman", "exec", "--user", "0", container, "python3", "-c",
                  "import fcntl, socket, struct\n"
                  "s = socket.socket()\n"  # SIOCSIFFLAGS: take eth0 down (CAP_NET_ADMIN)
                  "fcntl.ioctl(s, 0x8914, struct.pack('16sH14s', b'eth0', 0, b''))\n"]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert "Permission denied" in done.stderr or "not permitted" in done.stderr, done
    seen = _probe(sb, [(gw, gw_port), (other, other_port)])
    assert seen[gw].startswith("OPEN") and seen[other].startswith("BLOCKED"), seen
    saved = subprocess.run(["nsenter", f"--net={_netns(sb)}", "iptables-save", "-t", "filter"],
                           capture_output=True, text=True, timeout=30).stdout
    assert ":OUTPUT DROP" in saved and "-A OUTPUT -j ACCEPT" not in saved, saved
    sb.terminate()


def test_the_server_validates_what_a_client_sends(app, net_problem):
    from mctl.sdk.sandbox import _http

    for body, message in [({"cidr_allowlist": ["10.0.0.0/8"], "block_network": True},
                           "cannot be used when `block_network`"),
                          ({"cidr_allowlist": ["10.0.0.1/32\n-A OUTPUT -j ACCEPT"],
                            "block_network": False}, "is not an IPv4 or IPv6 network"),
                          ({"cidr_allowlist": "10.0.0.0/8", "block_network": False},
                           "takes a list of networks")]:
        with pytest.raises(InvalidError, match=message):
            _http(app._server_url, "POST", "/api/sandboxes", {"app_id": app.app_id, **body})


def test_a_firewall_that_fails_means_no_sandbox(app, net_problem, monkeypatch):
    def broken(netns, cidrs):
        raise sandbox_runtime.SandboxIsolationError("iptables-restore: broken on purpose")

    monkeypatch.setattr(sandbox_runtime, "apply_allowlist", broken)
    with pytest.raises(InvalidError, match="broken on purpose"):
        mctl.Sandbox.create("echo", "ran", app=app, cidr_allowlist=["10.0.0.0/8"])
    assert list(mctl.Sandbox.list(app_id=app.app_id)) == []
    from mctl.sdk.sandbox import _http

    [failed] = _http(app._server_url, "GET", "/api/sandboxes",
                     params={"app_id": app.app_id, "all": "1"})
    assert failed["state"] == "failed"
    left = subprocess.run(["podman", "ps", "-a", "--filter",
                           f"label=mctl.sandbox={failed['sandbox_id']}", "--format",
                           "{{.Names}}"], capture_output=True, text=True).stdout
    assert left.strip() == ""  # created, never started, removed


def test_dns_works_only_with_the_resolver_in_the_list(app, net_problem):
    resolvers = [line.split()[1] for line in open("/etc/resolv.conf")
                 if line.startswith("nameserver") and ":" not in line.split()[1]]
    if not resolvers:
        pytest.skip("no IPv4 resolver in this host's /etc/resolv.conf")
    code = ("import socket\ntry:\n    socket.getaddrinfo('example.com', 80); print('resolved')\n"
            "except socket.gaierror as e:\n    print('gaierror', e.errno)\n")
    without = mctl.Sandbox.create(app=app, cidr_allowlist=["192.0.2.0/24"])
    with_dns = mctl.Sandbox.create(app=app, cidr_allowlist=[f"{r}/32" for r in resolvers])
    # without the resolver: no answer at all (EAI_AGAIN); with it, an answer (a name or "no such
    # name" where this host has no internet)
    assert without.exec("python3", "-c", code).stdout.read().split() == [
        "gaierror", str(socket.EAI_AGAIN)]
    answer = with_dns.exec("python3", "-c", code).stdout.read().split()
    assert answer[0] == "resolved" or answer[1] != str(socket.EAI_AGAIN), answer
    without.terminate()
    with_dns.terminate()
