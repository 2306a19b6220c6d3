"""The QUIC driver: aioquic's sans-IO connections run by one thread per PacketConn.

This module plays the part of aioquic's `asyncio/` package, with a thread instead
of an event loop. Callers never see it; `Listener`, `Dialer` and `Stream` use it.

Threads
-------
* one receive thread per PacketConn, ``derpquic-rx-<key>`` (daemon, joined by
  `shutdown()`): reads datagrams, routes each to its connection by
  (peer key, destination connection ID), creates server-side connections for
  Initial packets (answering unknown versions with Version Negotiation, as
  aioquic's asyncio server does), and runs every connection's timers. Its read
  deadline is the earliest timer; an application thread that makes a timer
  earlier moves the deadline, which wakes the blocked read at once
  (`PacketConn.set_read_deadline`).
* application threads call into streams (send/recv/...), which drive the same
  connections directly: a send() hands its bytes to aioquic and flushes the
  resulting packets itself, without waiting for the receive thread.

Locking
-------
One lock per driver, `Driver.lock`, guards *everything* mutable here: every
aioquic connection (which is not thread-safe), the routing table, the timer heap,
the per-connection and per-stream state, the accept queue. Every
`threading.Condition` (dial waiters, readers, writers, accept) is built on it, so a
waiting thread releases it. It is held while packets are written to the PacketConn
(`write_to` never blocks long; it drops during a relay outage), so packets leave
in the order aioquic produced them. The PacketConn's own lock is only ever taken
after ours (never the reverse), so there is no lock-order inversion. No user code
(callbacks) runs under the lock.

After *every* event (a datagram, a timer, an application call) the affected
connection is flushed (`datagrams_to_send`) and its timer rescheduled.

Time: aioquic runs on `time.monotonic()`; the PacketConn's deadline is absolute
`time.time()`, converted at the last moment.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Optional

from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.packet import (QuicPacketType, encode_quic_version_negotiation, pull_quic_header)

from derpnet.errors import AuthenticationError
from derpnet.keys import PrivateKey, PublicKey
from derpnet.packetconn import LinkUp

from . import auth
from ._quic import ALPN_AUTH, DerpQuicConnection, peer_transport_parameters, probe_now, set_max_datagram_size
from .config import GO_PACKET_SIZE, Options

if TYPE_CHECKING:  # pragma: no cover
    from .stream import Stream

__all__ = ["Driver", "Conn", "ERR_AUTH_FAILED", "ERR_NOT_ALLOWED", "ERR_AUTH_REQUIRED", "ERR_CLOSED"]

log = logging.getLogger("derpquic")

CID_LENGTH = 8
MIN_INITIAL_SIZE = 1200
MAX_PACKETCONN_DATAGRAM = 65535

# Application error codes in CONNECTION_CLOSE (our peers decode them into exceptions).
ERR_CLOSED = 0x0            # normal close
ERR_AUTH_FAILED = 0x1       # the peer's key proof did not verify
ERR_NOT_ALLOWED = 0x2       # the peer's key is not in the allow-list
ERR_AUTH_REQUIRED = 0x3     # the peer cannot prove its key (no derpnet-auth ALPN) but we require it
ERR_STREAM_REFUSED = 0x10   # stream code: refused (listener backlog full / unexpected stream)


# Connection states
HANDSHAKE, AUTH, READY, CLOSED = "handshake", "auth", "ready", "closed"


class Conn:
    """One QUIC connection: aioquic state plus what the driver and streams need.
    Every attribute is guarded by `driver.lock`."""

    def __init__(self, driver: "Driver", quic: DerpQuicConnection, peer: PublicKey, *, is_client: bool,
                 owner: Any, opts: Options, secrets: auth.SecretsCollector,
                 allow_unauthenticated: bool = False, require_auth: bool = False,
                 allow: Optional[frozenset] = None) -> None:
        self.driver = driver
        self.quic = quic
        self.peer = peer
        self.is_client = is_client
        self.owner = owner  # the Dialer or Listener (object with _conn_ready/_conn_closed hooks)
        self.opts = opts
        self.secrets = secrets
        self.allow_unauthenticated = allow_unauthenticated
        self.require_auth = require_auth
        self.allow = allow
        self.state = HANDSHAKE
        self.cond = threading.Condition(driver.lock)  # dial waiters (state changes)
        self.error: Optional[BaseException] = None  # why the connection is unusable
        self.ours = False          # the peer negotiated ALPN derpnet-auth/1
        self.authenticated = False
        self.cids: set[bytes] = set()
        self.streams: dict[int, "Stream"] = {}
        self.pending_streams: list["Stream"] = []  # peer streams that arrived before READY
        self.proof_in = bytearray()
        self.proof_in_done = False
        self.proof_sent = False
        self.peer_auth_stream = (3 if is_client else 2)  # the peer's first unidirectional stream
        self.blocked_writers: set["Stream"] = set()
        self.zombies: set["Stream"] = set()  # closed by the application, still known to aioquic
        self.refused: set[int] = set()
        self.refuse = False        # server: the claimed key is not in the allow-list
        self.upgrade_size = 0      # packet size to switch to after the next flush (our peers)
        self.unread = 0            # bytes buffered in our Streams, not yet read by the app
        self.open_streams = 0      # streams the app has not closed (keepalive while > 0)
        self.received_any = False
        self.created = time.monotonic()
        self.last_rx = self.created
        self.last_ping = self.created
        self.ping_seq = itertools.count(1)
        self.sched_token = None    # the live timer-heap entry
        self.want_at: Optional[float] = None
        self.terminated = False    # aioquic reached TERMINATED / we dropped it
        self.terminated_event = threading.Event()

    # -- helpers used by streams (lock held) --

    @property
    def usable(self) -> bool:
        return self.state == READY and not self.quic.state_closed

    def describe(self) -> str:
        return f"{'to' if self.is_client else 'from'} {self.peer.b64()}"

    def __repr__(self) -> str:
        return f"<Conn {self.describe()} {self.state}>"


class Driver:
    """Runs every QUIC connection of one PacketConn. Shared by the Listener and the
    Dialers built on that PacketConn (see `acquire`)."""

    _registry: dict[int, "Driver"] = {}
    _registry_lock = threading.Lock()

    @classmethod
    def acquire(cls, pc, private_key: PrivateKey) -> "Driver":
        """The driver of `pc` (created on first use); balance with `release()`."""
        with cls._registry_lock:
            d = cls._registry.get(id(pc))
            if d is None or d.pc is not pc or d.stopped:
                d = cls(pc, private_key)
                cls._registry[id(pc)] = d
            elif d.private_key != private_key:
                raise ValueError("this PacketConn is already used with another private key")
            d.refs += 1
            return d

    def release(self) -> None:
        with Driver._registry_lock:
            self.refs -= 1
            last = self.refs <= 0
            if last and Driver._registry.get(id(self.pc)) is self:
                del Driver._registry[id(self.pc)]
        if last:
            self.shutdown()

    def __init__(self, pc, private_key: PrivateKey) -> None:
        self.pc = pc
        self.private_key = private_key
        self.local: PublicKey = pc.local_addr()
        if private_key.public_key != self.local:
            raise ValueError("the private key does not match the PacketConn's address")
        self.lock = threading.Lock()
        self.refs = 0
        self.routes: dict[tuple[PublicKey, bytes], Conn] = {}
        self.conns: set[Conn] = set()
        self.heap: list = []
        self.seq = itertools.count()
        self.listener = None  # the Listener accepting on this PacketConn, if any
        self.armed: Optional[float] = None  # the read deadline we set (monotonic), None = none
        self.stopped = False
        self.dead: Optional[BaseException] = None  # why the receive thread stopped on its own
        self.drained = threading.Condition(self.lock)  # notified when a conn's sends complete
        self.drain_waiters = 0
        self.thread = threading.Thread(target=self._run, name=f"derpquic-rx-{self.local.b64()[:8]}",
                                       daemon=True)
        self.thread.start()
        self.link_ups = 0  # relay reconnects seen (each probes every connection at once)
        if hasattr(pc, "add_event_listener"):
            pc.add_event_listener(self._on_link_event)

    def _on_link_event(self, ev: object) -> None:
        """The relay link is back after an outage: probe every connection now rather
        than wait out a PTO that backed off exponentially while packets were dropped."""
        if not isinstance(ev, LinkUp) or ev.generation <= 1:
            return
        with self.lock:
            if self.stopped:
                return
            self.link_ups += 1
            now = time.monotonic()
            for conn in list(self.conns):
                if conn.terminated or conn.quic.state_closed:
                    continue
                probe_now(conn.quic, next(conn.ping_seq))
                self.flush(conn, now)

    # ------------------------------------------------------------------ connections

    def connect(self, peer: PublicKey, *, owner, opts: Options, allow_unauthenticated: bool) -> Conn:
        """Start a client connection (lock held by the caller)."""
        secrets = auth.SecretsCollector()
        cfg = opts.quic_configuration(is_client=True, alpn=[ALPN_AUTH], secrets_log_file=secrets)
        quic = DerpQuicConnection(configuration=cfg, max_streams_bidi=opts.max_streams, ack_delay=opts.ack_delay)
        conn = Conn(self, quic, peer, is_client=True, owner=owner, opts=opts, secrets=secrets,
                    allow_unauthenticated=allow_unauthenticated)
        now = time.monotonic()
        quic.connect(peer, now)
        self._add_route(conn, quic.host_cid)
        self.conns.add(conn)
        self._process(conn, now)
        return conn

    def _accept_conn(self, peer: PublicKey, header, now: float) -> Optional[Conn]:
        listener = self.listener
        if listener is None or listener.closed:
            return None
        opts = listener.opts
        secrets = auth.SecretsCollector()
        cfg = opts.quic_configuration(is_client=False, secrets_log_file=secrets)
        quic = DerpQuicConnection(configuration=cfg, original_destination_connection_id=header.destination_cid,
                                  max_streams_bidi=opts.max_streams, ack_delay=opts.ack_delay)
        quic.optional_alpn = [ALPN_AUTH]
        conn = Conn(self, quic, peer, is_client=False, owner=listener, opts=opts, secrets=secrets,
                    require_auth=listener.require_auth, allow=listener.allow)
        self._add_route(conn, header.destination_cid)
        self._add_route(conn, quic.host_cid)
        self.conns.add(conn)
        listener._conns.add(conn)
        return conn

    def _add_route(self, conn: Conn, cid: bytes) -> None:
        self.routes[(conn.peer, cid)] = conn
        conn.cids.add(cid)

    def _drop_conn(self, conn: Conn) -> None:
        for cid in conn.cids:
            if self.routes.get((conn.peer, cid)) is conn:
                del self.routes[(conn.peer, cid)]
        conn.cids.clear()
        self.conns.discard(conn)
        conn.terminated = True
        conn.terminated_event.set()
        conn.sched_token = None

    def close_conn(self, conn: Conn, error: BaseException, *, code: int = ERR_CLOSED, reason: str = "") -> None:
        """Close a connection now (lock held): CONNECTION_CLOSE to the peer, `error` to every user."""
        if not conn.quic.state_closed:
            conn.quic.close(error_code=code, reason_phrase=reason)
        self._fail(conn, error)
        self._process(conn, time.monotonic())

    def _fail(self, conn: Conn, error: BaseException) -> None:
        """Mark the connection unusable and wake everybody waiting on it (lock held)."""
        if conn.state == CLOSED:
            return
        conn.state = CLOSED
        conn.error = error
        conn.cond.notify_all()
        for s in list(conn.streams.values()):
            s._on_conn_error(error)
        for s in conn.pending_streams:
            s._on_conn_error(error)
        conn.pending_streams.clear()
        conn.blocked_writers.clear()
        try:
            conn.owner._conn_closed(conn)
        except Exception:  # pragma: no cover
            log.exception("derpquic: owner hook failed")
        self.drained.notify_all()

    # ------------------------------------------------------------------ receive thread

    def _run(self) -> None:
        pc = self.pc
        try:
            while True:
                data = addr = None
                try:
                    data, addr = pc.read_from(65536)
                except TimeoutError:
                    pass
                except OSError as e:
                    with self.lock:
                        if not self.stopped:
                            log.warning("derpquic: packet connection failed: %s", e)
                            self.dead = ConnectionAbortedError(f"the relay connection is gone: {e}")
                            self._fail_all(self.dead)
                            self.stopped = True
                            if self.listener is not None:
                                self.listener._accept_cond.notify_all()
                    return
                with self.lock:
                    if self.stopped:
                        return
                    now = time.monotonic()
                    if data is not None:
                        try:
                            self._datagram(data, addr, now)
                        except Exception:  # never let one bad packet kill the thread
                            log.exception("derpquic: error handling a datagram from %s", addr)
                    self._run_timers(time.monotonic())
                    self._arm()
        except BaseException:  # pragma: no cover - a bug: make it visible, fail everything
            log.exception("derpquic: receive thread crashed")
            with self.lock:
                self._fail_all(ConnectionAbortedError("derpquic receive thread crashed"))
                self.stopped = True
            raise

    def _datagram(self, data: bytes, addr, now: float) -> None:
        peer = addr if type(addr) is PublicKey else PublicKey.coerce(addr)
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except ValueError:
            return
        conn = self.routes.get((peer, header.destination_cid))
        if conn is None:
            listener = self.listener
            if listener is None or listener.closed:
                return
            supported = listener.supported_versions
            if (header.packet_type != QuicPacketType.VERSION_NEGOTIATION and header.version is not None
                    and header.version not in supported and len(data) >= MIN_INITIAL_SIZE):
                self._write(encode_quic_version_negotiation(
                    source_cid=header.destination_cid, destination_cid=header.source_cid,
                    supported_versions=supported), peer)
                return
            if header.packet_type != QuicPacketType.INITIAL or len(data) < MIN_INITIAL_SIZE:
                return
            conn = self._accept_conn(peer, header, now)
            if conn is None:
                return
            conn.quic.receive_datagram(data, peer, now)
            conn.received_any = True
            conn.last_rx = now
            if conn.allow is not None and peer not in conn.allow:
                # Refused at the end of the handshake: only then does CONNECTION_CLOSE carry
                # our application error code (before it, QUIC turns it into a bare 0xc).
                conn.refuse = True
            self._process(conn, now)
            return
        if conn.terminated:
            return
        conn.quic.receive_datagram(data, peer, now)
        conn.received_any = True
        conn.last_rx = now
        self._process(conn, now)

    def _write(self, data: bytes, addr: PublicKey) -> None:
        try:
            self.pc.write_to(data, addr)
        except (OSError, ValueError) as e:
            # Closed or broken PacketConn: the connection times out / is failed by the reader.
            log.debug("derpquic: write_to %s failed: %s", addr.b64(), e)

    # ------------------------------------------------------------------ processing

    def _process(self, conn: Conn, now: float) -> None:
        """Handle the connection's events, flush its packets, reschedule its timer (lock held)."""
        quic = conn.quic
        while True:
            ev = quic.next_event()
            if ev is None:
                break
            try:
                self._event(conn, ev, now)
            except AuthenticationError as e:
                log.warning("derpquic: %s: %s", conn.describe(), e)
                self.close_conn(conn, e, code=ERR_AUTH_FAILED, reason="authentication failed")
                return
        if conn.quic.new_peer_streams:
            ids, conn.quic.new_peer_streams = conn.quic.new_peer_streams, []
            for sid in ids:
                self._peer_stream(conn, sid)
        if conn.state != CLOSED and quic.close_event is not None:
            self._fail(conn, self._close_error(conn, quic.close_event))
        self.flush(conn, now)

    def flush(self, conn: Conn, now: Optional[float] = None) -> None:
        """Send what aioquic has to send; wake writers that have room; reschedule (lock held)."""
        if conn.terminated:
            return
        if now is None:
            now = time.monotonic()
        quic = conn.quic
        if conn.state == READY or conn.state == AUTH:
            self._grant_connection(conn)
        for data, addr in quic.datagrams_to_send(now):
            self._write(data, addr)
        if conn.upgrade_size:
            set_max_datagram_size(quic, conn.upgrade_size)
            conn.upgrade_size = 0
        if conn.zombies:
            # Forget streams the application closed once aioquic has discarded them too
            # (then no event can name them again).
            for s in list(conn.zombies):
                if quic.stream(s.stream_id) is None:
                    conn.zombies.discard(s)
                    if conn.streams.get(s.stream_id) is s:
                        del conn.streams[s.stream_id]
        if conn.blocked_writers:
            for s in list(conn.blocked_writers):
                if s._writer_may_proceed():
                    conn.blocked_writers.discard(s)
                    s._cond.notify_all()
        if self.drain_waiters:
            self.drained.notify_all()
        self._reschedule(conn, now)

    def _grant_connection(self, conn: Conn) -> None:
        used, value = conn.quic.connection_receive_window()
        window = conn.opts.connection_window
        target = used - conn.unread + window
        if target - value >= window // 4:
            conn.quic.grant_connection(target)

    def _close_error(self, conn: Conn, ev: events.ConnectionTerminated) -> BaseException:
        if conn.error is not None:
            return conn.error
        who = conn.peer.b64()
        reason = ev.reason_phrase or ""
        if ev.reason_phrase == "Idle timeout" and ev.frame_type == 0 and not conn.received_any:
            return TimeoutError(f"no answer from {who}")
        if ev.reason_phrase == "Idle timeout":
            return ConnectionAbortedError(
                f"connection {conn.describe()} timed out: nothing heard for {conn.quic._idle_timeout():.0f} s")
        if ev.frame_type is None:  # application close by the peer
            if ev.error_code == ERR_NOT_ALLOWED:
                return ConnectionRefusedError(f"{who} refused the connection: our key is not in its allow-list")
            if ev.error_code == ERR_AUTH_REQUIRED:
                return AuthenticationError(f"{who} requires peers to prove their key ({reason})")
            if ev.error_code == ERR_AUTH_FAILED:
                return AuthenticationError(f"{who} rejected our key proof ({reason})")
            return ConnectionResetError(f"{who} closed the connection" + (f": {reason}" if reason else ""))
        if ev.error_code == 0xC and conn.state in (HANDSHAKE, AUTH):  # APPLICATION_ERROR in the handshake
            return ConnectionRefusedError(f"{who} refused the connection during the handshake")
        return ConnectionResetError(
            f"connection {conn.describe()} closed: QUIC error 0x{ev.error_code:x}" + (f" ({reason})" if reason else ""))

    def _event(self, conn: Conn, ev, now: float) -> None:
        t = type(ev)
        if t is events.StreamDataReceived:
            sid = ev.stream_id
            s = conn.streams.get(sid)
            if s is not None:
                s._on_data(ev.data, ev.end_stream)
            elif sid == conn.peer_auth_stream and conn.ours:
                self._proof_data(conn, ev.data, ev.end_stream)
            elif sid % 4 < 2 and (sid % 2 == 1) == conn.is_client:  # a peer-opened bidi stream
                s = self._peer_stream(conn, sid)
                if s is not None:
                    s._on_data(ev.data, ev.end_stream)
            # else: data we do not want (an unexpected stream): already counted, dropped
        elif t is events.StreamReset:
            s = conn.streams.get(ev.stream_id)
            if s is None and ev.stream_id % 4 < 2 and (ev.stream_id % 2 == 1) == conn.is_client:
                s = self._peer_stream(conn, ev.stream_id)
            if s is not None:
                s._on_reset(ev.error_code)
        elif t is events.StopSendingReceived:
            s = conn.streams.get(ev.stream_id)
            if s is not None:
                s._on_stop_sending(ev.error_code)
        elif t is events.HandshakeCompleted:
            self._handshake_done(conn, ev, now)
        elif t is events.ConnectionIdIssued:
            self._add_route(conn, ev.connection_id)
        elif t is events.ConnectionIdRetired:
            if self.routes.get((conn.peer, ev.connection_id)) is conn:
                del self.routes[(conn.peer, ev.connection_id)]
            conn.cids.discard(ev.connection_id)
        elif t is events.ConnectionTerminated:
            self._fail(conn, self._close_error(conn, ev))
            self._drop_conn(conn)
        # PingAcknowledged, ProtocolNegotiated, DatagramFrameReceived: nothing to do

    def _peer_stream(self, conn: Conn, sid: int) -> Optional["Stream"]:
        """A stream the peer opened (lock held): a Stream for the listener, or a refusal."""
        s = conn.streams.get(sid)
        if s is not None:
            return s
        if sid % 4 >= 2:
            return None  # unidirectional: handled (or ignored) by _event
        from .stream import Stream
        if conn.is_client or conn.state == CLOSED:
            # Our dialled connections do not accept streams from the listener side.
            if sid not in conn.refused:
                conn.refused.add(sid)
                self._refuse_stream(conn, sid)
            return None
        s = Stream(conn, sid)
        conn.streams[sid] = s
        conn.open_streams += 1
        if conn.state == READY:
            conn.owner._enqueue(s)
        else:
            conn.pending_streams.append(s)
        return s

    def _refuse_stream(self, conn: Conn, sid: int) -> None:
        try:
            conn.quic.stop_stream(sid, ERR_STREAM_REFUSED)
            conn.quic.reset_stream(sid, ERR_STREAM_REFUSED)
        except (ValueError, RuntimeError):
            pass

    # ------------------------------------------------------------------ handshake & auth

    def _handshake_done(self, conn: Conn, ev: events.HandshakeCompleted, now: float) -> None:
        conn.ours = ev.alpn_protocol == ALPN_AUTH
        if conn.refuse:
            log.info("derpquic: refusing %s: not in the allow-list", conn.peer.b64())
            self.close_conn(conn, ConnectionRefusedError("peer not allowed"), code=ERR_NOT_ALLOWED,
                            reason="not allowed")
            return
        if conn.ours:
            # Our peer: bigger packets (bounded by what it says it can read and by DERP).
            params = peer_transport_parameters(conn.quic)
            peer_max = (params.max_udp_payload_size if params is not None and params.max_udp_payload_size
                        else 65527)
            size = min(conn.opts.max_datagram_size, peer_max, MAX_PACKETCONN_DATAGRAM)
            if size > GO_PACKET_SIZE:
                # Applied after the next flush: the client's Finished flight may still hold an
                # Initial packet, and aioquic pads such datagrams to the full size (64 KiB of
                # padding, which the peer then parses byte by byte).
                conn.upgrade_size = size
            conn.state = AUTH
            if conn.is_client:
                self._send_proof(conn)  # the server answers with its own proof once ours verifies
            self._check_proof(conn)
            return
        # A peer without our ALPN: a Go derpconnect (or anything else) that cannot prove its key.
        if conn.is_client:
            if conn.allow_unauthenticated:
                self._ready(conn)
            else:
                self.close_conn(conn, AuthenticationError(
                    f"{conn.peer.b64()} did not prove that it holds its key (it does not speak derpnet-auth: "
                    f"a Go derpconnect peer?); pass allow_unauthenticated=True to accept such peers"),
                    code=ERR_AUTH_REQUIRED, reason="authentication required")
        else:
            if conn.require_auth or conn.allow is not None:
                log.info("derpquic: refusing unauthenticated peer %s (require_auth/allow)", conn.peer.b64())
                self.close_conn(conn, AuthenticationError(f"{conn.peer.b64()} cannot prove its key"),
                                code=ERR_AUTH_REQUIRED, reason="authentication required")
            else:
                self._ready(conn)

    def _send_proof(self, conn: Conn) -> None:
        if conn.proof_sent:
            return
        proof = auth.make_proof(self.private_key, conn.peer, is_client=conn.is_client,
                                binding=conn.secrets.binding())
        sid = conn.quic.get_next_available_stream_id(is_unidirectional=True)
        conn.quic.send_stream_data(sid, proof, end_stream=True)
        conn.proof_sent = True

    def _proof_data(self, conn: Conn, data: bytes, end: bool) -> None:
        if conn.proof_in_done:
            return
        conn.proof_in += data
        if len(conn.proof_in) > auth.PROOF_MESSAGE_LEN:
            raise AuthenticationError(f"{conn.peer.b64()} sent an oversized key proof")
        if end:
            conn.proof_in_done = True
            self._check_proof(conn)

    def _check_proof(self, conn: Conn) -> None:
        if conn.state != AUTH or not conn.proof_in_done:
            return
        auth.verify_proof(self.private_key, conn.peer, bytes(conn.proof_in), peer_is_client=not conn.is_client,
                          binding=conn.secrets.binding())  # raises AuthenticationError
        conn.authenticated = True
        if not conn.is_client:
            if conn.allow is not None and conn.peer not in conn.allow:
                log.info("derpquic: refusing %s: proved its key but is not in the allow-list", conn.peer.b64())
                self.close_conn(conn, ConnectionRefusedError("peer not allowed"), code=ERR_NOT_ALLOWED,
                                reason="not allowed")
                return
            self._send_proof(conn)
        self._ready(conn)

    def _ready(self, conn: Conn) -> None:
        conn.state = READY
        conn.cond.notify_all()
        pending, conn.pending_streams = conn.pending_streams, []
        for s in pending:
            if not s._closed:
                conn.owner._enqueue(s)
        try:
            conn.owner._conn_ready(conn)
        except Exception:  # pragma: no cover
            log.exception("derpquic: owner hook failed")

    # ------------------------------------------------------------------ timers

    def _reschedule(self, conn: Conn, now: float) -> None:
        if conn.terminated:
            return
        t = conn.quic.get_timer()
        if not conn.is_client and conn.state in (HANDSHAKE, AUTH):
            # A peer that never finishes the handshake or never proves its key must not
            # hold the connection (and the unread data of its pending streams) forever.
            d = conn.created + conn.opts.dial_timeout
            t = d if t is None else min(t, d)
        if conn.open_streams > 0 and conn.state == READY:
            k = max(conn.last_rx, conn.last_ping) + conn.opts.keepalive_interval
            t = k if t is None else min(t, k)
        conn.want_at = t
        if t is None:
            return
        live = conn.sched_token
        if live is None or t < live[0]:
            entry = (t, next(self.seq))
            conn.sched_token = entry
            heapq.heappush(self.heap, (t, entry[1], conn))
            if self.armed is None or t < self.armed:
                self._arm()

    def _run_timers(self, now: float) -> None:
        heap = self.heap
        while heap and heap[0][0] <= now:
            t, seq, conn = heapq.heappop(heap)
            token = conn.sched_token
            if token is None or token[1] != seq or conn.terminated:
                continue  # superseded by an earlier entry, or the connection is gone
            conn.sched_token = None
            want = conn.want_at
            if want is None:
                continue
            if want > now:
                self._reschedule(conn, now)
                continue
            try:
                self._fire(conn, now)
            except Exception:
                log.exception("derpquic: timer of %s failed", conn)
                self._fail(conn, ConnectionAbortedError("internal error in the QUIC timer"))
                self._drop_conn(conn)

    def _fire(self, conn: Conn, now: float) -> None:
        quic = conn.quic
        if (not conn.is_client and conn.state in (HANDSHAKE, AUTH)
                and now >= conn.created + conn.opts.dial_timeout):
            log.info("derpquic: refusing %s: no handshake and key proof within %g s", conn.peer.b64(),
                     conn.opts.dial_timeout)
            self.close_conn(conn, TimeoutError(f"{conn.peer.b64()} did not complete the handshake and key "
                                               f"proof within {conn.opts.dial_timeout:g} s"),
                            code=ERR_AUTH_REQUIRED, reason="authentication timed out")
            return
        qt = quic.get_timer()
        if qt is not None and qt <= now:
            quic.handle_timer(now)
        if (conn.open_streams > 0 and conn.state == READY
                and now >= max(conn.last_rx, conn.last_ping) + conn.opts.keepalive_interval):
            quic.send_ping(next(conn.ping_seq))
            conn.last_ping = now
        self._process(conn, now)

    def _arm(self) -> None:
        """Set the PacketConn's read deadline to the earliest timer (lock held)."""
        heap = self.heap
        while heap and (heap[0][2].sched_token is None or heap[0][2].sched_token[1] != heap[0][1]):
            heapq.heappop(heap)  # drop superseded entries from the top
        t = heap[0][0] if heap else None
        if t == self.armed:
            return
        self.armed = t
        try:
            self.pc.set_read_deadline(None if t is None else time.time() + (t - time.monotonic()))
        except (OSError, ValueError):
            pass

    # ------------------------------------------------------------------ shutdown

    def _fail_all(self, error: BaseException) -> None:
        for conn in list(self.conns):
            self._fail(conn, error)
            self._drop_conn(conn)

    def close_conns(self, conns, error: BaseException, *, linger: float) -> None:
        """Close `conns` (lock NOT held): first wait up to `linger` seconds for the data of
        streams the application already closed to be acknowledged, then CONNECTION_CLOSE."""
        deadline = time.monotonic() + linger
        with self.lock:
            conns = [c for c in conns if not c.terminated]
            while True:
                busy = [c for c in conns if c.state in (READY, AUTH)
                        and any(s._lingering() for s in c.streams.values())]
                left = deadline - time.monotonic()
                if not busy or left <= 0 or self.stopped:
                    break
                self.drain_waiters += 1
                try:
                    self.drained.wait(left)
                finally:
                    self.drain_waiters -= 1
            for c in conns:
                if not c.terminated:
                    # Stays routed while aioquic repeats CONNECTION_CLOSE (3 PTO) if the
                    # driver keeps running for someone else.
                    self.close_conn(c, error, code=ERR_CLOSED, reason="closed")

    def shutdown(self) -> None:
        """Stop the receive thread (after the last user released the driver)."""
        with self.lock:
            if self.stopped:
                return
            for conn in list(self.conns):
                if not conn.quic.state_closed:
                    conn.quic.close(error_code=ERR_CLOSED, reason_phrase="closed")
                self._fail(conn, ConnectionAbortedError("closed locally"))
                for data, addr in conn.quic.datagrams_to_send(time.monotonic()):
                    self._write(data, addr)
                self._drop_conn(conn)
            self.stopped = True
            self.heap.clear()
        if hasattr(self.pc, "remove_event_listener"):
            self.pc.remove_event_listener(self._on_link_event)
        try:
            self.pc.set_read_deadline(time.time() - 1)  # wake the receive thread
        except (OSError, ValueError):
            pass
        if threading.current_thread() is not self.thread:
            self.thread.join(5)
        try:
            self.pc.set_read_deadline(None)
        except (OSError, ValueError):
            pass
