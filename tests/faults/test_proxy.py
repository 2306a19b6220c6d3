"""The fault proxy itself, against a byte-recording TCP server (no relay): it re-emits every
client frame byte-exactly, drops exactly what it is told to, cuts, black-holes, throttles,
and refuses to alter what it cannot re-encode."""

from __future__ import annotations

import os
import random
import socket
import threading
import time

import pytest

from derpnet import frames as F
from derpnet.http11 import build_request
from derpnet.keys import PrivateKey
from tests.faults.proxy import FaultProxy

UPGRADE = build_request("GET", "/derp", [("Host", "relay"), ("Connection", "Upgrade"), ("Upgrade", "DERP")])


class Recorder:
    """A TCP server that accepts connections and records what each one receives."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.cond = threading.Condition()
        self.conns: list = []  # [socket, bytearray, eof]
        self._threads: list = []
        t = threading.Thread(target=self._accept, name="faults-recorder", daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            entry = [c, bytearray(), False]
            with self.cond:
                self.conns.append(entry)
                self.cond.notify_all()
            t = threading.Thread(target=self._read, args=(entry,), name="faults-recorder-read", daemon=True)
            t.start()
            self._threads.append(t)

    def _read(self, entry) -> None:
        try:
            while True:
                b = entry[0].recv(1 << 16)
                if not b:
                    break
                with self.cond:
                    entry[1] += b
                    self.cond.notify_all()
        except OSError:
            pass
        with self.cond:
            entry[2] = True
            self.cond.notify_all()

    def wait(self, pred, timeout: float = 10.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: pred(self.conns), timeout), [(len(c[1]), c[2]) for c in self.conns]

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self.sock.close()
        with self.cond:
            for c in self.conns:
                try:
                    c[0].shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for t in self._threads:
            t.join(10)
        for c in self.conns:
            c[0].close()


@pytest.fixture
def recorder():
    r = Recorder()
    yield r
    r.close()


@pytest.fixture
def proxy(recorder):
    p = FaultProxy(recorder.port, seed=1234)
    yield p
    p.close()
    assert p.threads_alive() == []


def _client(proxy: FaultProxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=10)


def _send_chopped(sock: socket.socket, data: bytes, rng: random.Random) -> None:
    """Send in random pieces, so frames straddle reads on the proxy's side."""
    i = 0
    while i < len(data):
        n = rng.choice([1, 3, 5, 37, 1000, 70000])
        sock.sendall(data[i:i + n])
        i += n


def _decode(raw: bytes, complete: bool = True) -> list:
    d = F.FrameDecoder("server")
    d.feed(raw)
    out = list(d.events())
    assert d.buffered == 0 or not complete
    return out


def test_every_client_frame_is_re_emitted_byte_exactly(proxy, recorder):
    k1, k2 = PrivateKey.generate().public_key, PrivateKey.generate().public_key
    frames = [
        F.encode_client_info(k1, os.urandom(24 + 100)),
        F.encode_send_packet(k2, b""),
        F.encode_send_packet(k2, b"\x00" + os.urandom(1200)),
        F.encode_send_packet(k2, os.urandom(F.MAX_PACKET_SIZE)),  # the largest allowed
        F.encode_ping(b"12345678"), F.encode_pong(b"abcdefgh"),
        F.encode_note_preferred(True), F.encode_note_preferred(False),
        F.encode_forward_packet(k1, k2, os.urandom(300)),
        F.encode_watch_conns(), F.encode_close_peer(k2),
    ]
    rng = random.Random(7)
    stream = UPGRADE + b"".join(rng.choice(frames) for _ in range(400))
    with _client(proxy) as c:
        _send_chopped(c, stream, rng)
        recorder.wait(lambda cs: cs and len(cs[0][1]) >= len(stream))
    assert bytes(recorder.conns[0][1]) == stream
    assert proxy.errors == [] and proxy.stats()["packets_dropped"] == 0


def test_random_loss_drops_only_send_packets_in_the_seeded_proportion(proxy, recorder):
    dst = PrivateKey.generate().public_key
    proxy.set_loss(0.05)
    sent = [F.encode_send_packet(dst, i.to_bytes(4, "big")) for i in range(4000)]
    pings = [F.encode_ping(i.to_bytes(8, "big")) for i in range(50)]
    with _client(proxy) as c:
        c.sendall(UPGRADE + b"".join(sent) + b"".join(pings))
        recorder.wait(lambda cs: cs and sum(1 for f in _decode(bytes(cs[0][1][len(UPGRADE):]), complete=False)
                                          if type(f) is F.Ping) == 50)
    got = _decode(bytes(recorder.conns[0][1][len(UPGRADE):]))
    packets = [int.from_bytes(f.data, "big") for f in got if type(f) is F.SendPacket]
    assert packets == sorted(packets)  # order kept
    st = proxy.stats()
    assert st["packets_seen"] == 4000 and st["packets_dropped"] == 4000 - len(packets)
    assert 120 <= st["packets_dropped"] <= 280  # 5 % of 4000 = 200 (binomial sd 14)
    assert proxy.dropped_to[dst] == st["packets_dropped"]


