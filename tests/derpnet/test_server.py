"""The embedded relay (derpnet.server) against raw sockets driven by our sans-IO ClientConnection:
handshake paths, forwarding, control frames, duplicates, PeerGone and protocol violations."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from derpnet import frames as F
from derpnet.handshake import open_server_info, seal_client_info
from derpnet.keys import PrivateKey
from derpnet.server import DerpServer
from tests.rawderp import RawDerpClient, dial, fast_start_request, read_exact, wait_closed, wait_until

DISCO = "TS💬".encode()


def disco_packet(tag: bytes = b"") -> bytes:
    """A payload the relay classifies as disco: magic + 56 bytes of header + tag."""
    return DISCO + bytes(56) + tag


@pytest.fixture
def relay():
    with DerpServer(keepalive_interval=0) as srv:
        yield srv


def handshake_socket(url: str):
    """A raw socket that has done the plain (101) upgrade but sent no ClientInfo yet."""
    s = dial(url)
    s.sendall(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101 ")
    read_exact(s, 45)  # ServerKey
    return s


# ---------------------------------------------------------------- forwarding

def test_forwarding_between_two_clients(relay):
    with RawDerpClient(relay.url) as a, RawDerpClient(relay.url) as b:
        for payload in (b"hello", b"", bytes(range(256)) * 256):  # 0 .. 65536 bytes
            a.send(b.public_key, payload)
            got = b.recv_packet()
            assert got.src == a.public_key and got.data == payload
        b.send(a.public_key, b"reply")
        got = a.recv_packet()
        assert (got.src, got.data) == (b.public_key, b"reply")
    st = relay.stats()
    assert st["packets_forwarded"] == 4 and st["bytes_forwarded"] == 5 + 65536 + 5


def test_send_to_self_comes_back(relay):
    with RawDerpClient(relay.url) as a:
        a.send(a.public_key, b"boomerang")
        got = a.recv_packet()
        assert (got.src, got.data) == (a.public_key, b"boomerang")


def test_server_info_and_key(relay):
    with RawDerpClient(relay.url) as a:
        assert a.connected.server_key == relay.public_key
        assert a.connected.server_info == {"version": 2}


def test_oversized_packet_closes_connection(relay):
    with RawDerpClient(relay.url) as a:
        # 32 + 65537 bytes: one byte over derper's limit, written by hand (our encoder refuses it).
        a.send_raw(F.encode_frame(F.FrameType.SEND_PACKET, bytes(a.public_key), bytes(65537)))
        assert a.wait_closed()


# ---------------------------------------------------------------- upgrade paths, exact bytes

def test_101_response_then_server_key_exact_bytes(relay):
    with dial(relay.url) as s:
        s.sendall(b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
        expected_head = ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
                         f"Derp-Version: 2\r\nDerp-Public-Key: {relay.public_key.hex()}\r\n\r\n").encode()
        data = read_exact(s, len(expected_head) + 45)
        assert data[:len(expected_head)] == expected_head
        assert data[len(expected_head):] == b"\x01\x00\x00\x00\x28" + F.MAGIC + relay.public_key.raw


def test_fast_start_sends_no_http_and_server_key_first(relay):
    key = PrivateKey.generate()
    with dial(relay.url) as s:
        # As the Go clients do: request and ClientInfo in one write, before reading anything.
        hello = F.encode_client_info(key.public_key, seal_client_info(key, relay.public_key))
        s.sendall(fast_start_request("127.0.0.1") + hello)
        first = read_exact(s, 45)
        assert first == b"\x01\x00\x00\x00\x28" + F.MAGIC + relay.public_key.raw
        header = read_exact(s, 5)
        assert header[0] == F.FrameType.SERVER_INFO
        sealed = read_exact(s, int.from_bytes(header[1:], "big"))
        assert open_server_info(key, relay.public_key, sealed) == {"version": 2}
        # Pipelined traffic right behind the hello works too.
        s.sendall(F.encode_send_packet(key.public_key, b"me"))
        assert read_exact(s, 5 + 32 + 2) == F.encode_recv_packet(key.public_key, b"me")


def test_fast_start_client(relay):
    with RawDerpClient(relay.url, fast_start=True) as a, RawDerpClient(relay.url) as b:
        a.send(b.public_key, b"x")
        assert b.recv_packet().data == b"x"


def test_legacy_websocket_upgrade_speaks_raw_derp(relay):
    # derper treats `Upgrade: websocket` without a derp subprotocol as raw DERP (very old clients).
    with dial(relay.url) as s:
        s.sendall(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert read_exact(s, 5) == b"\x01\x00\x00\x00\x28"


# ---------------------------------------------------------------- handshake violations

def test_first_frame_must_be_client_info(relay):
    with handshake_socket(relay.url) as s:
        s.sendall(F.encode_send_packet(PrivateKey.generate().public_key, b"too early"))
        assert wait_closed(s)
    wait_until(lambda: relay.stats()["protocol_errors"] >= 1)
    assert relay.stats()["clients"] == 0


def test_client_info_sealed_for_another_server_is_rejected(relay):
    key = PrivateKey.generate()
    other_server = PrivateKey.generate().public_key
    with handshake_socket(relay.url) as s:
        s.sendall(F.encode_client_info(key.public_key, seal_client_info(key, other_server)))
        assert wait_closed(s)


def test_client_info_claiming_someone_elses_key_is_rejected(relay):
    victim, attacker = PrivateKey.generate(), PrivateKey.generate()
    with handshake_socket(relay.url) as s:
        s.sendall(F.encode_client_info(victim.public_key, seal_client_info(attacker, relay.public_key)))
        assert wait_closed(s)
    assert relay.stats()["clients_total"] == 0


def test_second_client_info_closes(relay):
    with RawDerpClient(relay.url) as a:
        a.send_raw(F.encode_client_info(a.public_key, seal_client_info(a.key, relay.public_key)))
        assert a.wait_closed()


@pytest.mark.parametrize("when", ["as first frame", "after hello"])
def test_4gib_frame_header_closes_without_allocating(relay, when):
    huge = bytes([F.FrameType.SEND_PACKET]) + b"\xff\xff\xff\xff"
    if when == "as first frame":
        with handshake_socket(relay.url) as s:
            s.sendall(bytes([F.FrameType.CLIENT_INFO]) + b"\xff\xff\xff\xff" + bytes(1000))
            assert wait_closed(s)
    else:
        with RawDerpClient(relay.url) as a:
            a.send_raw(huge + bytes(1000))
            assert a.wait_closed()


def test_client_info_timeout(relay):
    with DerpServer(client_info_timeout=0.3) as srv:
        with handshake_socket(srv.url) as s:
            t0 = time.monotonic()
            assert wait_closed(s, timeout=5)
            assert 0.25 <= time.monotonic() - t0 < 4
        assert srv.stats()["handshake_timeouts"] == 1


# ---------------------------------------------------------------- control frames

def test_ping_pong(relay):
    with RawDerpClient(relay.url) as a:
        a.ping(b"abcdefgh")
        assert a.recv(F.Pong).data == b"abcdefgh"
        # Up to 1000 bytes accepted, extra bytes discarded.
        a.send_raw(F.encode_frame(F.FrameType.PING, b"12345678" + bytes(992)))
        assert a.recv(F.Pong).data == b"12345678"
    st = relay.stats()
    assert st["pings"] == 2 and st["pongs_sent"] == 2


@pytest.mark.parametrize("size", [7, 1001])
def test_ping_of_bad_size_closes(relay, size):
    with RawDerpClient(relay.url) as a:
        a.send_raw(F.encode_frame(F.FrameType.PING, bytes(size)))
        assert a.wait_closed()


def test_pings_faster_than_pongs_are_ignored_not_queued(relay):
    # One-slot pong queue: a burst of pings in one segment yields one pong.
    with RawDerpClient(relay.url) as a:
        a.send_raw(b"".join(F.encode_ping(i.to_bytes(8, "big")) for i in range(50)))
        assert a.recv(F.Pong).data == (0).to_bytes(8, "big")
        assert a.sync(b"lastping") == []  # no other pong was queued behind it
    assert relay.stats()["pongs_sent"] == 2


def test_keepalives_are_sent():
    with DerpServer(keepalive_interval=0.2) as srv, RawDerpClient(srv.url) as a:
        assert isinstance(a.recv_frame(timeout=3), F.KeepAlive)
        assert isinstance(a.recv_frame(timeout=3), F.KeepAlive)
        assert srv.stats()["keepalives_sent"] >= 2


def test_note_preferred_is_accepted_and_bad_length_closes(relay):
    with RawDerpClient(relay.url) as a:
        a.send_raw(F.encode_note_preferred(True))
        assert a.sync() == []
        a.send_raw(F.encode_frame(F.FrameType.NOTE_PREFERRED, b"\x01\x01"))
        assert a.wait_closed()


def test_unknown_frames_and_pongs_are_skipped(relay):
    with RawDerpClient(relay.url) as a:
        a.send_raw(F.encode_frame(0x30, bytes(5000)) + F.encode_pong(b"unasked!"))
        a.send(a.public_key, b"still here")
        assert a.recv_packet().data == b"still here"


@pytest.mark.parametrize("frame", [
    F.encode_forward_packet(PrivateKey.generate().public_key, PrivateKey.generate().public_key, b"x"),
    F.encode_watch_conns(),
    F.encode_close_peer(PrivateKey.generate().public_key),
], ids=["ForwardPacket", "WatchConns", "ClosePeer"])
def test_mesh_frames_from_non_mesh_client_close(relay, frame):
    with RawDerpClient(relay.url) as a:
        a.send_raw(frame)
        assert a.wait_closed()


# ---------------------------------------------------------------- peer gone

def test_peer_gone_when_sender_leaves(relay):
    with RawDerpClient(relay.url) as b, RawDerpClient(relay.url) as bystander:
        a = RawDerpClient(relay.url)
        a.send(b.public_key, b"hi")
        assert b.recv_packet().data == b"hi"
        a.close()
        gone = b.recv(F.PeerGone)
        assert (gone.key, gone.reason) == (a.public_key, F.PeerGoneReason.DISCONNECTED)
        wait_until(lambda: relay.stats()["clients"] == 2)
        assert bystander.sync() == []  # never got a packet from a: no PeerGone for it


def test_peer_gone_only_when_last_duplicate_leaves(relay):
    key = PrivateKey.generate()
    with RawDerpClient(relay.url) as x:
        k1 = RawDerpClient(relay.url, key)
        k2 = RawDerpClient(relay.url, key)
        k2.send(x.public_key, b"from k")
        assert x.recv_packet().src == key.public_key
        k1.close()
        wait_until(lambda: relay.stats()["dup_client_keys"] == 0)
        assert x.sync() == []
        k2.close()
        assert x.recv(F.PeerGone).key == key.public_key


def test_peer_gone_not_here_for_any_packet_rate_limited(relay):
    """derper answers only disco packets to unknown keys with NotHere; we answer any (a QUIC
    dial to a key nobody holds then fails in one round trip), at derper's rate."""
    nobody = PrivateKey.generate().public_key
    with RawDerpClient(relay.url) as a:
        a.send(nobody, b"not disco" * 10)
        first = a.sync()
        assert first == [F.PeerGone(nobody, F.PeerGoneReason.NOT_HERE)]
        for i in range(6):
            a.send(nobody, disco_packet(bytes([i])) if i % 2 else b"quic" + bytes([i]))
        frames = a.sync()
        assert all(isinstance(f, F.PeerGone) and f.key == nobody and f.reason == F.PeerGoneReason.NOT_HERE
                   for f in frames)
        assert 2 <= len(frames) <= 3  # the rest of the burst of 3 (+1 if a second passed)
    assert relay.stats()["dropped"]["unknown_dest"] == 7


