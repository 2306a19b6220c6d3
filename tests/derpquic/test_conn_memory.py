"""`Conn` without sockets or threads: two connections (client and server, each its own
aioquic QuicConnection) wired in memory, with an explicit clock. Handshake and key proofs,
streams, packet sizes and path changes, Go-like peers, refusals, timers."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Callable

import pytest
from aioquic.buffer import Buffer
from aioquic.quic.packet import pull_quic_header

from derpnet.errors import AuthenticationError
from derpnet.keys import PrivateKey, PublicKey
from derpquic.auth import AuthPolicy, KeyProof, Role
from derpquic.codes import AppError
from derpquic.config import GO_PACKET_SIZE, Options
from derpquic.conn import Conn, ConnState, create_conn, packet_size
from derpquic.driver import CID_LENGTH, Admission, admit
from derpquic.stream import Stream

CLIENT_KEY = PrivateKey.generate()
SERVER_KEY = PrivateKey.generate()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0


class Host:
    """What a Conn needs from its driver (ConnHost), recording everything."""

    def __init__(self, key: PrivateKey, clock: Clock, mtu: int = 65535) -> None:
        self.lock = threading.Lock()  # a Stream waits on it; nobody else takes it here
        self.local = key.public_key
        self.clock = clock
        self.mtu = mtu
        self.outbox: list[bytes] = []
        self.sent = 0
        self.routes: dict[bytes, Conn] = {}
        self.timers: dict[Conn, float | None] = {}
        self.verified: list[PublicKey] = []
        self.forgotten: list[Conn] = []

    def now(self) -> float:
        return self.clock.now

    def send_datagram(self, data: bytes, peer: PublicKey) -> None:
        self.outbox.append(data)
        self.sent += 1

    def send_datagrams(self, datagrams: list[bytes], peer: PublicKey) -> None:
        for data in datagrams:
            self.send_datagram(data, peer)

    def add_route(self, conn: Conn, cid: bytes) -> None:
        self.routes[cid] = conn

    def remove_route(self, conn: Conn, cid: bytes) -> None:
        self.routes.pop(cid, None)

    def forget(self, conn: Conn) -> None:
        self.forgotten.append(conn)
        self.timers.pop(conn, None)

    def schedule(self, conn: Conn, when: float | None) -> None:
        self.timers[conn] = when

    def flushed(self, conn: Conn) -> None:
        pass

    def peer_verified(self, peer: PublicKey) -> None:
        self.verified.append(peer)

    def path_mtu(self, peer: PublicKey) -> int:
        return self.mtu


class Owner:
    """A Listener's or Dialer's side (ConnOwner), recording."""

    def __init__(self) -> None:
        self.ready: list[Conn] = []
        self.closed: list[Conn] = []
        self.streams: list[Stream] = []

    def conn_ready(self, conn: Conn) -> None:
        self.ready.append(conn)

    def conn_closed(self, conn: Conn) -> None:
        self.closed.append(conn)

    def stream_opened(self, stream: Stream) -> None:
        self.streams.append(stream)


class Pair:
    """A client Conn and the server Conn its first Initial creates, and the wire between."""

    def __init__(self, *, client_policy: AuthPolicy = AuthPolicy(), server_policy: AuthPolicy = AuthPolicy(),
                 opts: Options = Options(), mtu: int = 65535, client_class: type[Conn] = Conn,
                 server_alpn: bool = True) -> None:
        self.clock = Clock()
        self.opts = opts
        self.server_policy = server_policy
        self.server_alpn = server_alpn
        self.ch, self.sh = Host(CLIENT_KEY, self.clock, mtu), Host(SERVER_KEY, self.clock, mtu)
        self.co, self.so = Owner(), Owner()
        proof = KeyProof(CLIENT_KEY, SERVER_KEY.public_key, Role.CLIENT, client_policy, now=self.clock.now)
        self.client = create_conn(self.ch, proof, self.co, opts, self.clock.now, conn_class=client_class)
        with self.ch.lock:  # (what the driver holds around every Conn call)
            self.client.quic.connect(SERVER_KEY.public_key, self.clock.now)
            self.client.process(self.clock.now)
        self.server: Conn | None = None
        self.sizes: list[int] = []  # every datagram that crossed the wire
        self.lost = 0
        self.lose: Callable[[bytes], bool] = lambda data: False

    def _to_server(self, data: bytes) -> None:
        if self.server is None:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
            assert admit(header, len(data)) is Admission.ACCEPT
            proof = KeyProof(SERVER_KEY, CLIENT_KEY.public_key, Role.SERVER, self.server_policy,
                             now=self.clock.now, timeout=self.opts.dial_timeout)
            self.server = create_conn(self.sh, proof, self.so, self.opts, self.clock.now,
                                      original_dcid=header.destination_cid)
            if not self.server_alpn:
                self.server.quic.optional_alpn = None  # selects no ALPN, as quic-go
        with self.sh.lock:
            self.server.datagram_received(data, self.clock.now)

    def pump(self) -> int:
        """Deliver datagrams both ways until nobody has anything to send; returns the count."""
        moved = 0
        while self.ch.outbox or self.sh.outbox:
            for host, deliver in ((self.ch, self._to_server), (self.sh, self._to_client)):
                out, host.outbox = host.outbox, []
                for data in out:
                    moved += 1
                    self.sizes.append(len(data))
                    if self.lose(data):
                        self.lost += 1
                    else:
                        deliver(data)
        return moved

    def _to_client(self, data: bytes) -> None:
        with self.ch.lock:
            self.client.datagram_received(data, self.clock.now)

    def host(self, conn: Conn) -> Host:
        return self.ch if conn is self.client else self.sh

    def call(self, conn: Conn, method: str, *args, **kwargs):
        """conn.method(*args) with its driver lock held, as the driver calls it."""
        with self.host(conn).lock:
            return getattr(conn, method)(*args, **kwargs)

    def conns(self) -> list[Conn]:
        return [c for c in (self.client, self.server) if c is not None]

    def run(self, until: Callable[[], bool] = lambda: False, seconds: float = 5.0) -> None:
        """Pump, then move the clock to the next timer and fire it, until `until()` or
        `seconds` of simulated time passed."""
        end = self.clock.now + seconds
        while True:
            self.pump()
            if until():
                return
            timers = [(t, c) for c in self.conns() for t in [self.host(c).timers.get(c)] if t is not None]
            if not timers:
                return
            t, conn = min(timers, key=lambda tc: tc[0])
            if t > end:
                return
            self.clock.now = max(self.clock.now, t)
            self.call(conn, "timer_fired", self.clock.now)

    def hold(self, conn: Conn, seconds: float) -> None:
        """Let `conn` send for `seconds` (its timers: pacing, ACKs) while nothing is delivered."""
        end = self.clock.now + seconds
        host = self.host(conn)
        while (t := host.timers.get(conn)) is not None and t <= end:
            self.clock.now = max(self.clock.now, t)
            self.call(conn, "timer_fired", self.clock.now)
        self.clock.now = end

    def ready(self) -> bool:
        return all(c.state is ConnState.READY for c in self.conns()) and self.server is not None

    def connect(self) -> Pair:
        self.run(self.ready)
        assert self.ready(), [c.state for c in self.conns()]
        return self


def recv_available(s: Stream) -> bytes:
    s.setblocking(False)
    out = bytearray()
    while True:
        try:
            b = s.recv(1 << 20)
        except BlockingIOError:
            return bytes(out)
        if not b:
            return bytes(out)
        out += b


# ---------------------------------------------------------------- handshake and key proofs


def test_handshake_and_key_proofs():
    p = Pair().connect()
    c, s = p.client, p.server
    assert c.ours and s.ours and c.authenticated and s.authenticated
    assert p.co.ready == [c] and p.so.ready == [s]
    assert p.ch.verified == [SERVER_KEY.public_key] and p.sh.verified == [CLIENT_KEY.public_key]
    assert c.quic.max_datagram_size == s.quic.max_datagram_size == 65527  # our peers: big packets
    assert len(p.ch.routes) > 1 and all(r is c for r in p.ch.routes.values())  # issued CIDs routed
    assert c.proof.wake_at is None and s.proof.wake_at is None


def test_handshake_packets_never_exceed_the_go_size():
    p = Pair()
    p.run(lambda: p.server is not None and p.server.state is not ConnState.HANDSHAKE)
    assert max(p.sizes) <= GO_PACKET_SIZE


# ---------------------------------------------------------------- streams


def test_stream_echo_and_half_close():
    p = Pair().connect()
    s = p.call(p.client, "open_stream")
    p.run(lambda: len(p.so.streams) == 1, seconds=0.1)
    assert len(p.so.streams) == 1  # announced before any data (server speaks first works)
    r = p.so.streams[0]
    assert r.remote_addr() == CLIENT_KEY.public_key and r.local_addr() == SERVER_KEY.public_key
    s.sendall(b"ping")
    s.shutdown(socket.SHUT_WR)
    p.run(lambda: r._state.eof)
    assert recv_available(r) == b"ping"
    r.sendall(b"PONG")
    r.close()
    p.run(lambda: s._state.eof)
    assert recv_available(s) == b"PONG"
    s.close()
    p.run(lambda: len(p.client.streams) == 0 and len(p.server.streams) == 0, seconds=2)
    assert p.client.streams.open == 0 and p.server.streams.open == 0


def test_peer_streams_wait_for_the_key_proof():
    """A stream that arrives before the dialler's proof verified is held back, then handed out."""
    held: list[bytes] = []

    class LateProof(Conn):
        def send_proof(self, message, end=True):
            held.append(message)

    p = Pair(client_class=LateProof)
    p.run(lambda: p.client.state is ConnState.AUTH)
    s = p.call(p.client, "open_stream")
    s.sendall(b"early data")
    p.run(lambda: bool(p.server.streams.pending), seconds=1)
    assert p.server.state is ConnState.AUTH and p.so.streams == [] and len(p.server.streams.pending) == 1
    with p.ch.lock:
        Conn.send_proof(p.client, held[0])
        p.client.flush()
    p.connect()
    assert len(p.so.streams) == 1 and recv_available(p.so.streams[0]) == b"early data"


