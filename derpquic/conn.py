"""`Conn`: one QUIC connection to a peer, and everything that happens on it.

The per-connection half of the I/O edge (aioquic's `QuicConnectionProtocol`): feeds
datagrams and timers to its aioquic connection, dispatches the events that come out
(streams, key proofs, the end), sends what aioquic has to send and tells its driver
when it next wants to run. Routing between connections is the driver's job
(derpquic.driver); the key-proof decisions are `auth.KeyProof`'s.

No thread and no clock of its own: every call takes `now` (monotonic seconds) or asks
its host once, and is made with the driver's lock held.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import suppress
from enum import Enum

from aioquic.quic import events

from derpnet.errors import PeerNotConnected
from derpnet.keys import PublicKey
from derpnet.paths import RELAY_PATH_MTU

from ._quic import ALPN_AUTH, DerpQuicConnection
from .auth import Action, KeyProof, ProofState, Ready, Refuse, Role, SendProof
from .codes import STREAM_REFUSED, AppError, close_error
from .config import GO_PACKET_SIZE, Options
from .heartbeat import GONE_GRACE, Heartbeat
from .hooks import ConnHost, ConnOwner, StreamEndpoint
from .sizing import MIN_PACKET_SIZE, PacketSizing, packet_size
from .stream import Stream
from .streamstate import window_credit

__all__ = ["Conn", "ConnState", "StreamTable", "create_conn", "MIN_PACKET_SIZE", "GONE_GRACE", "packet_size"]

log = logging.getLogger("derpquic")

#: Streams a peer may open before its connection is ready (held until the key proofs);
#: more are refused. With Options.unaccepted_window this bounds a handshaking peer's bytes.
MAX_PENDING_STREAMS = 16
#: At the end of a batch, acknowledge at once when this many bytes came since our last ACK.
ACK_NOW_BYTES = 2 * MIN_PACKET_SIZE


class ConnState(Enum):
    HANDSHAKE = "handshake"  # the QUIC handshake
    AUTH = "auth"            # the key proofs
    READY = "ready"          # streams flow
    CLOSED = "closed"        # unusable: `Conn.error` says why


class StreamTable:
    """A connection's streams: by ID, those that wait for the key proofs, writers that wait
    for send-buffer room, and closed ones aioquic still knows; plus two counts."""

    def __init__(self) -> None:
        self.by_id: dict[int, StreamEndpoint] = {}
        self.pending: list[Stream] = []             # peer streams that arrived before READY
        self.blocked_writers: set[StreamEndpoint] = set()
        self.zombies: set[StreamEndpoint] = set()   # closed by the application, still known to aioquic
        self.refused: set[int] = set()              # peer stream IDs we reset
        self.unread = 0            # bytes buffered in our Streams, not yet read by the app
        self.open = 0              # streams the app has not closed (keepalive while > 0)

    def __len__(self) -> int:
        return len(self.by_id)

    def get(self, sid: int) -> StreamEndpoint | None:
        return self.by_id.get(sid)

    def add(self, stream: StreamEndpoint) -> None:
        self.by_id[stream.stream_id] = stream
        self.open += 1

    def closed(self, stream: StreamEndpoint) -> None:
        """The application closed `stream`."""
        self.blocked_writers.discard(stream)
        self.open -= 1
        self.zombies.add(stream)

    def sweep(self, known: Callable[[int], bool]) -> None:
        """Forget closed streams that aioquic no longer knows (`known(stream_id)` is False):
        then no event can name them again."""
        if not self.zombies:
            return
        for s in [z for z in self.zombies if not known(z.stream_id)]:
            self.zombies.discard(s)
            if self.by_id.get(s.stream_id) is s:
                del self.by_id[s.stream_id]

    def wake_writers(self) -> None:
        if not self.blocked_writers:
            return
        for s in [w for w in self.blocked_writers if w.wake_writer()]:
            self.blocked_writers.discard(s)

    def lost(self, error: BaseException) -> None:
        for s in [*self.by_id.values(), *self.pending]:
            s.connection_lost(error)
        self.pending.clear()
        self.blocked_writers.clear()

    def lingering(self) -> bool:
        return any(s.lingering() for s in self.by_id.values())

    def refuse(self, sid: int, quic: DerpQuicConnection) -> None:
        """Reset a stream the peer opened that we do not want (once)."""
        if sid not in self.refused:
            self.refused.add(sid)
            with suppress(ValueError, RuntimeError):
                quic.stop_stream(sid, STREAM_REFUSED)
                quic.reset_stream(sid, STREAM_REFUSED)


class ConnBase:
    """A QUIC connection's state and what it says about itself (views, why it ended).
    Every attribute is guarded by the driver's lock (`lock`). `Conn` adds what happens
    on it."""

    def __init__(self, host: ConnHost, quic: DerpQuicConnection, peer: PublicKey, *, owner: ConnOwner,
                 opts: Options, proof: KeyProof, now: float) -> None:
        self.host = host
        self.lock = host.lock
        self.local = host.local
        self.quic = quic
        self.peer = peer
        self.role = proof.role
        self.owner = owner
        self.opts = opts
        self.proof = proof
        self.state = ConnState.HANDSHAKE
        self.cond = threading.Condition(host.lock)  # dial waiters (state changes)
        self.error: BaseException | None = None  # why the connection is unusable
        self.cids: set[bytes] = set()               # our connection IDs the driver routes to us
        self.streams = StreamTable()
        self.peer_auth_stream = 3 if self.role is Role.CLIENT else 2  # the peer's first unidirectional stream
        self.proof_stream: int | None = None      # ours (the server writes it in two parts)
        self.sizing = PacketSizing()
        self.heartbeat = Heartbeat(opts.keepalive_interval, now)
        self.received_any = False
        self.unacked = 0           # bytes received since our last ACK went out
        self.terminated = False    # aioquic reached TERMINATED / we dropped it
        self.terminated_event = threading.Event()

    # ------------------------------------------------------------------ views

    @property
    def is_client(self) -> bool:
        return self.role is Role.CLIENT

    @property
    def ours(self) -> bool:
        """The peer negotiated ALPN derpnet-auth/2 (a derpnet peer, not a Go one)."""
        return self.proof.ours

    @property
    def authenticated(self) -> bool:
        """The peer proved that it holds its key."""
        return self.proof.authenticated

    @property
    def closed(self) -> bool:
        return self.state is ConnState.CLOSED

    def lingering(self) -> bool:
        """Some stream's data still waits for the peer's acknowledgement."""
        return self.state in (ConnState.READY, ConnState.AUTH) and self.streams.lingering()

    def describe(self) -> str:
        return f"{'to' if self.is_client else 'from'} {self.peer.b64()}"

    def __repr__(self) -> str:
        return f"<Conn {self.describe()} {self.state.value}>"

    def _close_error(self, ev: events.ConnectionTerminated) -> BaseException:
        if self.error is not None:
            return self.error
        return close_error(ev, peer=self.peer.b64(), describe=self.describe(),
                           handshaking=self.state in (ConnState.HANDSHAKE, ConnState.AUTH),
                           heard_from_peer=self.received_any, idle_timeout=self.quic.idle_timeout)

    def _gone_error(self) -> BaseException:
        if self.state is ConnState.HANDSHAKE:
            return PeerNotConnected(f"{self.peer.b64()} is not connected to the relay (offline, or on another relay)")
        return ConnectionAbortedError(f"{self.describe()}: the peer left the relay (a Go derpconnect never comes back)")


class Conn(ConnBase):
    """One QUIC connection to a peer and everything that happens on it: datagrams and
    timers in, aioquic's events out to streams, key proofs and the owner, packets out."""

    # ------------------------------------------------------------------ inputs

    def datagram_received(self, data: bytes, now: float) -> None:
        self.receive(data, now)
        self.received_batch(now)

    def receive(self, data: bytes, now: float) -> None:
        """One datagram of a batch: into aioquic, no answer yet (see `received_batch`)."""
        self.quic.receive_datagram(data, self.peer, now)
        self.received_any = True
        self.heartbeat.heard(now)
        self.unacked += len(data)

    def received_batch(self, now: float) -> None:
        """The end of a batch of received datagrams: handle the events and send everything
        due, once. Bulk data (two full-size packets or more since our last ACK) is
        acknowledged now, in that one flush, rather than after aioquic's ack_delay: a
        sender's congestion window only moves on with our ACKs (RFC 9000 13.2.2 asks for an
        ACK every second packet). Small packets wait for ack_delay, so that a request and
        its answer do not each cost an ACK-only packet."""
        if self.unacked >= ACK_NOW_BYTES:
            self.quic.ack_now(now)
        self.process(now)

    def next_timer(self) -> float | None:
        """When this connection next wants `timer_fired` (aioquic's timers, the key-proof
        deadline, keepalive while streams are open); None: never."""
        hb = self.heartbeat
        times = [self.quic.get_timer(), hb.ping_at(self.streams.open > 0) if self.state is ConnState.READY else None,
                 None if self.state is ConnState.CLOSED else self.proof.wake_at, hb.gone_deadline]
        return min((t for t in times if t is not None), default=None)

    def timer_fired(self, now: float) -> None:
        if self.state is not ConnState.CLOSED:
            refused = self.proof.expire(now)
            if refused:
                self._apply(refused, now)
                return
            if self.heartbeat.gone_due(now):
                self.close(self._gone_error(), now=now)
                return
        quic = self.quic
        qt = quic.get_timer()
        if qt is not None and qt <= now:
            quic.handle_timer(now)
        if self.state is ConnState.READY:
            ping = self.heartbeat.ping_due(now, self.streams.open > 0)
            if ping is not None:
                quic.send_ping(ping)
        self.process(now)

    def probe(self, now: float) -> None:
        """PING now and forget the PTO back-off (the path is back or changed)."""
        if self.terminated or self.quic.state_closed:
            return
        self.quic.probe_now(self.heartbeat.next_ping_id())
        self.flush(now)

    def peer_left(self, now: float, *, not_here: bool) -> None:
        """The relay says the peer is not connected to it (PeerGone). A dial fails (at once
        for NOT_HERE, else unless the peer answers within GONE_GRACE); so does a connection
        to a Go peer, which never comes back; a connection to one of ours is probed at once
        (it reconnects by itself; if it does not, the idle timeout ends the connection)."""
        if self.terminated or self.state is ConnState.CLOSED:
            return
        if self.is_client and self.state is ConnState.HANDSHAKE:
            if not_here:
                self.close(self._gone_error(), now=now)
                return
        elif self.ours or self.state is not ConnState.READY:
            self.probe(now)
            return
        self.heartbeat.peer_left(now)
        self.host.schedule(self, self.next_timer())

    def path_changed(self, mtu: int, now: float) -> None:
        """The path to the peer now carries datagrams of up to `mtu` bytes: resize our
        packets (data lost in too-large packets is resent in new ones) and probe at once."""
        if self.terminated or self.quic.state_closed:
            return
        self.quic.set_max_datagram_size(self.sizing.for_path(mtu))
        self.quic.set_pacing(mtu < RELAY_PATH_MTU)
        self.probe(now)

    # ------------------------------------------------------------------ the end

    def close(self, error: BaseException, *, code: int = AppError.CLOSED, reason: str = "",
              now: float | None = None) -> None:
        """Close now: CONNECTION_CLOSE to the peer, `error` to every user."""
        if not self.quic.state_closed:
            self.quic.close(error_code=code, reason_phrase=reason)
        self.fail(error)
        self.process(self.host.now() if now is None else now)

    def fail(self, error: BaseException) -> None:
        """Mark the connection unusable and wake everybody waiting on it."""
        if self.state is ConnState.CLOSED:
            return
        self.state = ConnState.CLOSED
        self.error = error
        self.cond.notify_all()
        self.streams.lost(error)
        self._tell_owner(self.owner.conn_closed)
        self.host.flushed(self)

    def discard(self, error: BaseException, now: float, *, tell_peer: bool) -> None:
        """Fail and forget the connection at once (the driver stops): no draining period."""
        if tell_peer and not self.quic.state_closed:
            self.quic.close(error_code=AppError.CLOSED, reason_phrase="closed")
        self.fail(error)
        if tell_peer:
            for data, _ in self.quic.datagrams_to_send(now):
                self.host.send_datagram(data, self.peer)
        self._terminate()

    def _tell_owner(self, hook: Callable[[Conn], None]) -> None:
        try:
            hook(self)
        except Exception:  # pragma: no cover - a bug in the Listener/Dialer
            log.exception("derpquic: owner hook failed")

    def _terminate(self) -> None:
        self.terminated = True
        self.host.forget(self)
        self.cids.clear()
        self.terminated_event.set()

    # ------------------------------------------------------------------ streams

    def open_stream(self) -> Stream:
        """A new stream of ours, announced to the peer at once (an empty STREAM frame)."""
        sid = self.quic.get_next_available_stream_id()
        self.quic.announce_stream(sid)
        s = Stream(self, sid)
        self.streams.add(s)
        self.flush()
        return s

    def _peer_stream(self, sid: int) -> StreamEndpoint | None:
        """A stream the peer opened: a Stream for the listener, or a refusal."""
        s = self.streams.get(sid)
        if s is not None or sid % 4 >= 2 or (sid % 2 == 1) != self.is_client:
            return s  # known, unidirectional, or not the peer's
        if self.is_client or self.state is ConnState.CLOSED:
            # Our dialled connections do not accept streams from the listener side.
            self.streams.refuse(sid, self.quic)
            return None
        if self.state is not ConnState.READY and len(self.streams.pending) >= MAX_PENDING_STREAMS:
            self.streams.refuse(sid, self.quic)  # streams before the key proofs: a few, not 1024
            return None
        stream = Stream(self, sid)
        self.streams.add(stream)
        if self.state is ConnState.READY:
            self.owner.stream_opened(stream)
        else:
            self.streams.pending.append(stream)
        return stream

    # ------------------------------------------------------------------ processing

    def process(self, now: float) -> None:
        """Handle aioquic's events, then flush."""
        quic = self.quic
        while (ev := quic.next_event()) is not None:
            self._event(ev, now)
        for sid in quic.take_new_peer_streams():
            self._peer_stream(sid)
        if self.state is not ConnState.CLOSED and quic.close_event is not None:
            self.fail(self._close_error(quic.close_event))
        self.flush(now)

    def flush(self, now: float | None = None) -> None:
        """Send what aioquic has to send, wake writers that have room, reschedule."""
        if self.terminated:
            return
        if now is None:
            now = self.host.now()
        quic = self.quic
        if self.state is ConnState.READY or self.state is ConnState.AUTH:
            used, limit = quic.connection_receive_window()
            credit = window_credit(used - self.streams.unread, self.opts.connection_window, limit)
            if credit is not None:
                quic.grant_connection(credit)
        datagrams = quic.datagrams_to_send(now)
        if not quic.ack_pending:
            self.unacked = 0
        if quic.issued_cids:  # routed before the NEW_CONNECTION_ID frames leave
            for cid in quic.take_issued_cids():
                self.cids.add(cid)
                self.host.add_route(self, cid)
        if datagrams:
            self.host.send_datagrams([data for data, _ in datagrams], self.peer)
        upgrade = self.sizing.take_upgrade()
        if upgrade:
            quic.set_max_datagram_size(upgrade)
        self.streams.sweep(lambda sid: quic.stream(sid) is not None)
        self.streams.wake_writers()
        self.host.flushed(self)
        self.host.schedule(self, self.next_timer())

    def _event(self, ev: events.QuicEvent, now: float) -> None:
        match ev:
            case events.StreamDataReceived(stream_id=sid, data=data, end_stream=end):
                s = self.streams.get(sid)
                if s is None and sid == self.peer_auth_stream:
                    self._apply(self.proof.proof_received(data, end), now)
                    return
                if s is None:
                    s = self._peer_stream(sid)  # else: data we do not want, already counted, dropped
                if s is not None:
                    s.data_received(data, end)
            case events.StreamReset(stream_id=sid, error_code=code):
                s = self._peer_stream(sid)
                if s is not None:
                    s.reset_received(code)
            case events.StopSendingReceived(stream_id=sid, error_code=code):
                s = self.streams.get(sid)
                if s is not None:
                    s.stop_sending_received(code)
                    self.streams.blocked_writers.discard(s)
            case events.ProtocolNegotiated(alpn_protocol=alpn) if not self.is_client:
                # The server's key-proof hello leaves with its first flight (0.5-RTT data).
                self._apply(self.proof.protocol_negotiated(alpn == ALPN_AUTH), now)
            case events.HandshakeCompleted(alpn_protocol=alpn):
                self._handshake_completed(alpn == ALPN_AUTH, now)
            case events.ConnectionIdIssued(connection_id=cid):
                self.cids.add(cid)
                self.host.add_route(self, cid)
            case events.ConnectionIdRetired(connection_id=cid):
                self.cids.discard(cid)
                self.host.remove_route(self, cid)
            case events.ConnectionTerminated():
                self.fail(self._close_error(ev))
                self._terminate()
            case events.DatagramFrameReceived(data=data) if self.state is ConnState.READY:
                self.owner.datagram_received(self, data)  # (before READY: the peer is not proven yet, dropped)
            case _:
                pass  # PingAcknowledged, ProtocolNegotiated: nothing to do

    def _handshake_completed(self, ours: bool, now: float) -> None:
        actions = self.proof.handshake_completed(ours)
        if ours and self.proof.state is not ProofState.REFUSED:
            # Our peer: bigger packets, bounded by what it says it can read, by the PacketConn
            # and by the current path (after the next flush).
            self.sizing.negotiated(min(self.opts.max_datagram_size, RELAY_PATH_MTU),
                                   self.quic.peer_max_datagram_size, self.host.path_mtu(self.peer))
        if self.proof.state is ProofState.PROVING:
            self.state = ConnState.AUTH
        self._apply(actions, now)

    def _apply(self, actions: list[Action], now: float) -> None:
        for action in actions:
            match action:
                case SendProof(message=message, end=end):
                    self.send_proof(message, end)
                case Ready(authenticated=authenticated):
                    self._ready(authenticated)
                case Refuse(code=code, reason=reason, error=error, detail=detail):
                    log.log(logging.WARNING if code is AppError.AUTH_FAILED else logging.INFO,
                            "derpquic: %s", detail)
                    self.close(error, code=code, reason=reason, now=now)
                    return

    def send_proof(self, message: bytes, end: bool = True) -> None:
        """Our key proof (or a part of it), on our first unidirectional stream."""
        if self.proof_stream is None:
            self.proof_stream = self.quic.get_next_available_stream_id(is_unidirectional=True)
        self.quic.send_stream_data(self.proof_stream, message, end_stream=end)

    def _ready(self, authenticated: bool) -> None:
        self.state = ConnState.READY
        self.cond.notify_all()
        self._tell_owner(self.owner.conn_ready)
        pending, self.streams.pending = self.streams.pending, []
        for s in pending:
            if not s.closed:
                self.owner.stream_opened(s)
        if authenticated:
            self.host.peer_verified(self.peer)


def create_conn(host: ConnHost, proof: KeyProof, owner: ConnOwner, opts: Options, now: float, *,
                original_dcid: bytes | None = None, conn_class: type[Conn] = Conn) -> Conn:
    """A new connection to `proof.peer` in `proof.role`: aioquic configured from `opts`
    (packets no larger than the path carries). A client still has to `quic.connect()`;
    a server gets the Initial packet's destination connection ID as `original_dcid`."""
    client = proof.role is Role.CLIENT
    path_mtu = host.path_mtu(proof.peer)
    cfg = opts.quic_configuration(is_client=client, alpn=[ALPN_AUTH] if client else None,
                                  secrets_log_file=proof.secrets,
                                  max_datagram_size=packet_size(GO_PACKET_SIZE, path_mtu))
    quic = DerpQuicConnection(configuration=cfg, original_destination_connection_id=original_dcid,
                              max_streams_bidi=opts.max_streams, ack_delay=opts.ack_delay)
    quic.set_pacing(path_mtu < RELAY_PATH_MTU)  # paced on a direct UDP path only
    if not client:
        quic.optional_alpn = [ALPN_AUTH]
    return conn_class(host, quic, proof.peer, owner=owner, opts=opts, proof=proof, now=now)
