"""derpnet.client.DerpClient, the relay link: connect errors, the handshake against broken
relays, the reader thread (pings, unknown frames, idleness, write timeouts), TLS.
(Relay addresses and error messages: test_dial.py; liveness rules: test_liveness.py.)"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import threading
import time

import pytest

from derpnet import frames as F
from derpnet.client import DerpClient
from derpnet.connection import AcceptClient, AcceptUpgrade, ClientHello, ServerConnection
from derpnet.errors import HandshakeError, UpgradeError
from derpnet.http11 import build_response
from derpnet.keys import PrivateKey
from tests.derpnet.fakes import (
    FakeRelay,
    StatusHTTPServer,
    derp_accept,
    drain_until_stop,
    read_frames,
    real_relay,
    recv_some,
    relay_params,
)


def reader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("derpnet-reader-")]


@pytest.fixture(autouse=True)
def no_leaked_readers():
    yield
    assert reader_threads() == [], "a test left a relay link reader running"


class Collector:
    """Callbacks that record what the reader thread delivers, with events to wait on."""

    def __init__(self) -> None:
        self.packets = []
        self.events = []
        self.closed = threading.Event()
        self.close_error = None
        self.got_packet = threading.Event()
        self.got_event = threading.Event()

    def on_packet(self, src, data):
        self.packets.append((src, data))
        self.got_packet.set()

    def on_event(self, ev):
        self.events.append(ev)
        self.got_event.set()

    def on_close(self, client, err):
        self.close_error = err
        self.closed.set()

    def kwargs(self):
        return dict(on_packet=self.on_packet, on_event=self.on_event, on_close=self.on_close)


# ---------------------------------------------------------------- against real relays

@pytest.mark.parametrize("kind", relay_params())
def test_connect_send_to_self_and_close(kind, tmp_path):
    with real_relay(kind, tmp_path) as relay:
        c = Collector()
        key = PrivateKey.generate()
        client = DerpClient(relay.url, key, ssl_context=relay.ssl_context, **c.kwargs())
        client.connect()
        try:
            assert client.connected and client.server_key is not None
            assert client.server_info.get("version") == 2
            [t] = reader_threads()
            assert t.name == f"derpnet-reader-{key.public_key.b64()[:8]}" and t.daemon
            client.send_packet(key.public_key, b"\x00", b"hello ", b"me")
            assert c.got_packet.wait(5)
            assert c.packets == [(key.public_key, b"\x00hello me")]
        finally:
            client.close()
        assert not t.is_alive() and not client.connected
        assert c.closed.is_set() and c.close_error is None
        with pytest.raises(ConnectionResetError):
            client.send_packet(key.public_key, b"late")
        client.close()  # idempotent


@pytest.mark.parametrize("kind", relay_params(("ours-tls", "go-tls")))
def test_tls_without_the_test_ca_fails_verification(kind, tmp_path):
    with real_relay(kind, tmp_path) as relay:
        t0 = time.monotonic()
        with pytest.raises(ssl.SSLCertVerificationError) as ei:
            DerpClient(relay.url, PrivateKey.generate()).connect()  # system roots only
        assert time.monotonic() - t0 < 5
        assert relay.url in str(ei.value) and "certificate verify failed" in str(ei.value)
        assert ei.value.verify_code != 0


@pytest.mark.parametrize("kind", relay_params(("ours-tls", "go-tls")))
def test_tls_concurrent_writers_and_reader(kind, tmp_path):
    """Several threads writing through one TLS link while its reader decrypts: no corruption,
    no dead link (the TLS object is only touched under its lock)."""
    with real_relay(kind, tmp_path) as relay:
        c = Collector()
        key = PrivateKey.generate()
        client = DerpClient(relay.url, key, ssl_context=relay.ssl_context, **c.kwargs())
        client.connect()
        try:
            def writer(i):
                for j in range(150):
                    body = os.urandom(16 + (i * 7919 + j * 104729) % 20000)
                    client.send_packet(key.public_key, bytes([i, j]), body, body[:16])

            threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            client.send_ping(b"finished")
            deadline = time.monotonic() + 10
            while not any(isinstance(e, F.Pong) for e in c.events):  # the pong follows our packets
                assert c.got_event.wait(max(0.0, deadline - time.monotonic())), "no pong"
                c.got_event.clear()
            assert client.connected and c.close_error is None
            assert len(c.packets) >= 32  # the relay may drop some (queue), never corrupt them
            for src, data in c.packets:
                assert src == key.public_key and data[-16:] == data[2:18]
        finally:
            client.close()


# ---------------------------------------------------------------- connect errors

def test_refused_is_connection_refused_with_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        t0 = time.monotonic()
        with pytest.raises(ConnectionRefusedError) as ei:
            DerpClient(f"http://127.0.0.1:{port}", PrivateKey.generate()).connect()
    assert time.monotonic() - t0 < 2
    assert f"http://127.0.0.1:{port}" in str(ei.value) and ei.value.errno == errno.ECONNREFUSED


def test_unresolvable_name_is_gaierror_with_url():
    with pytest.raises(socket.gaierror) as ei:
        DerpClient("https://derpnet-test.invalid", PrivateKey.generate(), connect_timeout=5).connect()
    assert "https://derpnet-test.invalid:443" in str(ei.value)


@pytest.fixture
def silent_listener():
    """Accepts TCP (the kernel does) but never says anything."""
    with socket.create_server(("127.0.0.1", 0), backlog=8) as s:
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def test_connect_timeout_covers_the_handshake(silent_listener):
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as ei:
        DerpClient(silent_listener, PrivateKey.generate(), connect_timeout=0.3).connect()
    assert 0.3 <= time.monotonic() - t0 < 2
    assert silent_listener in str(ei.value) and "DERP handshake" in str(ei.value)


def test_close_aborts_a_connect_in_progress(silent_listener):
    client = DerpClient(silent_listener, PrivateKey.generate(), connect_timeout=30)
    result = []

    def connect():
        try:
            client.connect()
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=connect)
    t.start()
    deadline = time.monotonic() + 5
    while client.connect_phase != "in the DERP handshake":  # wait until it waits for the relay
        assert time.monotonic() < deadline
        time.sleep(0.005)
    t0 = time.monotonic()
    client.close()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - t0 < 2
    assert isinstance(result[0], ConnectionAbortedError)


@pytest.mark.parametrize("status", [200, 404, 426, 500])
def test_http_server_that_is_not_a_relay(status):
    with StatusHTTPServer(status) as web:
        t0 = time.monotonic()
        with pytest.raises(UpgradeError) as ei:
            DerpClient(web.url, PrivateKey.generate()).connect()
        assert time.monotonic() - t0 < 2  # the status line is enough, never the 10 s timeout
        assert ei.value.status == status and web.url in str(ei.value)
        assert "instead of switching to DERP" in str(ei.value)  # the plain upgrade's error
        assert web.requests == ["/derp", "/derp"]  # then the WebSocket fallback, refused too


def _one_shot(script):
    """A FakeRelay whose handler reads the request and then runs `script(sock)`."""
    def handler(sock, relay, n):
        assert recv_some(sock)  # the upgrade request
        script(sock)
    return FakeRelay(handler)


@pytest.mark.parametrize("name,script", [
    ("eof-before-response", lambda s: None),
    ("truncated-server-key", lambda s: s.sendall(
        build_response(101, [("Upgrade", "DERP"), ("Connection", "Upgrade")])
        + F.encode_server_key(PrivateKey.generate().public_key)[:20])),
    ("truncated-http-head", lambda s: s.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgr")),
    ("html-without-http", lambda s: s.sendall(b"<!DOCTYPE html><html><body>hello</body></html>")),
    ("wrong-first-frame", lambda s: s.sendall(F.encode_keep_alive())),
])
def test_broken_handshake_is_handshake_error(name, script):
    with _one_shot(script) as relay:
        t0 = time.monotonic()
        with pytest.raises(HandshakeError) as ei:
            DerpClient(relay.url, PrivateKey.generate(), connect_timeout=5).connect()
        assert time.monotonic() - t0 < 2
        assert relay.url in str(ei.value)


def test_relay_closing_after_client_info_is_handshake_error():
    def handler(sock, relay, n):
        conn = ServerConnection(relay.key)
        conn.receive_data(recv_some(sock))
        sock.sendall(conn.send(AcceptUpgrade()))
        assert recv_some(sock)  # ClientInfo; then hang up without ServerInfo

    with FakeRelay(handler) as relay:
        with pytest.raises(HandshakeError, match="closed"):
            DerpClient(relay.url, PrivateKey.generate(), connect_timeout=5).connect()


# ---------------------------------------------------------------- the reader thread

def test_unknown_frames_skipped_pings_answered_events_delivered():
    got = {}

    def handler(sock, relay, n):
        conn, client_key = derp_accept(sock, relay.key)
        src = PrivateKey.generate().public_key
        sock.sendall(
            F.encode_frame(0x7F, b"future frame " * 100)  # unknown type: skipped
            + F.encode_health("disk on fire")
            + F.encode_peer_gone(src, F.PeerGoneReason.NOT_HERE)
            + F.encode_ping(b"pingpong")
            + F.encode_recv_packet(src, b"\x00after")
        )
        got["pong"] = read_frames(sock, conn, F.Pong)
        drain_until_stop(sock, relay)

    with FakeRelay(handler) as relay:
        c = Collector()
        client = DerpClient(relay.url, PrivateKey.generate(), **c.kwargs()).connect()
        try:
            assert c.got_packet.wait(5)
            assert c.packets[0][1] == b"\x00after"
            assert client.frames_skipped == 1
            kinds = [type(e) for e in c.events]
            assert kinds == [F.Health, F.PeerGone]
            assert c.events[0].problem == "disk on fire"
            assert c.events[1].reason == F.PeerGoneReason.NOT_HERE
            deadline = time.monotonic() + 5
            while "pong" not in got:
                assert time.monotonic() < deadline, "relay got no Pong"
                time.sleep(0.01)
            assert got["pong"].data == b"pingpong"
            assert client.connected
        finally:
            client.close()


def test_packets_pipelined_with_server_info_are_delivered():
    def handler(sock, relay, n):
        conn = ServerConnection(relay.key)
        conn.receive_data(recv_some(sock))
        sock.sendall(conn.send(AcceptUpgrade()))
        evs = conn.receive_data(recv_some(sock))
        assert isinstance(evs[0], ClientHello)
        sock.sendall(conn.send(AcceptClient()) + F.encode_recv_packet(relay.key.public_key, b"\x00early"))
        drain_until_stop(sock, relay)

    with FakeRelay(handler) as relay:
        c = Collector()
        client = DerpClient(relay.url, PrivateKey.generate(), **c.kwargs()).connect()
        try:
            assert c.got_packet.wait(5)
            assert c.packets == [(relay.key.public_key, b"\x00early")]
        finally:
            client.close()


def test_silent_relay_is_dead_after_idle_timeout():
    def handler(sock, relay, n):
        derp_accept(sock, relay.key)
        drain_until_stop(sock, relay)

    with FakeRelay(handler) as relay:
        c = Collector()
        client = DerpClient(relay.url, PrivateKey.generate(), idle_timeout=0.3, **c.kwargs()).connect()
        t0 = time.monotonic()
        try:
            assert c.closed.wait(5)
            assert time.monotonic() - t0 >= 0.25
            assert isinstance(c.close_error, TimeoutError) and "no frames" in str(c.close_error)
            assert not client.connected
        finally:
            client.close()


def test_relay_that_stops_reading_fails_the_write():
    def handler(sock, relay, n):
        derp_accept(sock, relay.key)
        relay.stop.wait(20)  # never read again

    with FakeRelay(handler, rcvbuf=4096) as relay:
        c = Collector()
        client = DerpClient(relay.url, PrivateKey.generate(), write_timeout=0.3, **c.kwargs()).connect()
        try:
            dst = PrivateKey.generate().public_key
            payload = bytes(60000)
            t0 = time.monotonic()
            with pytest.raises(ConnectionResetError):
                for _ in range(2000):  # a few MB fill the socket buffers, then the write times out
                    client.send_packet(dst, payload)
            assert time.monotonic() - t0 < 10
            assert c.closed.wait(5)
            assert isinstance(c.close_error, TimeoutError) and "stopped reading" in str(c.close_error)
        finally:
            client.close()


def stuck_writer_client(relay, c):
    """A client whose writes may block for 30 s (write_timeout) and that pings after 0.5 s."""
    return DerpClient(relay.url, PrivateKey.generate(), write_timeout=30.0, ping_after=0.5, ping_timeout=0.5,
                      **c.kwargs())


def flood(client, dst):
    """A named thread sending 60 kB packets to `dst` until the link dies (a relay that reads
    nothing: a few MB fill the socket buffers, then send_packet blocks); `outcome` gets the
    ConnectionResetError it ends with, and when."""
    outcome = {}

    def run():
        try:
            while True:
                client.send_packet(dst, bytes(60000))
        except ConnectionResetError as e:
            outcome["error"], outcome["at"] = e, time.monotonic()

    return threading.Thread(target=run, name="test-flood", daemon=True), outcome


def test_silence_right_after_an_answer_is_probed_and_found_dead():
    """The relay answers our packet, then forwards nothing more while we wait without
    writing (a QUIC sender waiting for flow-control credit). The link was in use: it is
    pinged after ping_after and dead ping_timeout later, not at our next write or after the
    120 s idle timeout (the black-hole fault test found it at 11 s: derpquic's keep-alive)."""
    pinged = threading.Event()

    def handler(sock, relay, n):
        conn, client_key = derp_accept(sock, relay.key)
        packet = read_frames(sock, conn, F.SendPacket)
        sock.sendall(F.encode_recv_packet(client_key, b"answer to " + packet.data))
        read_frames(sock, conn, F.Ping, timeout=10)  # then silence: no Pong, nothing
        pinged.set()
        drain_until_stop(sock, relay)

    with FakeRelay(handler) as relay:
        c = Collector()
        client = DerpClient(relay.url, PrivateKey.generate(), ping_after=1.0, ping_timeout=0.5, **c.kwargs())
        try:
            client.connect()
            client.send_packet(relay.key.public_key, b"request")
            assert c.got_packet.wait(5)
            t_answer = time.monotonic()
            assert c.closed.wait(5), "a link silent right after an answer was never probed"
            verdict = time.monotonic() - t_answer
            assert pinged.is_set()
            assert isinstance(c.close_error, TimeoutError) and "did not answer a ping" in str(c.close_error)
            # ping_after + ping_timeout + two reader wake-ups (0.125 s each) + slack
            assert verdict <= 1.5 + 0.25 + 1.0, verdict
        finally:
            client.close()


def test_writer_stuck_in_a_full_buffer_does_not_delay_the_verdict():
    """A relay that stops reading and forwarding while we write: our writer blocks in a full
    socket buffer (for up to the 30 s write timeout). The reader still pings (aside), calls
    the link dead within ping_after + ping_timeout, and closing the link wakes the writer."""
    def handler(sock, relay, n):
        derp_accept(sock, relay.key)
        relay.stop.wait(20)  # never read, never write

    with FakeRelay(handler, rcvbuf=4096) as relay:
        c = Collector()
        client = stuck_writer_client(relay, c)
        writer, outcome = flood(client, PrivateKey.generate().public_key)
        try:
            client.connect()
            t0 = time.monotonic()
            writer.start()
            assert c.closed.wait(10), "the link was not declared dead"
            verdict = time.monotonic() - t0
            writer.join(5)
            assert not writer.is_alive(), "the stuck writer was not woken by the dead link"
            assert isinstance(c.close_error, TimeoutError) and "did not answer a ping" in str(c.close_error)
            # ping_after + ping_timeout + two reader wake-ups (0.125 s each) + slack, far below 30 s
            assert verdict <= 1.0 + 0.25 + 1.5, verdict
            assert outcome["at"] - t0 <= verdict + 1.0
        finally:
            client.close()
            writer.join(5)


def test_relay_ping_while_a_writer_is_stuck_does_not_block_the_reader():
    """The relay pings us after it stopped reading, while our writer is stuck in a full
    socket buffer (for up to the 30 s write timeout) holding the send lock. The Pong is
    written aside, so the reader still pings the relay in turn and calls the link dead
    within ping_after + ping_timeout (answering in the reader, it waited 30 s for the lock)."""
    ping_now = threading.Event()

    def handler(sock, relay, n):
        derp_accept(sock, relay.key)
        sock.sendall(F.encode_recv_packet(relay.key.public_key, b"\x00hello"))
        if ping_now.wait(10):
            sock.sendall(F.encode_ping(b"are you?"))
        relay.stop.wait(20)  # never read, never write again

    with FakeRelay(handler, rcvbuf=4096) as relay:
        c = Collector()
        client = stuck_writer_client(relay, c)
        writer, outcome = flood(client, relay.key.public_key)
        try:
            client.connect()
            assert c.got_packet.wait(5)  # the reader runs
            wire = client._wire
            with pytest.raises(BlockingIOError):
                while True:  # fill our send buffer (the relay reads nothing, so the bytes do not matter)
                    wire.sock.send(bytes(65536), socket.MSG_DONTWAIT)
            writer.start()
            deadline = time.monotonic() + 5
            while not wire._send_lock.locked():  # the writer holds the lock, stuck in sendall
                assert time.monotonic() < deadline and writer.is_alive(), "the writer did not get stuck"
                time.sleep(0.01)
            ping_now.set()
            assert c.closed.wait(5), "the reader was held up answering the relay's Ping"
            assert isinstance(c.close_error, TimeoutError) and "did not answer a ping" in str(c.close_error)
            writer.join(5)
            assert not writer.is_alive() and isinstance(outcome.get("error"), ConnectionResetError)
        finally:
            ping_now.set()
            client.close()
            writer.join(5)


def test_relay_hanging_up_reports_connection_reset():
    def handler(sock, relay, n):
        derp_accept(sock, relay.key)  # then return: the socket closes

    with FakeRelay(handler) as relay:
        c = Collector()
        client = DerpClient(relay.url, PrivateKey.generate(), **c.kwargs()).connect()
        try:
            assert c.closed.wait(5)
            assert isinstance(c.close_error, ConnectionResetError)
            with pytest.raises(ConnectionResetError, match="is down"):
                client.send_packet(relay.key.public_key, b"x")
        finally:
            client.close()


def test_protocol_error_after_connect_kills_the_link():
    def handler(sock, relay, n):
        derp_accept(sock, relay.key)
        sock.sendall(F.encode_frame(F.FrameType.PING, b"short"))  # Ping < 8 bytes: malformed
        drain_until_stop(sock, relay)

    with FakeRelay(handler) as relay:
        c = Collector()
        client = DerpClient(relay.url, PrivateKey.generate(), **c.kwargs()).connect()
        try:
            assert c.closed.wait(5)
            assert "PING" in str(c.close_error) or "Ping" in str(c.close_error)
        finally:
            client.close()


def test_close_from_a_callback_does_not_deadlock():
    def handler(sock, relay, n):
        derp_accept(sock, relay.key)
        sock.sendall(F.encode_recv_packet(relay.key.public_key, b"\x00bye"))
        drain_until_stop(sock, relay)

    with FakeRelay(handler) as relay:
        done = threading.Event()
        holder = {}

        def on_packet(src, data):
            holder["client"].close()
            done.set()

        client = DerpClient(relay.url, PrivateKey.generate(), on_packet=on_packet)
        holder["client"] = client
        client.connect()
        assert done.wait(5)
        client.close()  # joins the reader, which ends on its own
        assert not client.connected
