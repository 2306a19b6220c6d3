"""The direct-path hooks: packets follow the path's MTU (PathChanged, path_mtu) and the
PacketConn learns which peers proved their key (note_peer_verified)."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import derpquic
from derpquic.config import GO_PACKET_SIZE
from derpquic.conn import Conn
from derpquic.driver import Driver
from tests.derpquic.helpers import Background, dial_pair, recv_all, sha256_stream_sink

SMALL = 1252


class Path:
    """The fake relay as a path between two keys: loses what exceeds the MTU when it
    arrives (as a UDP path would, also packets in flight when the MTU shrank) and records
    the size of every datagram written once `watch()` is on."""

    def __init__(self, relay, a, b) -> None:
        self.ends = {a, b}
        self.mtu = 65535
        self.sizes: list[int] = []
        self.oversized = 0
        self.watching = False
        self._lock = threading.Lock()
        relay.drop = self._sent
        relay.lose = self._arrived

    def _sent(self, src, dst, data) -> bool:
        if {src, dst} == self.ends:
            with self._lock:
                if self.watching:
                    self.sizes.append(len(data))
        return False

    def _arrived(self, src, dst, data) -> bool:
        if {src, dst} == self.ends and len(data) > self.mtu:
            with self._lock:
                self.oversized += 1
            return True
        return False

    def watch(self) -> None:
        with self._lock:
            self.sizes = []
            self.watching = True


def _switch(pc_a, pc_b, path: Path, mtu: int, relay=None) -> None:
    """Change the path's MTU (with `relay`: once datagrams bigger than it are in flight,
    which the path then loses) and tell both PacketConns."""
    deadline = time.monotonic() + 10
    while relay is not None and time.monotonic() < deadline:
        with relay.frozen() as in_flight:
            if any(n > mtu for n in in_flight):
                path.mtu = mtu
                break
        time.sleep(0.001)
    path.mtu = mtu
    pc_a.set_path(pc_b.local_addr(), mtu)
    pc_b.set_path(pc_a.local_addr(), mtu)
    path.watch()  # both drivers resized under their lock: every later datagram is new


def _pair(fake, **kw):
    pc_a, pc_b = fake.pc(), fake.pc()
    ln = fake.track(derpquic.Listener(pc_b, **kw))
    d = fake.track(derpquic.Dialer(pc_a, **kw))
    return (pc_a, pc_b, *dial_pair(ln, d, timeout=60))


def test_path_change_resizes_packets_mid_transfer(fake):
    fake.relay.latency = 0.005  # (so that packets are in flight when the path shrinks)
    pc_a, pc_b, s, r = _pair(fake)
    path = Path(fake.relay, pc_a.local_addr(), pc_b.local_addr())
    assert s._conn.quic.max_datagram_size == r._conn.quic.max_datagram_size == 65527
    data = os.urandom(6 << 20)
    sink = Background(lambda: sha256_stream_sink(r))
    sender = Background(lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)))
    deadline = time.monotonic() + 30
    while r._state.read_total < (1 << 20) and time.monotonic() < deadline:  # a transfer in progress
        time.sleep(0.005)
    _switch(pc_a, pc_b, path, SMALL, fake.relay)
    assert s._conn.quic.max_datagram_size == r._conn.quic.max_datagram_size == SMALL
    sender.result(timeout=60)
    n, digest = sink.result(timeout=60)
    assert n == len(data) and digest == hashlib.sha256(data).digest()
    assert path.oversized > 0, "no big packet was in flight: the test proved nothing about resends"
    assert path.sizes and max(path.sizes) <= SMALL, max(path.sizes)

    # Back on the relay: packets grow again.
    _switch(pc_a, pc_b, path, 65535)
    assert s._conn.quic.max_datagram_size == r._conn.quic.max_datagram_size == 65527
    r.sendall(os.urandom(2 << 20))
    r.shutdown(socket.SHUT_WR)
    assert len(recv_all(s)) == 2 << 20
    assert max(path.sizes) > 16384, max(path.sizes)
    s.close()
    r.close()


def test_connection_dialled_on_a_small_path_never_exceeds_it(fake):
    pc_a, pc_b = fake.pc(), fake.pc()
    path = Path(fake.relay, pc_a.local_addr(), pc_b.local_addr())
    path.mtu = SMALL
    path.watch()
    pc_a.set_path(pc_b.local_addr(), SMALL)
    pc_b.set_path(pc_a.local_addr(), SMALL)
    ln = fake.track(derpquic.Listener(pc_b))
    d = fake.track(derpquic.Dialer(pc_a))
    srv = Background(lambda: _echo_one(ln))
    with d.dial(ln.addr, timeout=10) as s:
        s.settimeout(30)
        payload = os.urandom(300_000)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == payload
    srv.result()
    assert path.oversized == 0 and max(path.sizes) <= SMALL
    assert len(path.sizes) > 200  # not one big packet (65 KiB packets would need ~10)


def _echo_one(ln) -> None:
    with ln.accept(timeout=10) as r:
        r.settimeout(30)
        r.sendall(recv_all(r))


def test_path_change_for_another_peer_changes_nothing(fake):
    pc_a, pc_b, s, r = _pair(fake)
    pc_a.set_path(fake.pc().local_addr(), SMALL)
    assert s._conn.quic.max_datagram_size == 65527
    s.close()
    r.close()


class GoLikeConn(Conn):
    """A listener-side connection that selects no ALPN, as quic-go without NextProtos."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.quic.optional_alpn = None


class GoLikeDriver(Driver):
    conn_class = GoLikeConn


def test_go_peer_connections_stay_at_go_packet_size(fake):
    """A connection that did not negotiate derpnet-auth (a Go peer) keeps quic-go's packet
    size on a large path, and is never reported as verified."""
    pc_a, pc_c = fake.pc(), fake.pc()
    d = fake.track(derpquic.Dialer(pc_a, allow_unauthenticated=True))
    GoLikeDriver.acquire(pc_c, pc_c.private_key)
    go_ln = fake.track(derpquic.Listener(pc_c))
    go_ln._driver.release()  # balance our own acquire
    s, r = dial_pair(go_ln, d)
    assert not s.authenticated and not r.authenticated
    assert s._conn.quic.max_datagram_size == GO_PACKET_SIZE
    pc_a.set_path(pc_c.local_addr(), 65535)
    assert s._conn.quic.max_datagram_size == GO_PACKET_SIZE
    pc_a.set_path(pc_c.local_addr(), SMALL)  # a smaller path still shrinks them
    assert s._conn.quic.max_datagram_size == SMALL
    assert pc_a.verified == [] and pc_c.verified == []
    s.close()
    r.close()


def test_verified_peers_are_reported_to_the_packetconn(fake):
    pc_a, pc_b, s, r = _pair(fake)
    assert pc_a.verified == [pc_b.local_addr()]
    assert pc_b.verified == [pc_a.local_addr()]
    s.close()
    r.close()


def test_packetconn_without_path_hooks_still_works(fake):
    """An AddressRewriter has neither path_mtu nor events nor note_peer_verified."""
    from tests.derpquic.fakes import AddressRewriter
    pc_a = fake.pc()
    ln = fake.listener()
    bare = AddressRewriter(pc_a, victim=ln.addr, impostor=ln.addr)
    d = fake.track(derpquic.Dialer(bare, pc_a.private_key))
    srv = Background(lambda: _echo_one(ln))
    with d.dial(ln.addr, timeout=10) as s:
        s.settimeout(10)
        s.sendall(b"plain")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"plain"
        assert s._conn.quic.max_datagram_size == 65527
    srv.result()
