"""Stream behaviour through each relay: echo, half-close, many streams, many connections,
bulk integrity, back-pressure, errors."""

from __future__ import annotations

import hashlib
import os
import socket
import time

import pytest

import derpquic
from derpnet.errors import PeerNotConnected
from derpnet.keys import PrivateKey
from tests.derpquic.helpers import Background, EchoServer, recv_all, recv_exactly, sha256_stream_sink


def test_echo(net):
    ln = net.listener()
    d = net.dialer()
    srv = EchoServer(ln)
    with d.dial(ln.addr, timeout=10) as s:
        s.settimeout(10)
        s.sendall(b"hello derpquic")
        assert recv_exactly(s, 14) == b"hello derpquic"
        assert s.remote_addr() == ln.addr
        assert s.local_addr() == d.addr
        assert s.authenticated
        s.shutdown(socket.SHUT_WR)
        assert s.recv(10) == b""
    srv.close()


def test_server_speaks_first(net):
    """The listener sees a dialled stream before the dialler writes anything."""
    ln = net.listener()
    d = net.dialer()

    def banner():
        s = ln.accept(timeout=10)
        with s:
            assert s.remote_addr() == d.addr and s.authenticated
            s.sendall(b"220 banner\r\n")
            s.settimeout(10)
            return s.recv(100)

    srv = Background(banner)
    s = d.dial(ln.addr, timeout=10)
    s.settimeout(10)
    assert recv_exactly(s, 12) == b"220 banner\r\n"
    s.sendall(b"QUIT")
    s.close()
    assert srv.result() == b"QUIT"


def test_half_close(net):
    """shutdown(SHUT_WR): the peer reads EOF and can still answer."""
    ln = net.listener()
    d = net.dialer()

    def server():
        s = ln.accept(timeout=10)
        s.settimeout(10)
        data = recv_all(s)  # until the client's FIN
        s.sendall(b"got %d bytes" % len(data))
        s.sendall(hashlib.sha256(data).digest())
        s.close()

    srv = Background(server)
    s = d.dial(ln.addr, timeout=10)
    s.settimeout(10)
    payload = os.urandom(300_000)
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    with pytest.raises(BrokenPipeError):
        s.send(b"x")
    reply = recv_all(s)
    assert reply == b"got 300000 bytes" + hashlib.sha256(payload).digest()
    s.close()
    srv.result()


def test_many_concurrent_streams_one_connection(net):
    ln = net.listener()
    d = net.dialer()
    srv = EchoServer(ln)
    n = 120
    streams = [d.dial(ln.addr, timeout=20) for _ in range(n)]
    conns = {id(s._conn) for s in streams}
    assert len(conns) == 1, "derpnet peers reuse one QUIC connection"
    assert len({s.stream_id for s in streams}) == n

    def talk(i, s):
        with s:
            s.settimeout(30)
            msg = (b"%d:" % i) * 500
            s.sendall(msg)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == msg

    workers = [Background(talk, i, s) for i, s in enumerate(streams)]
    for w in workers:
        w.result()
    srv.close()
    assert srv.accepted == n


def test_many_connections_one_packetconn(net):
    """One PacketConn carries a Listener and a Dialer; many connections each way."""
    ln_b = net.listener()
    srv_b = EchoServer(ln_b)
    if net.kind == "fake":
        pc_a = net.pc()
        ln_a = net.track(derpquic.Listener(pc_a))
        d_a = net.track(derpquic.Dialer(pc_a, reuse_connections=False))
    else:
        ln_a = net.listener()
        d_a = net.track(derpquic.Dialer(ln_a.packet_conn, ln_a.private_key, reuse_connections=False))
    assert d_a.addr == ln_a.addr
    srv_a = EchoServer(ln_a)
    d_b = net.dialer()

    def roundtrip(dialer, target, i):
        with dialer.dial(target, timeout=20) as s:
            s.settimeout(30)
            s.sendall(b"conn %d" % i)
            s.shutdown(socket.SHUT_WR)
            return recv_all(s)

    jobs = [Background(roundtrip, d_a, ln_b.addr, i) for i in range(20)]
    jobs += [Background(roundtrip, d_b, ln_a.addr, 100 + i) for i in range(5)]
    results = [j.result() for j in jobs]
    assert results == [b"conn %d" % i for i in range(20)] + [b"conn %d" % (100 + i) for i in range(5)]
    assert srv_b.accepted == 20
    d_a.close()
    srv_a.close()
    srv_b.close()