def test_dialled_connections_refuse_streams_from_the_listener_side():
    p = Pair().connect()
    wrong = p.call(p.server, "open_stream")
    wrong.sendall(b"unsolicited")
    p.run(lambda: wrong._state.stop_error is not None, seconds=2)
    assert p.co.streams == []
    with pytest.raises(ConnectionResetError):
        wrong.sendall(b"more")


def test_receive_window_follows_the_reader():
    opts = Options(stream_window=16384, connection_window=65536)
    p = Pair(opts=opts).connect()
    s = p.call(p.client, "open_stream")
    s.sendall(os.urandom(200_000))
    p.run(seconds=1)
    r = p.so.streams[0]
    assert len(r._rbuf) <= 16384  # the peer may not send beyond the window while we do not read
    got = bytearray(recv_available(r))
    for _ in range(100):
        p.run(seconds=0.5)
        got += recv_available(r)
        if len(got) == 200_000:
            break
    assert len(got) == 200_000


# ---------------------------------------------------------------- packet sizes and paths


def test_small_path_from_the_start():
    p = Pair(mtu=1252).connect()
    s = p.call(p.client, "open_stream")
    s.sendall(os.urandom(100_000))
    p.run(lambda: len(p.so.streams) == 1 and len(p.so.streams[0]._rbuf) == 100_000)
    assert p.client.quic.max_datagram_size == 1252 and max(p.sizes) <= 1252


