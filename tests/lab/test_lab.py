"""The network lab itself behaves like the internet it stands for (no derpnet features used):
NAT mappings and filtering, hole punching with plain sockets, one LAN, blocked UDP,
process handling, teardown, and the relays started inside it."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import zlib

import pytest

from tests.lab import netns
from tests.lab.netns import REPO_ROOT, Lab, list_namespaces, netns_entered, remove_stale_namespaces
from tests.lab.relays import STUN_PORT, require_go_derper, start_go_derper, start_our_relay

pytestmark = pytest.mark.lab

ECHO1, ECHO2 = 5001, 5002
SILENCE = 0.4  # how long "nothing arrives" is waited for (the lab's paths take microseconds)


# --------------------------------------------------------------------------
# helpers


def udp(lab: Lab, ns: str, addr=("0.0.0.0", 0), timeout: float = 2.0) -> socket.socket:
    s = lab.socket(ns)
    s.bind(addr)
    s.settimeout(timeout)
    return s


def observed_from(sender: socket.socket, observer: socket.socket) -> tuple:
    """Send from `sender` to `observer`; return the source address the observer sees, after
    checking that its answer comes back to `sender` (the NAT's reverse path)."""
    token = os.urandom(8)
    sender.sendto(token, observer.getsockname())
    data, src = observer.recvfrom(100)
    assert data == token
    observer.sendto(b"re:" + token, src)
    data, back = sender.recvfrom(100)
    assert (data, back) == (b"re:" + token, observer.getsockname())
    return src


def assert_silent(sock: socket.socket, what: str) -> None:
    sock.settimeout(SILENCE)
    try:
        data, src = sock.recvfrom(100)
    except TimeoutError:
        return
    finally:
        sock.settimeout(2.0)
    pytest.fail(f"{what}: got {data!r} from {src}")


def wait_until(cond, timeout: float = 5.0, what: str = "condition") -> None:
    """Bounded polling for a state that has no event to wait on (process state)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def stun_mapped_address(sock: socket.socket, server: tuple) -> tuple:
    """One RFC 5389 Binding request as Tailscale sends it (SOFTWARE "tailnode" and a
    FINGERPRINT, both required by derper); the XOR-MAPPED-ADDRESS of the answer."""
    magic, txid = 0x2112A442, os.urandom(12)
    software = struct.pack("!HH", 0x8022, 8) + b"tailnode"
    head = struct.pack("!HHI", 0x0001, len(software) + 8, magic) + txid + software
    sock.sendto(head + struct.pack("!HHI", 0x8028, 4, zlib.crc32(head) ^ 0x5354554E), server)
    data, _ = sock.recvfrom(2048)
    mtype, length, got_magic = struct.unpack_from("!HHI", data)
    assert (mtype, got_magic, data[8:20]) == (0x0101, magic, txid), data
    pos = 20
    while pos + 4 <= 20 + length:
        atype, alen = struct.unpack_from("!HH", data, pos)
        if atype == 0x0020 and data[pos + 5] == 0x01:  # XOR-MAPPED-ADDRESS, IPv4
            port = struct.unpack_from("!H", data, pos + 6)[0] ^ (magic >> 16)
            ip = struct.unpack_from("!I", data, pos + 8)[0] ^ magic
            return socket.inet_ntoa(struct.pack("!I", ip)), port
        pos += 4 + alen + (-alen % 4)
    raise AssertionError(f"no XOR-MAPPED-ADDRESS in {data!r}")


def http_probe(sock: socket.socket, host: str) -> bytes:
    sock.sendall(f"GET /derp/probe HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    return sock.recv(4096)


# --------------------------------------------------------------------------
# NAT behaviour


@pytest.mark.parametrize("kind", ["eim", "symmetric", "none"])
def test_the_internet_sees_the_public_address(lab_factory, kind):
    lab = lab_factory(nat_a=kind, nat_b="eim")
    echo = udp(lab, lab.inet_ns, (lab.relay_ip, ECHO1))
    a = udp(lab, lab.peer_a_ns)
    src = observed_from(a, echo)
    assert src[0] == lab.nat_a_public_ip
    if kind == "none":
        assert lab.nat_a_ns is None and lab.peer_a_ip == lab.nat_a_public_ip
    else:
        assert lab.peer_a_ip != lab.nat_a_public_ip
        assert lab.check_output(lab.peer_a_ns, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).count(
            f" {lab.peer_a_ip}/") == 1


@pytest.mark.parametrize("kind", ["eim", "symmetric"])
def test_mapping_for_two_destinations(lab_factory, kind):
    lab = lab_factory(nat_a=kind, nat_b="eim")
    echo1 = udp(lab, lab.inet_ns, (lab.relay_ip, ECHO1))
    echo2 = udp(lab, lab.inet_ns, (lab.relay_ip, ECHO2))
    a = udp(lab, lab.peer_a_ns)
    m1, m2 = observed_from(a, echo1), observed_from(a, echo2)
    assert m1[0] == m2[0] == lab.nat_a_public_ip
    if kind == "eim":
        assert m1[1] == m2[1] == a.getsockname()[1]  # endpoint-independent, port kept
    else:
        assert m1[1] != m2[1]  # a new mapping per destination


def test_unsolicited_inbound_udp_does_not_reach_the_peer(eim_lab):
    lab = eim_lab
    a = udp(lab, lab.peer_a_ns, ("0.0.0.0", 41641))
    echo1 = udp(lab, lab.inet_ns, (lab.relay_ip, ECHO1))
    echo2 = udp(lab, lab.inet_ns, (lab.relay_ip, ECHO2))
    other_ip = udp(lab, lab.inet_ns, (lab.relay_ip2, ECHO1))
    # To the NAT's public address, on the port the peer will use: no DNAT, nothing arrives.
    echo1.sendto(b"unsolicited", (lab.nat_a_public_ip, 41641))
    assert_silent(a, "unsolicited datagram to the NAT's public address")
    # Straight to the private address, with a route to it: the NAT does not forward it.
    lab.check_output(lab.inet_ns, ["ip", "route", "add", f"{lab.peer_a_ip}/32", "via", lab.nat_a_public_ip])
    echo1.sendto(b"to-private", (lab.peer_a_ip, 41641))
    assert_silent(a, "datagram routed to the private address")
    # Once A talks to echo1, echo1's answers pass (the path works) ...
    mapping = observed_from(a, echo1)
    assert mapping == (lab.nat_a_public_ip, 41641)
    # ... but other ports and addresses of the internet still cannot reach the mapping.
    echo2.sendto(b"other-port", mapping)
    other_ip.sendto(b"other-ip", mapping)
    assert_silent(a, "datagram from an endpoint A never sent to")


def punch(a: socket.socket, b: socket.socket, map_a: tuple, map_b: tuple, rounds: int = 4) -> tuple:
    """Both send to the other's public mapping, round after round (as a real punch does),
    until both have heard the other; returns the sources each side got."""
    got_a, got_b = set(), set()
    for _ in range(rounds):
        a.sendto(b"from-a", map_b)
        b.sendto(b"from-b", map_a)
        for sock, got, expect in ((a, got_a, b"from-b"), (b, got_b, b"from-a")):
            sock.settimeout(SILENCE / rounds)
            try:
                while True:
                    data, src = sock.recvfrom(100)
                    assert data == expect
                    got.add(src)
            except TimeoutError:
                pass
        if got_a and got_b:
            break
    return got_a, got_b


@pytest.mark.parametrize("nat_a,nat_b,works", [
    ("eim", "eim", True),
    ("none", "eim", True),
    ("eim", "symmetric", False),
    ("symmetric", "symmetric", False),
])
def test_hole_punching_with_plain_sockets(lab_factory, nat_a, nat_b, works):
    lab = lab_factory(nat_a=nat_a, nat_b=nat_b)
    stun = udp(lab, lab.inet_ns, (lab.relay_ip, ECHO1))
    a, b = udp(lab, lab.peer_a_ns), udp(lab, lab.peer_b_ns)
    map_a, map_b = observed_from(a, stun), observed_from(b, stun)  # what STUN would report
    got_a, got_b = punch(a, b, map_a, map_b)
    if works:
        assert (got_a, got_b) == ({map_b}, {map_a})
        a.sendto(b"data", map_b)
        assert b.recvfrom(100) == (b"data", map_a)
        b.sendto(b"more", map_a)
        assert a.recvfrom(100) == (b"more", map_b)
    else:
        assert (got_a, got_b) == (set(), set())


def test_one_lan_peers_reach_each_other_on_local_addresses(lan_lab):
    lab = lan_lab
    assert lab.nat_a_ns == lab.nat_b_ns and lab.nat_a_public_ip == lab.nat_b_public_ip
    a = udp(lab, lab.peer_a_ns, (lab.peer_a_ip, 0))
    b = udp(lab, lab.peer_b_ns, (lab.peer_b_ip, 0))
    a.sendto(b"hi-b", b.getsockname())
    assert b.recvfrom(100) == (b"hi-b", a.getsockname())
    b.sendto(b"hi-a", a.getsockname())
    assert a.recvfrom(100) == (b"hi-a", b.getsockname())
    echo = udp(lab, lab.inet_ns, (lab.relay_ip, ECHO1))
    assert observed_from(a, echo)[0] == observed_from(b, echo)[0] == lab.nat_a_public_ip


# --------------------------------------------------------------------------
# block_udp


def test_block_udp_mid_transfer_keeps_tcp_to_the_relay(eim_lab):
    lab = eim_lab
    echo = udp(lab, lab.inet_ns, (lab.relay_ip, ECHO1))
    listener = lab.socket(lab.inet_ns, type=socket.SOCK_STREAM)
    listener.bind((lab.relay_ip, 443))
    listener.listen(4)
    listener.settimeout(2)
    a, b = udp(lab, lab.peer_a_ns), udp(lab, lab.peer_b_ns)
    mapping = observed_from(a, echo)

    lab.block_udp(lab.nat_a_ns)
    a.sendto(b"after-block", echo.getsockname())
    assert_silent(echo, "UDP out of a blocked NAT")
    echo.sendto(b"reply-on-established-flow", mapping)
    assert_silent(a, "UDP into a blocked NAT on an established flow")
    observed_from(b, echo)  # only NAT A is blocked
    with lab.connect(lab.peer_a_ns, (lab.relay_ip, 443)) as tcp:
        conn, src = listener.accept()
        with conn:
            assert src[0] == lab.nat_a_public_ip
            tcp.sendall(b"tcp still works")
            assert conn.recv(100) == b"tcp still works"
            conn.sendall(b"both ways")
            assert tcp.recv(100) == b"both ways"

    lab.unblock_udp(lab.nat_a_ns)
    lab.unblock_udp(lab.nat_a_ns)  # idempotent
    assert observed_from(a, echo) == mapping


def test_block_udp_allow_ports_lets_stun_through(eim_lab):
    lab = eim_lab
    stun = udp(lab, lab.inet_ns, (lab.relay_ip, STUN_PORT))
    echo = udp(lab, lab.inet_ns, (lab.relay_ip, ECHO1))
    a = udp(lab, lab.peer_a_ns)
    lab.block_udp(lab.nat_a_ns, allow_ports=[STUN_PORT])
    assert observed_from(a, stun)[0] == lab.nat_a_public_ip
    a.sendto(b"x", echo.getsockname())
    assert_silent(echo, "UDP to a port that is not allowed")


def test_block_udp_on_a_host_without_nat(lab_factory):
    lab = lab_factory(nat_a="none", nat_b="eim")
    echo = udp(lab, lab.inet_ns, (lab.relay_ip, ECHO1))
    a = udp(lab, lab.peer_a_ns)
    observed_from(a, echo)
    lab.block_udp(lab.peer_a_ns)
    with pytest.raises(PermissionError):
        a.sendto(b"x", echo.getsockname())
    local = udp(lab, lab.peer_a_ns, ("127.0.0.1", 0))
    a.sendto(b"loopback", local.getsockname())  # a and local share the namespace's loopback
    assert local.recvfrom(100)[0] == b"loopback"
    lab.unblock_udp(lab.peer_a_ns)
    observed_from(a, echo)


# --------------------------------------------------------------------------
# processes


SEND_ONE = ("import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            "s.sendto(b'from-child', (sys.argv[1], int(sys.argv[2])))")


def test_run_and_check_output_run_inside_the_namespace(eim_lab):
    lab = eim_lab
    echo = udp(lab, lab.inet_ns, (lab.relay_ip, ECHO1))
    proc = lab.run(lab.peer_b_ns, [sys.executable, "-c", SEND_ONE, lab.relay_ip, ECHO1])
    assert proc.wait(timeout=10) == 0
    data, src = echo.recvfrom(100)
    assert (data, src[0]) == (b"from-child", lab.nat_b_public_ip)
    routes = lab.check_output(lab.peer_b_ns, ["ip", "-4", "route", "show", "default"])
    assert f"via {lab.nat_b_lan_ip}" in routes
    with pytest.raises(subprocess.CalledProcessError):
        lab.check_output(lab.peer_b_ns, [sys.executable, "-c", "raise SystemExit(3)"])


def test_netns_entered_moves_only_this_thread_and_back(eim_lab):
    lab = eim_lab
    echo = udp(lab, lab.inet_ns, (lab.relay_ip, ECHO1))
    home = os.stat("/proc/thread-self/ns/net").st_ino
    with netns_entered(lab.peer_a_ns):
        assert os.stat("/proc/thread-self/ns/net").st_ino != home
        inside = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    assert os.stat("/proc/thread-self/ns/net").st_ino == home
    with inside:
        inside.settimeout(2)
        assert observed_from(inside, echo)[0] == lab.nat_a_public_ip


ECHO_LINES = ("import sys\nprint('ready', flush=True)\n"
              "for line in sys.stdin:\n    print('echo', line.strip(), flush=True)\n")


def test_freeze_and_thaw(eim_lab):
    lab = eim_lab
    proc = lab.run(lab.peer_a_ns, [sys.executable, "-c", ECHO_LINES], stdin=subprocess.PIPE,
                   stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    lab.freeze(proc)
    wait_until(lambda: process_state(proc.pid) == "T", what="the process to stop")
    lab.thaw(proc)
    wait_until(lambda: process_state(proc.pid) != "T", what="the process to continue")
    proc.stdin.write("one\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "echo one\n"
    lab.freeze(proc)  # left frozen: teardown must still end it


# --------------------------------------------------------------------------
# teardown


STUBBORN = ("import os, signal, subprocess, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print('ready', child.pid, flush=True)\n"
            "time.sleep(60)\n")


def test_teardown_when_the_body_raises(lab_factory):
    other = lab_factory()  # the skip-or-fail check, and a lab of this process that must survive
    with pytest.raises(RuntimeError, match="boom"):
        with Lab.two_nats("eim", "symmetric") as lab:
            names = list(lab.namespaces)
            assert set(names) <= set(list_namespaces())
            stubborn = lab.run_logged(lab.peer_a_ns, [sys.executable, "-c", STUBBORN])
            grandchild = int(stubborn.wait_for_line(r"^ready (\d+)", timeout=10).group(1))
            plain = lab.run(lab.inet_ns, [sys.executable, "-c", "import time; time.sleep(60)"])
            lab.freeze(plain)
            raise RuntimeError("boom")
    assert not set(names) & set(list_namespaces())
    assert set(other.namespaces) <= set(list_namespaces())
    assert stubborn.proc.returncode == -signal.SIGKILL  # ignored SIGTERM: killed after the grace
    assert plain.returncode == -signal.SIGTERM          # frozen: thawed, then terminated
    wait_until(lambda: process_gone(grandchild), what="the grandchild (not started by the lab) to die")
    lab.close()  # idempotent


CHILD_LAB = ("import os, signal, sys\n"
             "from tests.lab.netns import Lab\n"
             "lab = Lab.two_nats()\n"
             "p = lab.run(lab.peer_a_ns, [sys.executable, '-c', 'import time; time.sleep(60)'])\n"
             "print(p.pid, *lab.namespaces, flush=True)\n"
             "if sys.stdin.readline().strip() == 'crash':\n"
             "    os.kill(os.getpid(), signal.SIGKILL)\n"
             "sys.exit(0)  # without lab.close(): atexit must clean up\n")


def child_with_lab() -> tuple:
    """A python process that builds a lab and waits for a line: "crash" (SIGKILLs itself) or
    anything else (exits without closing the lab)."""
    child = subprocess.Popen([sys.executable, "-c", CHILD_LAB], cwd=REPO_ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    words = child.stdout.readline().split()
    assert len(words) == 6, words
    return child, int(words[0]), words[1:]


def tell(child: subprocess.Popen, line: str) -> None:
    child.stdin.write(line + "\n")
    child.stdin.close()
    child.wait(timeout=15)  # not communicate(): the lab's process holds the same stdout
    child.stdout.close()


def test_atexit_cleans_up_and_live_labs_of_other_processes_are_kept(lab_factory):
    child, pid, names = child_with_lab()
    try:
        lab_factory()  # removes stale namespaces: the child's are not stale
        assert set(names) <= set(list_namespaces())
        tell(child, "exit")
    finally:
        child.kill()
    assert child.returncode == 0
    assert not set(names) & set(list_namespaces())
    wait_until(lambda: process_gone(pid), what="the child's lab process to die")


def test_a_crashed_run_is_cleaned_up_by_the_next_lab(lab_factory):
    lab_factory()  # the skip-or-fail check
    child, pid, names = child_with_lab()
    try:
        tell(child, "crash")
    finally:
        child.kill()
    assert child.returncode == -signal.SIGKILL
    assert set(names) <= set(list_namespaces())  # a crash leaves them behind ...
    try:
        assert set(remove_stale_namespaces()) >= set(names)  # ... setup of the next lab removes them
    finally:
        if set(names) & set(list_namespaces()):
            remove_stale_namespaces()
    assert not set(names) & set(list_namespaces())
    wait_until(lambda: process_gone(pid), what="the crashed run's process to die")


@pytest.mark.parametrize("required", [False, True])
def test_require_lab_skips_or_fails_with_the_reason(monkeypatch, required):
    monkeypatch.setattr(netns, "_probe_result", ["the network lab needs root (test)"])
    monkeypatch.setattr(netns, "REQUIRE_LAB", required)
    outcome = pytest.fail.Exception if required else pytest.skip.Exception
    with pytest.raises(outcome, match=r"needs root \(test\)") as info:
        netns.require_lab()
    assert ("DERPNET_REQUIRE_LAB=1" in str(info.value)) == required


# --------------------------------------------------------------------------
# relays in the internet namespace


def test_our_relay_in_inet_through_a_nat(eim_lab):
    lab = eim_lab
    relay = start_our_relay(lab)
    assert relay.url == f"http://{lab.relay_ip}:3340"
    with lab.connect(lab.peer_a_ns, (lab.relay_ip, relay.port)) as s:
        assert http_probe(s, lab.relay_ip).startswith(b"HTTP/1.1 200")


def test_our_relay_with_tls_on_443(eim_lab):
    lab = eim_lab
    relay = start_our_relay(lab, tls=True)
    assert relay.url == f"https://{lab.relay_ip}:443"
    ctx = ssl.create_default_context(cafile=relay.ca_file)  # what SSL_CERT_FILE gives a Go client
    with lab.connect(lab.peer_b_ns, (lab.relay_ip, 443)) as raw:
        with ctx.wrap_socket(raw, server_hostname=lab.relay_ip) as s:
            assert http_probe(s, lab.relay_ip).startswith(b"HTTP/1.1 200")


@pytest.mark.interop
def test_go_derper_in_inet_with_stun(lab_factory):
    lab = lab_factory(nat_a="eim", nat_b="symmetric")
    require_go_derper()
    derper = start_go_derper(lab)
    assert derper.url == f"http://{lab.relay_ip}:3340"
    a, b = udp(lab, lab.peer_a_ns), udp(lab, lab.peer_b_ns)
    assert stun_mapped_address(a, (lab.relay_ip, STUN_PORT)) == (lab.nat_a_public_ip, a.getsockname()[1])
    assert stun_mapped_address(b, (lab.relay_ip, STUN_PORT))[0] == lab.nat_b_public_ip
    with lab.connect(lab.peer_b_ns, (lab.relay_ip, 3340)) as s:
        assert http_probe(s, lab.relay_ip).startswith(b"HTTP/1.1 200")
