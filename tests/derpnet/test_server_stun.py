"""The relay's STUN responder (derpnet/server/stun.py): real relays answering real UDP sockets
on loopback, garbage ignored, --stun-port 0, and the start errors (explicit port: one line and
exit 1; default port busy: one warning, DERP still served)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import pytest

from derpnet import stun
from derpnet.server import DerpServer
from derpnet.server.stun import DEFAULT_PORT, MAX_REQUEST_SIZE, StunServer
from tests.interop_peers import LoggedProcess, free_port
from tests.rawderp import http_get
from tests.relays import READY_RX, REPO_ROOT, OurRelay

ENV = dict(os.environ, PYTHONPATH=str(REPO_ROOT))


def udp_socket(family: int = socket.AF_INET, host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(5)
    return s


def ask(s: socket.socket, server: tuple[str, int]) -> tuple[bytes, tuple[str, int]]:
    """One Binding request from `s`; the (tx id, mapped address) of the first answer, which must match."""
    tx = stun.new_tx_id()
    s.sendto(stun.binding_request(tx), server)
    got_tx, mapped = stun.parse_response(s.recvfrom(2048)[0])
    assert got_tx == tx
    return tx, mapped


def serves_derp(url: str) -> bool:
    """The relay's DERP endpoint answers (a latency probe, then /derp without an upgrade)."""
    return (http_get(url, "/derp/probe").startswith(b"HTTP/1.1 200 ")
            and http_get(url, "/derp").startswith(b"HTTP/1.1 426 "))


GARBAGE = [
    b"hello",
    b"\x00" * 20,
    os.urandom(100),
    b"TS\xf0\x9f\x92\xac" + os.urandom(80),                         # a disco packet
    stun.binding_response(bytes(12), ("1.2.3.4", 5)),               # a response, not a request
    stun.binding_request(bytes(12))[:-1] + b"\x00",                 # a bad FINGERPRINT
    stun.binding_request(bytes(12)).ljust(MAX_REQUEST_SIZE + 1, b"\0"),  # too large to parse
]


# ---------------------------------------------------------------- a relay subprocess

def test_relay_answers_binding_requests_and_ignores_garbage():
    port = free_port(kind=socket.SOCK_DGRAM)
    with OurRelay(stun_port=port) as relay, udp_socket() as s:
        assert relay.stun_port == port
        assert f"STUN on udp 127.0.0.1:{port}" in relay.output()
        server = ("127.0.0.1", port)
        assert ask(s, server)[1] == s.getsockname()
        for junk in GARBAGE:
            s.sendto(junk, server)
        # no answer to any of the junk: the next datagram is the answer to this request
        assert ask(s, server)[1] == s.getsockname()
        with udp_socket() as other:  # each client learns its own address
            assert ask(other, server)[1] == other.getsockname()
        assert serves_derp(relay.url)  # and the relay is a relay as usual


def _udp_socket_inodes(pid: int) -> list[str]:
    """Inodes of the UDP sockets that process `pid` holds (from /proc)."""
    inodes = set()
    for name in ("udp", "udp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                inodes |= {line.split()[9] for line in list(f)[1:]}
        except FileNotFoundError:
            pass
    held = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            held.append(link[8:-1])
    return held


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_stun_port_0_disables():
    with OurRelay() as relay:  # OurRelay passes --stun-port 0 by default
        assert relay.stun_port is None
        assert "--stun-port" in relay.logged.argv and "STUN on udp" not in relay.output()
        assert _udp_socket_inodes(relay.proc.pid) == []
    with OurRelay(stun_port=free_port(kind=socket.SOCK_DGRAM)) as relay:  # the check does see one
        assert len(_udp_socket_inodes(relay.proc.pid)) == 1


@pytest.mark.parametrize("command", [["-m", "derpnet.server"], ["-m", "derpnet.cmd", "relay"]])
def test_explicit_busy_port_is_one_line_and_exit_1(command):
    with udp_socket() as busy:
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, *command, "--listen", "127.0.0.1:0", "--stun-port", str(port)],
                           capture_output=True, text=True, timeout=30, env=ENV, cwd=REPO_ROOT)
    assert r.returncode == 1
    assert r.stdout == ""
    prefix = "derpnet relay: " if command[1] == "derpnet.server" else "derpconnect: error: "
    assert r.stderr.strip() == f"{prefix}cannot listen for STUN on udp 127.0.0.1:{port}: address already in use"