def test_path_change_mid_transfer_loses_nothing():
    p = Pair().connect()
    s = p.call(p.client, "open_stream")
    data = os.urandom(600_000)
    s.sendall(data[:300_000])
    p.hold(p.client, 0.005)
    assert any(len(d) > 1252 for d in p.ch.outbox)  # big packets in flight ...
    for c in p.conns():
        p.call(c, "path_changed", 1252, p.clock.now)  # ... when the path shrinks: lost on the new path
    p.lose = lambda d: len(d) > 1252
    p.run(seconds=0.001)  # deliver / lose what was in flight
    assert p.lost > 0
    mark = len(p.sizes)
    s.sendall(data[300_000:])
    s.shutdown(socket.SHUT_WR)
    got = bytearray()

    def done() -> bool:
        if not p.so.streams:
            return False
        got.extend(recv_available(p.so.streams[0]))
        return p.so.streams[0]._state.eof

    p.run(done, seconds=30)
    assert hashlib.sha256(bytes(got)).digest() == hashlib.sha256(data).digest()
    assert max(p.sizes[mark:]) <= 1252
    assert p.client.quic.max_datagram_size == 1252

    # Back to the relay: packets grow again.
    for c in p.conns():
        p.call(c, "path_changed", 65535, p.clock.now)
    assert p.client.quic.max_datagram_size == 65527
    mark = len(p.sizes)
    r = p.so.streams[0]
    r.sendall(os.urandom(300_000))
    p.run(seconds=1)
    assert max(p.sizes[mark:]) > 16384