def _bulk(net, size: int):
    ln = net.listener()
    d = net.dialer()
    chunk = os.urandom(1 << 20)
    srv = Background(lambda: sha256_stream_sink(_accept(ln)))
    s = d.dial(ln.addr, timeout=10)
    s.settimeout(120)
    h = hashlib.sha256()
    sent = 0
    while sent < size:
        part = chunk[: min(len(chunk), size - sent)]
        s.sendall(part)
        h.update(part)
        sent += len(part)
    s.shutdown(socket.SHUT_WR)
    n, digest = srv.result(timeout=600)
    assert n == size
    assert digest == h.digest()
    s.close()


def _accept(ln):
    s = ln.accept(timeout=10)
    s.settimeout(120)
    return s


def test_bulk_16mib_sha256(net):
    _bulk(net, 16 << 20)


@pytest.mark.slow
def test_bulk_256mib_sha256(net):
    _bulk(net, 256 << 20)


def test_bidirectional_bulk(net):
    ln = net.listener()
    d = net.dialer()
    srv = EchoServer(ln)
    s = d.dial(ln.addr, timeout=10)
    s.settimeout(60)
    data = os.urandom(4 << 20)
    reader = Background(lambda: recv_exactly(s, len(data)))
    s.sendall(data)
    assert reader.result() == data
    s.close()
    srv.close()


def test_slow_reader_backpressure_bounded_memory(net):
    window = 64 << 10
    ln = net.listener(stream_window=window, connection_window=4 * window)
    d = net.dialer(send_buffer=window)
    accepted = Background(lambda: ln.accept(timeout=10))
    s = d.dial(ln.addr, timeout=10)
    r = accepted.result()
    data = os.urandom(8 << 20)
    # The writer queues until flow control stops it: the reader reads nothing.
    s.settimeout(1.0)
    sent = 0
    with pytest.raises(TimeoutError):
        while sent < len(data):
            sent += s.send(data[sent:sent + 65536])
    assert 0 < sent < len(data)
    # Bounded: what the receiver buffers never exceeds its window, the sender's
    # unsent queue never exceeds its send buffer.
    with r._cond:
        assert len(r._rbuf) <= window
        assert r._conn.streams.unread <= 4 * window
    with s._cond:
        assert s._state.written - s._qs.sender.highest_offset <= window
    assert sent <= 3 * window + 65536
    # Now read slowly-ish: everything arrives intact and the writer is released.
    s.settimeout(60)
    r.settimeout(60)
    rest = Background(lambda: (s.sendall(data[sent:]), s.shutdown(socket.SHUT_WR)))
    got = bytearray()
    max_buffered = 0
    while True:
        b = r.recv(4096)
        if not b:
            break
        got += b
        with r._cond:
            max_buffered = max(max_buffered, len(r._rbuf))
    rest.result()
    assert bytes(got) == data
    assert max_buffered <= window
    s.close()
    r.close()


def test_recv_timeout_and_nonblocking(fake):
    ln = fake.listener()
    d = fake.dialer()
    acc = Background(lambda: ln.accept(timeout=10))
    s = d.dial(ln.addr, timeout=10)
    r = acc.result()
    r.settimeout(0.2)
    assert r.gettimeout() == 0.2
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        r.recv(10)
    assert time.monotonic() - t0 >= 0.19
    r.setblocking(False)
    with pytest.raises(BlockingIOError):
        r.recv(10)
    s.sendall(b"abc")
    r.setblocking(True)
    assert recv_exactly(r, 3) == b"abc"
    buf = bytearray(10)
    s.sendall(b"xyz")
    assert r.recv_into(buf, 2) == 2 and buf[:2] == b"xy"
    assert r.recv(0) == b""
    s.close()
    r.close()
    with pytest.raises(OSError):
        r.recv(1)
    with pytest.raises(OSError):
        s.send(b"x")
    s.close()  # idempotent


def test_makefile(fake):
    ln = fake.listener()
    d = fake.dialer()
    acc = Background(lambda: ln.accept(timeout=10))
    s = d.dial(ln.addr, timeout=10)
    r = acc.result()
    w = s.makefile("w")
    w.write("line one\nline two\n")
    w.flush()
    s.shutdown(socket.SHUT_WR)
    f = r.makefile("rb")
    assert f.readline() == b"line one\n"
    assert f.read() == b"line two\n"
    f.close()
    w.close()
    r.close()
    s.close()