# ---------------------------------------------------------------- duplicate keys

def test_duplicate_keys_newest_then_last_writer_receives(relay):
    key = PrivateKey.generate()
    with RawDerpClient(relay.url) as x, RawDerpClient(relay.url, key) as old, RawDerpClient(relay.url, key) as new:
        assert relay.stats()["dup_client_keys"] == 1
        x.send(key.public_key, b"p1")
        assert new.recv_packet().data == b"p1"       # the newest connection is active
        assert old.sync() == []                      # ...the old one got nothing, and now spoke
        x.send(key.public_key, b"p2")
        assert old.recv_packet().data == b"p2"       # last writer is active
        assert new.sync() == []
        x.send(key.public_key, b"p3")
        assert new.recv_packet().data == b"p3"
        new.close()
        wait_until(lambda: relay.stats()["dup_client_keys"] == 0)
        x.send(key.public_key, b"p4")
        assert old.recv_packet().data == b"p4"       # the remaining one is a plain client again
        assert relay.stats()["clients"] == 2


def test_active_duplicate_leaving_hands_over_to_most_recent_sender(relay):
    key = PrivateKey.generate()
    with RawDerpClient(relay.url) as x:
        c1, c2, c3 = (RawDerpClient(relay.url, key) for _ in range(3))
        assert c1.sync() == []  # c1 speaks, then c3 speaks last: c3 is active
        assert c3.sync() == []
        c3.close()              # the active one leaves: the most recent other sender (c1) takes over
        wait_until(lambda: relay.stats()["clients"] == 3)
        x.send(key.public_key, b"to c1")
        assert c1.recv_packet().data == b"to c1"
        assert c2.sync() == []
        c1.close()
        c2.close()