def test_path_change_probes_at_once():
    p = Pair().connect()
    before, sent = p.clock.now, p.ch.sent
    p.call(p.client, "path_changed", 65535, p.clock.now)
    p.run(lambda: p.ch.sent > sent, seconds=0.05)
    assert p.ch.sent > sent and p.clock.now - before < 0.05, "a PING goes out without waiting for the PTO"


def test_packet_size():
    assert packet_size(65527, 65535) == 65527
    assert packet_size(65527, 1252) == 1252
    assert packet_size(GO_PACKET_SIZE, 65535) == GO_PACKET_SIZE
    assert packet_size(65527, 500) == 1200  # never below QUIC's minimum


# ---------------------------------------------------------------- peers that cannot prove their key


def test_go_like_server_with_allow_unauthenticated():
    p = Pair(client_policy=AuthPolicy(allow_unauthenticated=True), server_alpn=False).connect()
    assert not p.client.ours and not p.client.authenticated and not p.server.authenticated
    assert p.client.quic.max_datagram_size == GO_PACKET_SIZE
    p.call(p.client, "path_changed", 65535, p.clock.now)
    assert p.client.quic.max_datagram_size == GO_PACKET_SIZE  # Go peers stay at quic-go's size
    assert p.ch.verified == [] and p.sh.verified == []


def test_go_like_server_refused_by_default():
    p = Pair(server_alpn=False)
    p.run(lambda: p.client.closed and p.server is not None and p.server.closed)
    assert isinstance(p.client.error, AuthenticationError) and "allow_unauthenticated" in str(p.client.error)
    # The client closes before the server's handshake completes: QUIC then carries only a
    # bare APPLICATION_ERROR, which the server reports as a refusal.
    assert isinstance(p.server.error, ConnectionRefusedError), p.server.error
    assert p.co.closed == [p.client] and p.so.closed == [p.server] and p.co.ready == []


def test_listener_requiring_auth_refuses_a_peer_without_derpnet_auth():
    p = Pair(server_policy=AuthPolicy(require_auth=True), server_alpn=False,
             client_policy=AuthPolicy(allow_unauthenticated=True))
    p.run(lambda: p.client.closed)
    assert isinstance(p.client.error, AuthenticationError) and "requires peers to prove" in str(p.client.error)