def test_burst_drops_exactly_n_consecutive_send_packets(proxy, recorder):
    dst = PrivateKey.generate().public_key
    with _client(proxy) as c:
        c.sendall(UPGRADE + b"".join(F.encode_send_packet(dst, i.to_bytes(4, "big")) for i in range(100)))
        recorder.wait(lambda cs: cs and len(cs[0][1]) >= len(UPGRADE) + 100 * (5 + 36))
        proxy.drop_burst(200)
        c.sendall(b"".join(F.encode_send_packet(dst, i.to_bytes(4, "big")) for i in range(100, 500)))
        assert proxy.wait_burst_done(10)
        recorder.wait(lambda cs: len(cs[0][1]) >= len(UPGRADE) + 300 * (5 + 36))
    got = [int.from_bytes(f.data, "big") for f in _decode(bytes(recorder.conns[0][1][len(UPGRADE):]))]
    assert got == list(range(100)) + list(range(300, 500))


def test_cut_closes_both_sides_and_later_connections_pass(proxy, recorder):
    c = _client(proxy)
    c.sendall(UPGRADE)
    recorder.wait(lambda cs: cs and len(cs[0][1]) == len(UPGRADE))
    assert proxy.cut() == 1
    assert c.recv(10) == b""  # the client sees EOF, as from a relay closing
    recorder.wait(lambda cs: cs[0][2])  # and so does the relay
    c.close()
    with _client(proxy) as c2:
        c2.sendall(UPGRADE)
        recorder.wait(lambda cs: len(cs) == 2 and len(cs[1][1]) == len(UPGRADE))
    assert proxy.connections == 2


def test_blackhole_forwards_nothing_and_closes_nothing(proxy, recorder):
    c = _client(proxy)
    c.sendall(UPGRADE)
    recorder.wait(lambda cs: cs and len(cs[0][1]) == len(UPGRADE))
    server_side = recorder.conns[0][0]
    assert proxy.blackhole() == 1
    c.sendall(F.encode_ping(b"12345678"))
    server_side.sendall(b"to the client")
    c.settimeout(0.5)
    with pytest.raises(socket.timeout):  # neither data nor EOF reaches the client
        c.recv(10)
    with recorder.cond:  # and nothing reached the relay, which is not closed either
        assert len(recorder.conns[0][1]) == len(UPGRADE) and not recorder.conns[0][2]
    # A reconnecting client gets through.
    with _client(proxy) as c2:
        c2.sendall(UPGRADE)
        recorder.wait(lambda cs: len(cs) == 2 and len(cs[1][1]) == len(UPGRADE))
    c.close()
    proxy.close()  # ends the black-holed connection too
    recorder.wait(lambda cs: cs[0][2])


def test_throttle_limits_relay_to_client_rate(proxy, recorder):
    with _client(proxy) as c:
        c.sendall(UPGRADE)
        recorder.wait(lambda cs: cs and len(cs[0][1]) == len(UPGRADE))
        proxy.throttle_down(4e6)
        data = os.urandom(2 << 20)
        t0 = time.monotonic()
        sender = threading.Thread(target=recorder.conns[0][0].sendall, args=(data,), name="faults-throttle-send")
        sender.start()
        got = bytearray()
        while len(got) < len(data):
            got += c.recv(1 << 16)
        elapsed = time.monotonic() - t0
        sender.join(10)
    assert bytes(got) == data
    assert elapsed >= len(data) / 4e6 * 0.9, elapsed  # 2 MiB at 4 MB/s: >= 0.5 s


def test_unencodable_frame_is_refused_not_altered(proxy, recorder):
    with _client(proxy) as c:
        # Type 0x30 is unknown: the decoder skips it and discards its payload, so the
        # proxy could not re-emit it exactly. It must cut the connection and say why.
        c.sendall(UPGRADE + F.encode_frame(0x30, b"opaque") + F.encode_ping(b"12345678"))
        c.settimeout(10)
        assert c.recv(10) == b""
    assert any("0x30" in e for e in proxy.errors)
    proxy.errors.clear()  # expected here