# ---------------------------------------------------------------- queues and slow readers

def _seq(data: bytes) -> int:
    return int.from_bytes(data[-4:], "big")


def test_queues_drop_oldest_and_disco_has_its_own_queue():
    with DerpServer(write_timeout=None, keepalive_interval=0) as srv:
        with RawDerpClient(srv.url) as a, RawDerpClient(srv.url, rcvbuf=4096) as slow:
            filler = bytes(60000)
            for i in range(200):
                a.send(slow.public_key, filler + i.to_bytes(4, "big"))
            for i in range(10):
                a.send(slow.public_key, disco_packet(i.to_bytes(4, "big")))
            for i in range(200, 300):
                a.send(slow.public_key, filler + i.to_bytes(4, "big"))
            assert a.sync() == []  # the relay has routed all 310 packets
            st = srv.stats()
            assert st["queued_packets"] == 32 + 10
            assert st["dropped"]["queue_head"] > 0
            bulk, disco = [], []
            while not bulk or bulk[-1] != 299:
                p = slow.recv_packet(timeout=10)
                (disco if p.data.startswith(DISCO) else bulk).append(_seq(p.data))
        assert disco == list(range(10))            # the disco queue never overflowed
        assert bulk == sorted(bulk) and len(bulk) < 300
        assert bulk[-32:] == list(range(268, 300))  # the newest 32 survived, oldest dropped
        assert srv.stats()["dropped"]["queue_head"] == 300 - len(bulk)