def test_key_proofs_take_no_extra_round_trip():
    """derpnet-auth/2's ephemeral keys cost no round trip: the server's hello rides its first
    flight (0.5-RTT data), the client's proof its Finished, the server's MAC the next flight.
    Flights in lockstep: the server is ready after the third, the client after the fourth,
    without any timer."""
    p = Pair()
    flights = []
    while not p.ready() and len(flights) < 8:
        host, deliver = (p.ch, p._to_server) if len(flights) % 2 == 0 else (p.sh, p._to_client)
        out, host.outbox = host.outbox, []
        for data in out:
            deliver(data)
        flights.append((len(out), [c.state for c in p.conns()]))
        if len(flights) == 3:
            assert p.server.state is ConnState.READY and p.server.authenticated, flights
    assert p.ready() and len(flights) == 4, flights
    assert p.client.authenticated and p.server.authenticated


# ---------------------------------------------------------------- refusals and ends


def test_allow_list_refusal():
    p = Pair(server_policy=AuthPolicy(allow=frozenset({PrivateKey.generate().public_key})))
    p.run(lambda: p.client.closed)
    assert isinstance(p.client.error, ConnectionRefusedError) and "allow-list" in str(p.client.error)
    assert p.so.ready == [] and p.so.streams == []


def test_listener_drops_a_peer_that_never_proves_its_key():
    class NoProof(Conn):
        def send_proof(self, message, end=True):
            pass

    p = Pair(client_class=NoProof, opts=Options(dial_timeout=3.0))
    start = p.clock.now
    p.run(lambda: p.client.closed, seconds=10)
    assert p.server.closed and isinstance(p.server.error, TimeoutError)
    assert 3.0 <= p.clock.now - start < 4.0
    assert isinstance(p.client.error, AuthenticationError) and "authentication timed out" in str(p.client.error)


def test_close_reaches_the_peer_and_its_streams():
    p = Pair().connect()
    s = p.call(p.client, "open_stream")
    p.run(lambda: len(p.so.streams) == 1, seconds=0.1)
    r = p.so.streams[0]
    p.call(p.client, "close", ConnectionAbortedError("dialer closed"), code=AppError.CLOSED, reason="closed")
    assert p.client.closed and p.co.closed == [p.client]
    p.run(lambda: p.server.closed, seconds=1)
    assert isinstance(p.server.error, ConnectionResetError) and "closed the connection: closed" in str(p.server.error)
    with pytest.raises(ConnectionResetError):
        r.recv(10)
    with pytest.raises(ConnectionAbortedError):
        s.sendall(b"x")
    p.run(lambda: p.client.terminated and p.server.terminated, seconds=10)
    assert p.ch.forgotten == [p.client] and p.sh.forgotten == [p.server]
    assert p.client.terminated_event.is_set()


def test_idle_connection_times_out():
    p = Pair(opts=Options(idle_timeout=2.0)).connect()
    p.lose = lambda d: True  # the peer vanishes
    start = p.clock.now
    p.run(lambda: p.client.closed, seconds=10)
    assert isinstance(p.client.error, ConnectionAbortedError) and "timed out" in str(p.client.error)
    assert 2.0 <= p.clock.now - start < 4.0


def test_keepalive_while_streams_are_open():
    p = Pair(opts=Options(keepalive_interval=1.0, idle_timeout=3.0)).connect()
    s = p.call(p.client, "open_stream")
    p.pump()
    start = p.clock.now
    p.run(lambda: p.clock.now - start > 20, seconds=21)  # idle for 20 s of simulated time
    assert not p.client.closed and not p.server.closed
    assert p.client.heartbeat.last_ping > start
    s.sendall(b"still there")
    p.run(lambda: bool(p.so.streams[0]._rbuf))
    assert recv_available(p.so.streams[0]) == b"still there"


def test_probe_sends_a_ping_now():
    p = Pair().connect()
    before, sent = p.clock.now, p.ch.sent
    p.call(p.client, "probe", p.clock.now)
    p.run(lambda: p.ch.sent > sent, seconds=0.05)
    assert p.ch.sent > sent and p.clock.now - before < 0.05