def test_dial_nobody_listening_fails_clearly(net):
    """A key nobody holds: our relay says so (PeerGone NotHere for any packet) and the dial
    fails at once; derper (NotHere for disco packets only, which a dial never sends) and the
    fake relay stay silent, and the dial times out, naming the key."""
    d = net.dialer()
    nobody = PrivateKey.generate().public_key
    t0 = time.monotonic()
    if net.kind == "ours":
        with pytest.raises(PeerNotConnected) as ei:
            d.dial(nobody, timeout=5)
        assert time.monotonic() - t0 < 2
        assert nobody.b64() in str(ei.value) and "not connected to the relay" in str(ei.value)
        return
    with pytest.raises(TimeoutError) as ei:
        d.dial(nobody, timeout=1.5)
    elapsed = time.monotonic() - t0
    assert 1.4 <= elapsed < 5
    assert nobody.b64() in str(ei.value)
    assert "no answer" in str(ei.value)


def test_peer_reset_and_stop_sending(fake):
    ln = fake.listener()
    d = fake.dialer()
    acc = Background(lambda: ln.accept(timeout=10))
    s = d.dial(ln.addr, timeout=10)
    r = acc.result()
    s.settimeout(10)
    r.settimeout(10)
    s.sendall(b"partial")
    assert recv_exactly(r, 7) == b"partial"
    # The receiver closes without reading everything: the writer learns it (STOP_SENDING).
    r.close()
    with pytest.raises(ConnectionResetError):
        for _ in range(1000):
            s.sendall(b"x" * 65536)
    s.close()


def test_peer_closes_mid_stream(net):
    """The listening side goes away mid-transfer: the dialler's calls raise, never hang."""
    ln = net.listener()
    d = net.dialer()
    acc = Background(lambda: ln.accept(timeout=10))
    s = d.dial(ln.addr, timeout=10)
    r = acc.result()
    s.settimeout(20)
    s.sendall(b"x" * 100_000)
    r.settimeout(10)
    assert len(recv_exactly(r, 1000)) == 1000
    blocked = Background(lambda: s.recv(10))  # blocked reader on our side
    ln.close(linger=0)  # aborts the connection: CONNECTION_CLOSE to the dialer
    with pytest.raises(ConnectionError):
        blocked.result(timeout=15)
    with pytest.raises(ConnectionError):
        for _ in range(100):
            s.sendall(b"y" * 65536)


def test_close_wakes_blocked_callers(fake):
    ln = fake.listener()
    d = fake.dialer()
    acc = Background(lambda: ln.accept(timeout=10))
    s = d.dial(ln.addr, timeout=10)
    r = acc.result()
    blocked_recv = Background(lambda: s.recv(10))
    blocked_send = Background(lambda: s.sendall(b"z" * (64 << 20)))  # blocks: r never reads
    d.close()
    with pytest.raises(ConnectionAbortedError):
        blocked_recv.result(timeout=10)
    with pytest.raises(ConnectionAbortedError):
        blocked_send.result(timeout=10)
    d.close()  # idempotent
    with pytest.raises(OSError):
        d.dial(ln.addr, timeout=1)
    r.settimeout(10)
    with pytest.raises(ConnectionResetError):  # the peer learns that the dialer went away
        while r.recv(1 << 16):
            pass
    blocked_accept = Background(lambda: ln.accept())
    ln.close()
    ln.close()
    with pytest.raises(OSError):
        blocked_accept.result(timeout=10)
    r.close()


def test_sequential_streams_on_reused_connection_do_not_accumulate(fake):
    ln = fake.listener()
    d = fake.dialer()
    srv = EchoServer(ln)
    first = None
    for i in range(300):
        with d.dial(ln.addr, timeout=10) as s:
            s.settimeout(10)
            s.sendall(b"%d" % i)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == b"%d" % i
            first = first or s._conn
            assert s._conn is first
    srv.close()
    with d._lock:
        assert len(first.streams) < 50, len(first.streams)


def test_abort_resets_the_peer(fake):
    ln = fake.listener()
    d = fake.dialer()
    acc = Background(lambda: ln.accept(timeout=10))
    s = d.dial(ln.addr, timeout=10)
    r = acc.result()
    r.settimeout(10)
    s.sendall(b"before")
    assert recv_exactly(r, 6) == b"before"
    s.abort(7)
    s.abort()  # idempotent
    with pytest.raises(ConnectionResetError, match="error 7"):
        r.recv(10)
    with pytest.raises(ConnectionResetError):
        for _ in range(100):
            r.sendall(b"x" * 65536)
    r.close()