def test_slow_reader_is_dropped_memory_bounded_honest_pair_flows():
    with DerpServer(write_timeout=0.5, keepalive_interval=0) as srv:
        slow = RawDerpClient(srv.url, rcvbuf=4096)  # never reads
        flooder = RawDerpClient(srv.url)
        b, c = RawDerpClient(srv.url), RawDerpClient(srv.url)
        done = threading.Event()
        peak = {"buf": 0, "queued": 0}

        def flood():
            try:
                chunk = b"".join(F.encode_send_packet(slow.public_key, bytes(60000)) for _ in range(16))
                while not done.is_set():
                    flooder.send_raw(chunk)
            except OSError:
                pass

        t = threading.Thread(target=flood, name="flood", daemon=True)
        t.start()
        try:
            def dropped():
                st = srv.stats()
                peak["buf"] = max(peak["buf"], st["write_buffer_bytes"])
                peak["queued"] = max(peak["queued"], st["queued_packets"])
                # The honest pair keeps flowing while the flood is on.
                b.send(c.public_key, b"ping-pong")
                assert c.recv_packet(timeout=2).data == b"ping-pong"
                return st["write_timeouts"] == 1
            wait_until(dropped, timeout=10, what="slow reader dropped")
            st = srv.stats()
            assert st["clients"] == 3
            assert peak["queued"] <= 2 * 32 + 2
            assert peak["buf"] < 1 << 20
            assert wait_closed(slow.sock, timeout=10)
            c.send(b.public_key, b"still fine")
            assert b.recv_packet().data == b"still fine"
        finally:
            done.set()
            t.join(5)
            for x in (slow, flooder, b, c):
                x.close()


# ---------------------------------------------------------------- lifecycle

def test_close_disconnects_clients_and_is_idempotent():
    srv = DerpServer().start()
    assert any(t.name == "derpnet-relay" and t.daemon for t in threading.enumerate())
    a = RawDerpClient(srv.url)
    srv.close()
    assert a.wait_closed()
    srv.close()
    assert not any(t.name == "derpnet-relay" for t in threading.enumerate() if t.is_alive())
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=2).close()
    a.close()


def test_port_in_use_raises_oserror():
    with DerpServer() as srv:
        with pytest.raises(OSError):
            DerpServer(port=srv.port).start()


def test_persistent_key_and_url(tmp_path):
    key = PrivateKey.generate()
    with DerpServer(key) as srv:
        assert srv.public_key == key.public_key
        assert srv.url == f"http://127.0.0.1:{srv.port}"