def test_discard_tells_the_peer_without_draining():
    p = Pair().connect()
    p.call(p.client, "discard", ConnectionAbortedError("closed locally"), p.clock.now, tell_peer=True)
    assert p.client.terminated and p.ch.outbox  # the CONNECTION_CLOSE
    p.pump()
    assert p.server.closed


def test_every_announced_connection_id_is_routed_before_its_frame_leaves():
    """quic-go switches to a connection ID from NEW_CONNECTION_ID at once: the route must
    exist when the packet carrying the frame is sent, not after the next event loop."""
    p = Pair()
    unrouted: list[bytes] = []
    for host, conn in ((p.ch, lambda: p.client), (p.sh, lambda: p.server)):
        def check(data: bytes, peer: PublicKey, host: Host = host, conn=conn) -> None:
            c = conn()
            if c is not None:
                unrouted.extend(cid.cid for cid in c.quic._host_cids  # (the first: the driver routes it)
                                if cid.was_sent and cid.sequence_number and host.routes.get(cid.cid) is not c)
            host.outbox.append(data)
            host.sent += 1
        host.send_datagram = check  # type: ignore[method-assign]
    p.connect()
    assert len(p.client.quic._host_cids) > 1 and all(c.was_sent for c in p.client.quic._host_cids)
    assert unrouted == []


def test_a_batch_of_bulk_data_is_acknowledged_at_once_a_small_packet_waits():
    p = Pair(opts=Options(ack_delay=0.025)).connect()
    s = p.call(p.client, "open_stream")
    p.pump()
    server = p.server
    sent = p.sh.sent
    # Two full-size packets in one batch: the ACK goes out with the batch's flush.
    s.sendall(os.urandom(2 * 1400))
    out, p.ch.outbox = p.ch.outbox, []
    with p.sh.lock:
        for data in out:
            server.receive(data, p.clock.now)
        server.received_batch(p.clock.now)
    assert p.sh.sent > sent and not server.quic.ack_pending
    # One small packet (a request): its ACK waits for ack_delay, for an answer to carry it.
    sent = p.sh.sent
    s.sendall(b"ping")
    out, p.ch.outbox = p.ch.outbox, []
    with p.sh.lock:
        for data in out:
            server.receive(data, p.clock.now)
        server.received_batch(p.clock.now)
    assert p.sh.sent == sent and server.quic.ack_pending


def test_the_relay_path_goes_unpaced_a_direct_path_is_paced():
    p = Pair().connect()  # mtu 65535: the relay
    quic = p.client.quic
    assert quic._loss._pacer.next_send_time(p.clock.now) is None
    p.call(p.client, "path_changed", 1400, p.clock.now)  # a direct UDP path
    pacer = quic._loss._pacer
    pacer.update_rate(congestion_window=100_000, smoothed_rtt=0.01)
    assert pacer.packet_time is not None
    p.call(p.client, "path_changed", 65535, p.clock.now)  # back on the relay
    assert quic._loss._pacer.next_send_time(p.clock.now) is None


# ---------------------------------------------------------------- admission (the driver's routing rule)


def _header(first: int, version: int, size: int = 1200):
    pkt = bytes([first]) + version.to_bytes(4, "big") + bytes([8]) + bytes(8) + bytes([8]) + bytes(8)
    pkt += bytes(size - len(pkt))
    return pull_quic_header(Buffer(data=pkt), host_cid_length=CID_LENGTH), len(pkt)


def test_admit():
    assert admit(*_header(0xC0, 1)) is Admission.ACCEPT                    # Initial, v1
    assert admit(*_header(0xC0, 1, size=1199)) is Admission.DROP           # too short for an Initial
    assert admit(*_header(0xC0, 0x1A2A3A4A)) is Admission.NEGOTIATE        # unknown version
    assert admit(*_header(0xC0, 0x1A2A3A4A, size=300)) is Admission.DROP   # too short to answer
    assert admit(*_header(0xE0, 1)) is Admission.DROP                      # Handshake, unknown connection
    assert admit(*_header(0x80, 0, size=1203)) is Admission.DROP           # a Version Negotiation itself