def test_bad_stun_port_is_a_usage_error():
    r = subprocess.run([sys.executable, "-m", "derpnet.server", "--stun-port", "65536"],
                       capture_output=True, text=True, timeout=30, env=ENV, cwd=REPO_ROOT)
    assert r.returncode == 2 and "--stun-port: bad port '65536'" in r.stderr


def test_default_port_busy_warns_and_still_serves_derp(tmp_path):
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        busy.bind(("127.0.0.1", DEFAULT_PORT))  # held here, so that the relay's default bind fails
    except OSError as e:
        busy.close()
        pytest.skip(f"UDP 127.0.0.1:{DEFAULT_PORT} is not free on this machine ({e.strerror})")
    with busy:
        proc = LoggedProcess([sys.executable, "-m", "derpnet.server", "--listen", "127.0.0.1:0"],
                             tmp_path / "relay.log", env=ENV, cwd=REPO_ROOT)
        try:
            url = proc.wait_for_line(READY_RX, timeout=20).group("url")
            warnings = [line for line in proc.lines() if "WARNING" in line]
            assert len(warnings) == 1, proc.output()
            assert f"no STUN: cannot listen on udp 127.0.0.1:{DEFAULT_PORT}: address already in use" in warnings[0]
            assert serves_derp(url)
            assert "STUN on udp" not in proc.output()
        finally:
            proc.stop()


# ---------------------------------------------------------------- in process

def test_in_process_relay_counts_answers_and_drops():
    port = free_port(kind=socket.SOCK_DGRAM)
    with DerpServer(stun_port=port) as relay, udp_socket() as s:
        assert relay.stun_port == port
        for junk in GARBAGE:
            s.sendto(junk, ("127.0.0.1", port))
        assert ask(s, ("127.0.0.1", port))[1] == s.getsockname()
        st = relay.stats()["stun"]
    assert st["answered"] == 1 and st["dropped"] == len(GARBAGE) and st["port"] == port
    assert st["dropped_by"] == {"too_large": 1, "not_stun": 4, "not_binding_request": 2, "bad_source": 0,
                                "congested": 0}
    assert relay.stats()["stun"]["answered"] == 1  # still readable once closed
    with DerpServer() as plain:
        assert plain.stun_port is None and plain.stats()["stun"] is None


def test_in_process_relay_with_busy_stun_port_does_not_start():
    with udp_socket() as busy:
        relay = DerpServer(stun_port=busy.getsockname()[1])
        with pytest.raises(OSError):
            relay.start()


def _can_bind(family: int, host: str) -> bool:
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _can_bind(socket.AF_INET6, "::1"), reason="no IPv6 loopback")
def test_ipv6_relay_answers_with_ipv6_address():
    port = free_port("::1", kind=socket.SOCK_DGRAM)
    with DerpServer(host="::1", stun_port=port) as relay, udp_socket(socket.AF_INET6, "::1") as s:
        assert relay.stun_port == port
        assert ask(s, ("::1", port))[1] == ("::1", s.getsockname()[1])


def test_wildcard_host_is_dual_stack():
    """No host (`--listen :PORT`): one socket for every interface; an IPv4 client gets its
    IPv4 address back, not the IPv4-mapped form the dual-stack socket sees."""
    async def main() -> tuple[str, int]:
        server = StunServer()
        await server.start(None, 0)
        try:
            loop = asyncio.get_running_loop()
            with udp_socket() as s:
                return await loop.run_in_executor(None, lambda: (ask(s, ("127.0.0.1", server.port))[1],
                                                                 s.getsockname()))
        finally:
            server.close()

    mapped, own = asyncio.run(main())
    assert mapped == own


# ---------------------------------------------------------------- the protocol object alone

class FakeTransport:
    def __init__(self) -> None:
        self.sent: list = []

    def sendto(self, data: bytes, addr) -> None:
        self.sent.append((data, addr))

    def close(self) -> None:
        pass


def test_congested_socket_drops_instead_of_queueing():
    server = StunServer()
    t = FakeTransport()
    server.connection_made(t)  # type: ignore[arg-type]
    req = stun.binding_request(bytes(12))
    server.datagram_received(req, ("::ffff:192.0.2.1", 40000, 0, 0))
    assert t.sent == [(stun.binding_response(bytes(12), ("192.0.2.1", 40000)), ("::ffff:192.0.2.1", 40000, 0, 0))]
    server.pause_writing()
    server.datagram_received(req, ("192.0.2.1", 40000))
    server.resume_writing()
    server.datagram_received(req, ("192.0.2.1", 40000))
    assert len(t.sent) == 2 and server.answered == 2 and server.drops["congested"] == 1
    server.error_received(OSError("unreachable"))
    assert server.stats()["send_errors"] == 1
