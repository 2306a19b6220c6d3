"""Lifecycle: keepalive, dead-peer detection, relay outages and restarts, version
negotiation, packet sizes, threads."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import pytest
from aioquic.buffer import Buffer
from aioquic.quic.packet import QuicPacketType, pull_quic_header

import derpquic
from derpquic.config import GO_PACKET_SIZE
from tests.derpquic.helpers import Background, EchoServer, dial_pair, recv_all, recv_exactly, sha256_stream_sink


def _pair(n, **kw):
    ln = n.listener(**kw)
    d = n.dialer(**kw)
    return (ln, d, *dial_pair(ln, d))


def test_idle_tunnel_stays_up_with_keepalive(net):
    """Idle far longer than the idle timeout: keepalive PINGs keep the connection."""
    ln, d, s, r = _pair(net, idle_timeout=1.5, keepalive_interval=0.25)
    idle_until = time.monotonic() + 4.0
    with pytest.raises(TimeoutError):  # nothing arrives for 4 s (> 2.5x the idle timeout)...
        r.settimeout(idle_until - time.monotonic())
        r.recv(1)
    r.settimeout(10)
    s.sendall(b"still there?")  # ...but the tunnel still works
    assert recv_exactly(r, 12) == b"still there?"
    r.sendall(b"yes")
    assert recv_exactly(s, 3) == b"yes"
    s.close()
    r.close()


def test_connection_without_open_streams_idles_out(fake):
    ln, d, s, r = _pair(fake, idle_timeout=0.5, keepalive_interval=0.1)
    conn = s._conn
    s.close()
    r.close()
    assert conn.terminated_event.wait(10), "no keepalive without streams: the idle timeout must end it"


def test_dead_peer_detected_within_idle_timeout(fake):
    ln, d, s, r = _pair(fake, idle_timeout=1.0, keepalive_interval=0.25)
    fake.relay.down = True  # the peer vanishes: no packet gets through any more
    t0 = time.monotonic()
    with pytest.raises(ConnectionAbortedError, match="timed out"):
        s.recv(10)
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0 + 2.0, elapsed  # idle timeout (+ at most 3 PTO)
    with pytest.raises(ConnectionAbortedError):
        s.sendall(b"x")


def test_relay_outage_mid_transfer_recovers(fake):
    """The relay drops everything for 1.5 s in the middle of a transfer: QUIC retransmits."""
    ln, d, s, r = _pair(fake)
    data = os.urandom(8 << 20)
    sink = Background(lambda: sha256_stream_sink(r))
    half = len(data) // 2
    s.sendall(data[:half])
    fake.relay.down = True
    outage = threading.Timer(1.5, lambda: setattr(fake.relay, "down", False))
    outage.start()
    s.sendall(data[half:])
    s.shutdown(socket.SHUT_WR)
    n, digest = sink.result(timeout=60)
    outage.join()
    assert n == len(data) and digest == hashlib.sha256(data).digest()
    s.close()
    r.close()


def test_our_relay_restart_keeps_streams(tmp_path):
    """Our relay is killed and restarted mid-stream; PacketConn reconnects, the stream lives."""
    from tests.derpquic.conftest import Net, assert_no_derpquic_threads
    from tests.relays import OurRelay
    with OurRelay(workdir=str(tmp_path / "relay")) as relay:
        n = Net("ours", url=relay.url)
        try:
            ln, d, s, r = _pair(n)
            data = os.urandom(4 << 20)
            sink = Background(lambda: sha256_stream_sink(r))
            s.sendall(data[: len(data) // 2])
            relay.restart()  # same port, same server key
            s.sendall(data[len(data) // 2:])
            s.shutdown(socket.SHUT_WR)
            got, digest = sink.result(timeout=120)
            assert got == len(data) and digest == hashlib.sha256(data).digest()
            # Each side's driver heard its link come back and probed its connection at once
            # (instead of waiting out a PTO that backed off during the outage).
            assert d._driver.link_ups >= 1 and ln._driver.link_ups >= 1
            r.sendall(b"after restart")
            r.close()
            assert recv_all(s) == b"after restart"
            s.close()
        finally:
            n.close()
    assert_no_derpquic_threads()


def test_packet_size_between_our_peers(net):
    ln, d, s, r = _pair(net)
    want = d.opts.max_datagram_size
    assert want > GO_PACKET_SIZE
    for conn in (s._conn, r._conn):
        assert conn.sizing.uncapped == want  # negotiated: both are ours
        assert conn.quic.max_datagram_size == want  # (the relay path: 65,535 bytes)
    s.close()
    r.close()


def test_version_negotiation(fake):
    """An Initial with a version we do not speak gets a Version Negotiation packet."""
    ln = fake.listener()
    raw = fake.pc()
    dcid, scid = os.urandom(8), os.urandom(8)
    pkt = bytes([0xC0]) + (0x1A2A3A4A).to_bytes(4, "big") + bytes([8]) + dcid + bytes([8]) + scid
    pkt += bytes(1200 - len(pkt))
    raw.write_to(pkt, ln.addr)
    raw.set_read_deadline(time.time() + 5)
    data, src = raw.read_from()
    assert src == ln.addr
    header = pull_quic_header(Buffer(data=data), host_cid_length=8)
    assert header.packet_type == QuicPacketType.VERSION_NEGOTIATION
    assert header.destination_cid == scid and header.source_cid == dcid
    assert 0x00000001 in header.supported_versions


def test_garbage_and_short_initials_ignored(fake):
    ln = fake.listener()
    srv = EchoServer(ln)
    raw = fake.pc()
    for junk in (b"", b"\x00", os.urandom(50), bytes([0xC0]) + (1).to_bytes(4, "big") + bytes(30)):
        raw.write_to(junk, ln.addr)
    d = fake.dialer()
    with d.dial(ln.addr, timeout=10) as s:
        s.settimeout(10)
        s.sendall(b"ok")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"ok"
    srv.close()


def test_threads_named_and_stopped(fake):
    ln, d, s, r = _pair(fake)
    names = {t.name for t in threading.enumerate()}
    assert any(n.startswith("derpquic-rx-") for n in names)
    s.close()
    r.close()
    d.close()
    ln.close()
    from tests.derpquic.conftest import assert_no_derpquic_threads
    assert_no_derpquic_threads()


def test_shared_packetconn_listener_and_dialer_close_independently(fake):
    pc = fake.pc()
    ln = fake.track(derpquic.Listener(pc))
    d = fake.track(derpquic.Dialer(pc))
    assert ln._driver is d._driver
    other = fake.listener()
    srv = EchoServer(other)
    d.close()  # the listener keeps working on the same PacketConn
    d2 = fake.dialer()
    acc = Background(lambda: ln.accept(timeout=10))
    with d2.dial(ln.addr, timeout=10) as s:
        r = acc.result()
        r.sendall(b"hi")
        r.close()
        s.settimeout(10)
        assert recv_all(s) == b"hi"
    with pytest.raises(OSError):
        derpquic.Listener(pc)  # ... and only one listener per PacketConn
    srv.close()


def test_lost_stream_announcement_is_sent_again(fake):
    """The empty STREAM frame that makes a dialled stream visible is retransmitted if lost:
    the listener still sees the stream although the dialler never writes."""
    ln = fake.listener()
    d = fake.dialer()
    dialled = threading.Event()
    dropped = []

    def drop(src, dst, data):
        short_header = bool(data) and not data[0] & 0x80
        if src == d.addr and dst == ln.addr and short_header and not dialled.is_set():
            dropped.append(len(data))
            return True
        return False

    fake.relay.drop = drop
    s = d.dial(ln.addr, timeout=10)
    dialled.set()
    assert dropped, "the test did not drop the announcement"
    r = ln.accept(timeout=10)
    r.sendall(b"hello")
    s.settimeout(10)
    assert recv_exactly(s, 5) == b"hello"
    s.close()
    r.close()


def test_packetconn_failure_fails_everything_promptly(fake):
    """The PacketConn dies under us (e.g. reconnect=False and the relay went away)."""
    pc = fake.pc()
    d = fake.track(derpquic.Dialer(pc))
    ln = fake.listener()
    acc = Background(lambda: ln.accept(timeout=10))
    s = d.dial(ln.addr, timeout=10)
    r = acc.result()  # stays open: the dialler's recv can only end with an error
    blocked = Background(lambda: s.recv(10))
    pc.close()
    with pytest.raises(ConnectionAbortedError, match="relay connection is gone"):
        blocked.result(timeout=10)
    with pytest.raises(ConnectionAbortedError):
        d.dial(ln.addr, timeout=10)
    r.close()
