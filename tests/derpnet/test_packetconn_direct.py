"""PacketConn's direct paths on loopback: real relay subprocess, real UDP sockets.

The NAT cases live in tests/lab (network namespaces); here: discovery only with verified
peers, delivery from either path, spoofed or unknown UDP never delivered, the options.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

import derpnet
from derpnet.paths import PathChanged
from derpnet.stunprobe import StunProbe
from tests.relays import OurRelay


@pytest.fixture(scope="module")
def relay():
    with OurRelay() as r:
        yield r


class Events:
    def __init__(self):
        self.cond = threading.Condition()
        self.items = []

    def __call__(self, ev):
        with self.cond:
            self.items.append(ev)
            self.cond.notify_all()

    def wait(self, pred, timeout=10.0):
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                for ev in self.items:
                    if pred(ev):
                        return ev
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no such event in {self.items!r}")
                self.cond.wait(left)


def _exchange(a, b, n=20):
    """Traffic both ways (discovery runs only while peers are active)."""
    for _ in range(n):
        a.write_to(b"ping", b.local_addr())
        b.write_to(b"pong", a.local_addr())


def test_verified_peers_go_direct_and_data_flows_on_the_udp_path(relay):
    ev_a = Events()
    with derpnet.listen_packet(relay.url, on_event=ev_a) as a, derpnet.listen_packet(relay.url) as b:
        a.note_peer_verified(b.local_addr())
        _exchange(a, b)
        changed = ev_a.wait(lambda e: isinstance(e, PathChanged) and e.direct)
        assert changed.peer == b.local_addr() and changed.addr[0] == "127.0.0.1"
        info = a.paths()[b.local_addr()]
        assert info["path"].startswith("127.0.0.1:") and info["discovery"]
        ev_a.wait(lambda e: isinstance(e, PathChanged) and e.mtu > 60000)  # probed up on loopback
        assert a.path_mtu(b.local_addr()) > 60000
        before = a.stats()["packets_out_direct"]
        big = bytes(range(256)) * 200  # 51,200 bytes: one UDP datagram on loopback
        a.write_to(big, b.local_addr())
        assert a.stats()["packets_out_direct"] == before + 1
        b.settimeout(5)
        while True:
            data, src = b.read_from()
            if data == big:
                break
        assert src == a.local_addr()
        assert a.paths()[b.local_addr()]["bytes_sent"]["direct"] >= len(big)


def test_nothing_but_data_reaches_a_peer_that_never_proved_itself(relay):
    """A Go derpnet peer must never get a disco packet: without note_peer_verified (and with
    no disco from the peer), a peer only ever receives 0x00-framed datagrams."""
    with derpnet.listen_packet(relay.url) as a, \
            derpnet.listen_packet(relay.url, direct=False) as go_like:
        for _ in range(50):
            a.write_to(b"hello", go_like.local_addr())
        go_like.settimeout(5)
        for _ in range(50):
            assert go_like.read_from()[0] == b"hello"
        assert go_like.stats()["drops"]["bad_framing"] == 0
        assert a.paths() == {} or not a.paths()[go_like.local_addr()]["discovery"]


def test_disco_from_a_peer_enables_discovery_back(relay):
    ev_b = Events()
    with derpnet.listen_packet(relay.url) as a, derpnet.listen_packet(relay.url, on_event=ev_b) as b:
        a.note_peer_verified(b.local_addr())  # only A knows; B learns from A's disco
        _exchange(a, b)
        ev_b.wait(lambda e: isinstance(e, PathChanged) and e.direct)
        assert b.paths()[a.local_addr()]["discovery"]


def test_udp_data_from_an_unknown_address_is_dropped(relay):
    with derpnet.listen_packet(relay.url) as a:
        port = a.stats()["direct"]["port"]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"\x00spoofed", ("127.0.0.1", port))
            s.sendto(b"garbage", ("127.0.0.1", port))
        a.settimeout(0.5)
        with pytest.raises(TimeoutError):
            a.read_from()
        drops = a.stats()["direct"]["drops"]
        assert drops["unknown_source"] == 1 and drops["unknown_packet"] == 1


def test_udp_disco_from_an_unknown_key_is_dropped_unopened(relay):
    from derpnet.disco import DiscoBox, Ping, new_tx_id

    stranger = derpnet.PrivateKey.generate()
    with derpnet.listen_packet(relay.url) as a, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        port = a.stats()["direct"]["port"]
        ping = DiscoBox(stranger).seal(a.local_addr(), Ping(new_tx_id(), stranger.public_key))
        s.sendto(ping, ("127.0.0.1", port))
        with pytest.raises(TimeoutError):
            s.recvfrom(2048)  # no Pong, no Ping back: nothing is sent to an unknown key
        assert a.stats()["direct"]["drops"]["unknown_peer"] == 1 and a.paths() == {}


def test_no_direct_means_no_udp_socket(relay):
    with derpnet.listen_packet(relay.url, direct=False) as a:
        assert "direct" not in a.stats() and a.paths() == {}
        assert not [t for t in threading.enumerate() if t.name.startswith("derpnet-udp-")
                    and a.local_addr().b64()[:8] in t.name]


def test_close_stops_the_udp_thread(relay):
    a = derpnet.listen_packet(relay.url)
    name = f"derpnet-udp-{a.local_addr().b64()[:8]}"
    assert any(t.name == name for t in threading.enumerate())
    a.close()
    a.close()
    assert not any(t.name == name and t.is_alive() for t in threading.enumerate())


def test_a_bad_stun_option_is_a_clear_error(relay):
    with pytest.raises(ValueError, match="HOST:PORT"):
        derpnet.listen_packet(relay.url, stun="nohostport")


def test_stun_answers_from_our_relay_add_the_mapped_endpoint():
    from tests.interop_peers import free_port

    with OurRelay(stun_port=free_port(kind=socket.SOCK_DGRAM)) as r:
        with derpnet.listen_packet(r.url, stun=f"127.0.0.1:{r.stun_port}") as a:
            port = a.stats()["direct"]["port"]
            deadline = time.monotonic() + 5
            while a.stats()["direct"]["stun_mapped"] is None and time.monotonic() < deadline:
                time.sleep(0.02)  # polling an observable state: the answer comes on another thread
            assert a.stats()["direct"]["stun_mapped"] == ("127.0.0.1", port)
            assert ("127.0.0.1", port) in a.stats()["direct"]["local_endpoints"]


def test_stun_probe_retries_then_refreshes_and_only_trusts_its_server():
    from derpnet import stun

    server = ("192.0.2.1", 3478)
    p = StunProbe(server, tries=3, interval=0.5, refresh=60.0)
    assert p.poll(0.0) is None  # nothing before the first round
    p.restart(0.0)
    sent = {t: p.poll(t) for t in (0.0, 0.1, 0.5, 1.0, 1.2)}
    assert [r is not None for r in sent.values()] == [True, False, True, True, False]
    assert p.next_deadline() == 61.0  # the round is spent: the next one at the refresh
    req = sent[1.0]
    tx = req[8:20]
    answer = stun.binding_response(tx, ("203.0.113.7", 4242))
    assert p.on_response(answer, ("198.51.100.1", 3478), 1.3) is None  # not our server
    assert p.on_response(stun.binding_response(stun.new_tx_id(), ("203.0.113.7", 1)), server, 1.3) is None
    assert p.on_response(answer, server, 1.3) == ("203.0.113.7", 4242) and p.mapped == ("203.0.113.7", 4242)
    assert p.poll(2.0) is None and p.next_deadline() == pytest.approx(61.3)
    assert StunProbe(None).next_deadline() is None
