"""One relay connection as an asyncio Protocol: (TLS,) HTTP request head, DERP hello, frames.

All byte layouts come from the sans-IO modules (`ServerConnection`, `frames`, `tls`);
this class only moves bytes, runs the timers and owns the per-client send queues:

- two bounded queues of (source key, payload): disco packets and the rest,
  `queue_depth` each (32, like derper), drop-oldest when full, so a sender never waits;
- control frames (PeerGone, one pending Pong, KeepAlive), written behind the packets
  of the same batch;
- a flush scheduled once per event-loop turn (`call_soon`) writes everything queued as
  one `transport.write` of up to 128 KiB: frames that arrive together leave together,
  and the flush happens whenever the queues momentarily empty. A queue that fills up
  within one turn (a fast sender's read holds thousands of packets) is drained into
  the transport at once, as derper's concurrent send loop would;
- flow control: when the transport's buffer passes its high-water mark asyncio calls
  `pause_writing`; we stop draining (queues then drop oldest) and start the write
  timeout. If `resume_writing` does not come within `write_timeout` seconds the client
  is dropped. This is derper's per-frame 2 s write deadline in flow-control terms; it
  bounds a non-reading client's memory to the socket buffers, one high-water mark of
  transport buffer, one batch and its two queues.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import struct
from collections import deque
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional, Set, Tuple

from .. import frames as F
from ..connection import ClientHello, HttpRequest, ServerConnection, UpgradeRequest
from ..errors import DerpError, LocalProtocolError
from ..keys import PublicKey
from . import http_routes
from .relay import looks_like_disco
from .tls import TLSSession

if TYPE_CHECKING:  # pragma: no cover
    from .server import RelayServer

__all__ = ["ClientProtocol"]

log = logging.getLogger(__name__)

_BATCH_BYTES = 128 << 10  # frames joined into one transport.write
_PEER_GONE_QUEUE = 1024   # pending PeerGone frames per client (bounded like everything else)


def _tune_socket(sock: Any) -> None:
    """TCP_NODELAY, and derper's TCP keep-alive (10 min) + 15 s user timeout where available."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    opts = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1), (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", 600), ("TCP_KEEPINTVL", 60), ("TCP_USER_TIMEOUT", 15000)):
        if hasattr(socket, name):
            opts.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    for level, opt, value in opts:
        try:
            sock.setsockopt(level, opt, value)
        except OSError:  # pragma: no cover - platform dependent
            pass


def _reset_on_close(transport: Optional[asyncio.BaseTransport]) -> None:
    """Make the coming close a TCP reset (SO_LINGER 0): the kernel drops what it still holds.

    A client dropped for not reading has a full socket send buffer (autotuned towards
    tcp_wmem's maximum, 4 MiB on Linux; 2.7 MiB measured) in front of our FIN. A plain
    close leaves that buffer to an orphaned socket that probes the zero window until the
    kernel gives up (~15 s measured), so cycling non-readers pin several times more kernel
    memory than while connected; and the client, reading nothing, never sees the end.
    """
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:  # pragma: no cover - already closed
        pass


def _fmt_addr(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = addr[0]
        return f"[{host}]:{addr[1]}" if ":" in str(host) else f"{host}:{addr[1]}"
    return str(addr)


class ClientProtocol(asyncio.Protocol):
    """Serves one accepted TCP/TLS connection for a RelayServer."""

    __slots__ = ("server", "relay", "options", "loop", "conn_id", "transport", "peer", "key", "info", "is_dup",
                 "preferred", "ideal_node", "fast_start", "closed", "registered", "_proto", "_timer",
                 "_write_timer", "_ka_timer", "_ka_period", "_pkts", "_disco", "_ctrl", "_out", "_out_size",
                 "_out_packets", "_out_payload", "_pong", "_keepalive_due", "_paused", "_flush_pending",
                 "_saw_src", "_not_here_tokens", "_not_here_at", "_tls", "__weakref__")

    def __init__(self, server: "RelayServer") -> None:
        self.server = server
        self.relay = server.relay
        self.options = server.options
        self.loop = server.loop
        self.conn_id = server.next_conn_id()
        self.transport: Optional[asyncio.Transport] = None
        self.peer = "?"
        self.key: Optional[PublicKey] = None
        self.info: Dict[str, Any] = {}
        self.is_dup = False
        self.preferred = False
        self.ideal_node: Optional[str] = None
        self.fast_start = False
        self.closed = False
        self.registered = False
        # Both created on the first bytes, so abandoned sockets stay small.
        self._proto: Optional[ServerConnection] = None
        self._tls: Optional[TLSSession] = None
        self._timer: Optional[asyncio.TimerHandle] = None  # handshake deadline
        self._write_timer: Optional[asyncio.TimerHandle] = None
        self._ka_timer: Optional[asyncio.TimerHandle] = None
        self._ka_period = 0.0
        # Created at registration, so abandoned connections stay small.
        self._pkts: Optional[Deque[Tuple[PublicKey, bytes]]] = None
        self._disco: Optional[Deque[Tuple[PublicKey, bytes]]] = None
        self._ctrl: Deque[bytes] = deque()
        self._out: List[bytes] = []  # encoded frames of the batch being built
        self._out_size = self._out_packets = self._out_payload = 0
        self._pong: Optional[bytes] = None
        self._keepalive_due = False
        self._paused = False
        self._flush_pending = False
        self._saw_src: Set[PublicKey] = set()
        self._not_here_tokens = 0.0
        self._not_here_at = 0.0

    def __repr__(self) -> str:
        who = self.key.short() if self.key else "-"
        return f"<ClientProtocol #{self.conn_id} {who} from {self.peer}>"

    @property
    def name(self) -> str:
        """Key and address for log lines."""
        return f"{self.key.short()} ({self.peer})" if self.key else self.peer

    # ------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = _fmt_addr(transport.get_extra_info("peername"))
        _tune_socket(transport.get_extra_info("socket"))
        transport.set_write_buffer_limits(high=self.options.write_buffer_limit)
        self.server.connection_opened(self)
        t = self.options.handshake_timeout
        self._timer = self.loop.call_later(t, self._handshake_timed_out, "HTTP request", t)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        ctx = self.server.ssl_context
        if ctx is not None:
            tls = self._tls
            if tls is None:
                tls = self._tls = TLSSession(ctx)
            try:
                data = tls.receive(data)
            except ssl.SSLError as e:
                self.server.tls_errors += 1
                self.abort(f"TLS: {e.reason or e}", level=logging.DEBUG)  # scanners, plain HTTP on the TLS port
                return
            out = tls.pending()
            if out:
                self.transport.write(out)  # type: ignore[union-attr]
            if data:
                self._on_plaintext(data)
            if tls.closed_by_peer and not self.closed:
                log.debug("relay: %s closed TLS (close_notify)", self.name)
                self._finish()  # answers with our close_notify
            return
        self._on_plaintext(data)

    def _on_plaintext(self, data: bytes) -> None:
        proto = self._proto
        if proto is None:
            proto = self._proto = ServerConnection(self.server.private_key)
        try:
            for ev in proto.receive_data(data):
                self._dispatch(ev)
                if self.closed:
                    return
        except LocalProtocolError:
            pass  # data after we finished (e.g. behind an HTTP request): ignore
        except DerpError as e:
            self.server.protocol_errors += 1
            self.abort(f"protocol error: {e}")
        except Exception:  # a bug here, not client misbehaviour: keep the traceback
            log.warning("relay: internal error serving %s; closing it", self.name, exc_info=True)
            self.abort("internal error", level=logging.DEBUG)

    def eof_received(self) -> Optional[bool]:
        return False  # half-close ends the connection, as in derper

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if not self.closed and self.registered:
            log.debug("relay: client %s disconnected%s", self.name, f": {exc}" if exc else "")
        self._shutdown()
        if self._write_timer is not None:  # armed by _finish()
            self._write_timer.cancel()
            self._write_timer = None
        self.server.connection_closed(self)

    def pause_writing(self) -> None:
        self._paused = True
        t = self.options.write_timeout
        if t and self._write_timer is None and not self.closed:
            self._write_timer = self.loop.call_later(t, self._write_timed_out)

    def resume_writing(self) -> None:
        self._paused = False
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        self._schedule_flush()

    # ------------------------------------------------------------ closing

    def abort(self, reason: str, level: int = logging.INFO) -> None:
        """Drop the connection now (protocol error, timeout, server shutdown)."""
        if self.closed:
            return
        log.log(level, "relay: closing %s: %s", self.name, reason)
        self._shutdown()
        if self.transport is not None:
            self.transport.abort()

    def close(self, reason: str) -> None:
        """The relay asks us to go (mesh ClosePeer, server shutdown)."""
        self.abort(reason, level=logging.DEBUG)

    def _send(self, data: bytes) -> None:
        """Write protocol bytes (encrypted when serving TLS)."""
        if self._tls is not None:
            data = self._tls.encrypt(data)
        self.transport.write(data)  # type: ignore[union-attr]

    def _finish(self) -> None:
        """Close after the pending bytes (an HTTP response) are written; abort if they never are."""
        self._shutdown()
        assert self.transport is not None
        if self._tls is not None:
            self.transport.write(self._tls.close_notify())
        self.transport.close()
        if self.transport.get_write_buffer_size() and self.options.write_timeout:
            self._write_timer = self.loop.call_later(self.options.write_timeout, self.transport.abort)

    def _shutdown(self) -> None:
        """Leave the relay and stop the timers (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self._proto = None
        for t in (self._timer, self._ka_timer, self._write_timer):
            if t is not None:
                t.cancel()
        self._timer = self._ka_timer = self._write_timer = None
        if self.registered:
            self.registered = False
            relay = self.relay
            relay.unregister(self)
            for src in self._saw_src:
                relay.unwatch(src, self)
            self._saw_src.clear()
            queued = len(self._pkts or ()) + len(self._disco or ()) + self._out_packets
            if queued:
                relay.drop("gone_disconnected", queued)
            self._pkts = self._disco = None
            self._ctrl.clear()
            self._out.clear()
            self._out_size = self._out_packets = self._out_payload = 0

    def _handshake_timed_out(self, what: str, seconds: float) -> None:
        # DEBUG, not INFO: abandoned connections (scanners, dead NATs) are routine.
        self._timer = None
        if self.server.ssl_context is not None and (self._tls is None or not self._tls.handshake_done):
            what = "TLS handshake"
        self.server.handshake_timeouts += 1
        self.abort(f"no {what} within {seconds:g}s", level=logging.DEBUG)

    def _write_timed_out(self) -> None:
        self._write_timer = None
        self.server.write_timeouts += 1
        _reset_on_close(self.transport)
        self.abort(f"write timeout ({self.options.write_timeout:g}s): client is not reading")

    # ------------------------------------------------------------ incoming events

    def _dispatch(self, ev: object) -> None:
        t = type(ev)
        if self.registered:
            if self.is_dup:
                self.relay.note_activity(self)
            if t is F.SendPacket:
                self._on_send_packet(ev)  # type: ignore[arg-type]
            elif t is F.Ping:
                self.relay.pings += 1
                if self._pong is None:  # one-slot pong queue: faster pings are ignored
                    self._pong = ev.data  # type: ignore[attr-defined]
                    self._schedule_flush()
            elif t is F.NotePreferred:
                self.preferred = ev.preferred  # type: ignore[attr-defined]
            elif t in (F.ForwardPacket, F.WatchConns, F.ClosePeer):
                self.abort(f"{t.__name__} frame from a non-mesh client: insufficient permissions")
            # Pong and unknown frames are skipped.
        elif t is ClientHello:
            self._on_hello(ev)  # type: ignore[arg-type]
        elif t is UpgradeRequest:
            self._on_upgrade(ev)  # type: ignore[arg-type]
        elif t is HttpRequest:
            self._on_http(ev)  # type: ignore[arg-type]

    def _on_http(self, ev: HttpRequest) -> None:
        req = ev.request
        status, response = http_routes.respond(req)
        self.server.http_requests += 1
        log.debug("relay: %s %s %s -> %d", self.peer, req.method, req.target[:100], status)
        self._send(response)
        self._finish()

    def _on_upgrade(self, ev: UpgradeRequest) -> None:
        req = ev.request
        assert self._proto is not None and self.transport is not None
        if (req.get("Upgrade") or "").lower() == "websocket" and "derp" in (req.get("Sec-WebSocket-Protocol") or ""):
            # derper speaks DERP inside WebSocket messages here; we only do raw DERP.
            self._send(http_routes.websocket_not_supported(req)[1])
            self._finish()
            return
        self.ideal_node = req.get("Ideal-Node") or None
        self.fast_start = ev.fast_start
        # Like derper, send the ServerKey before judging bytes pipelined behind the request
        # (a fast-start ClientInfo, or garbage): take them out of the decoder, switch, re-feed.
        pipelined = self._proto.decoder.take_buffered()
        out, events = self._proto.accept_upgrade(ev.fast_start)
        self._send(out)
        if pipelined:
            events = events + self._proto.receive_data(pipelined)
        if self._timer is not None:
            self._timer.cancel()
        t = self.options.client_info_timeout
        self._timer = self.loop.call_later(t, self._handshake_timed_out, "ClientInfo", t)
        for e in events:
            self._dispatch(e)
            if self.closed:
                return

    def _on_hello(self, ev: ClientHello) -> None:
        assert self._proto is not None and self.transport is not None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.key = ev.key
        self.info = ev.info
        self._send(self._proto.accept())  # ServerInfo: the first frame after ServerKey
        depth = self.options.queue_depth
        self._pkts = deque(maxlen=depth)
        self._disco = deque(maxlen=depth)
        self._not_here_tokens = float(self.options.not_here_burst)
        self._not_here_at = self.loop.time()
        self.registered = True
        self.relay.register(self)
        interval = self.options.keepalive_interval
        if interval and interval > 0:
            self._ka_period = interval + random.uniform(0, interval / 12)  # 60 s + [0, 5 s)
            self._ka_timer = self.loop.call_later(self._ka_period, self._keepalive_tick)
        log.debug("relay: client %s connected (%s)%s", self.name, "fast start" if self.fast_start else "101",
                  " [duplicate key]" if self.is_dup else "")

    def _on_send_packet(self, ev: F.SendPacket) -> None:
        relay = self.relay
        data = ev.data
        relay.packets_received += 1
        relay.bytes_received += len(data)
        dst, n = relay.lookup(ev.dst)
        if dst is None:
            if n > 1:
                relay.drop("dup_client")
                return
            relay.drop("unknown_dest")
            if looks_like_disco(data):
                self._maybe_not_here(ev.dst)
            return
        assert self.key is not None
        dst.enqueue_packet(self.key, data)

    def _maybe_not_here(self, dst: PublicKey) -> None:
        """PeerGone(NotHere) for a disco packet to an unknown key, at most 1/s with a burst of 3."""
        now = self.loop.time()
        opts = self.options
        self._not_here_tokens = min(float(opts.not_here_burst),
                                    self._not_here_tokens + (now - self._not_here_at) * opts.not_here_rate)
        self._not_here_at = now
        if self._not_here_tokens >= 1.0:
            self._not_here_tokens -= 1.0
            self.enqueue_peer_gone(dst, F.PeerGoneReason.NOT_HERE)

    # ------------------------------------------------------------ outgoing (Endpoint interface)

    def enqueue_packet(self, src: PublicKey, data: bytes) -> None:
        """Queue a RecvPacket for this client; never blocks, drops the oldest when full."""
        q = self._disco if looks_like_disco(data) else self._pkts
        if self.closed or q is None:
            self.relay.drop("gone_disconnected")
            return
        if len(q) == q.maxlen:
            # One read from a fast sender can carry thousands of packets for us before the
            # loop gets to our flush. derper's send goroutine would be draining the queue
            # meanwhile, so do the same now: move the queue into the pending batch (written
            # once it is big enough) unless the transport is full. Only a client that really
            # is not keeping up loses packets.
            if not self._paused:
                self._stage_packets()
                if self._out_size >= _BATCH_BYTES:
                    self._write_out()
            if len(q) == q.maxlen:
                self.relay.drop("queue_head")
        q.append((src, data))
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._flush)

    def enqueue_peer_gone(self, key: PublicKey, reason: int) -> None:
        """Queue PeerGone(key, reason) as a control frame (bounded)."""
        if self.closed:
            return
        if reason == F.PeerGoneReason.DISCONNECTED:
            # Tracked again if the key comes back and sends to us (derper would stay silent).
            self._saw_src.discard(key)
        if len(self._ctrl) < _PEER_GONE_QUEUE:
            self._ctrl.append(F.encode_peer_gone(key, reason))
            if reason == F.PeerGoneReason.NOT_HERE:
                self.relay.peer_gone_not_here += 1
            else:
                self.relay.peer_gone_disconnected += 1
            self._schedule_flush()

    def _keepalive_tick(self) -> None:
        self._keepalive_due = True
        self._schedule_flush()
        self._ka_timer = self.loop.call_later(self._ka_period, self._keepalive_tick)

    def _schedule_flush(self) -> None:
        if not self._flush_pending and not self.closed:
            self._flush_pending = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write everything queued, in batches, until the queues are empty or the transport is full."""
        self._flush_pending = False
        relay = self.relay
        while not self._paused and not self.closed:
            self._stage_packets()
            # Control frames ride behind the packets of the same batch, so a Pong also
            # tells the client that everything queued before its Ping has been written.
            out = self._out
            if self._ctrl:
                for frame in self._ctrl:
                    out.append(frame)
                    self._out_size += len(frame)
                self._ctrl.clear()
            if self._pong is not None:
                out.append(F.encode_pong(self._pong))
                self._pong = None
                relay.pongs_sent += 1
            if self._keepalive_due:
                out.append(F.encode_keep_alive())
                self._keepalive_due = False
                relay.keepalives_sent += 1
            if not out:
                return
            self._write_out()

    def _stage_packets(self) -> None:
        """Encode queued packets into the pending batch, alternating queues, up to the batch size."""
        pkts, disco = self._pkts, self._disco
        if not pkts and not disco:
            return
        assert pkts is not None and disco is not None
        relay, saw, out, encode = self.relay, self._saw_src, self._out, F.encode_recv_packet
        size, n, nbytes = self._out_size, self._out_packets, self._out_payload
        departed: Optional[Set[PublicKey]] = None
        while size < _BATCH_BYTES and (pkts or disco):
            for q in (disco, pkts):  # alternate, so neither queue starves the other
                if q:
                    src, data = q.popleft()
                    if src not in saw:
                        if relay.watch(src, self):
                            saw.add(src)
                        else:  # the sender left while its packet waited here
                            departed = departed or set()
                            departed.add(src)
                    frame = encode(src, data)
                    out.append(frame)
                    size += len(frame)
                    n += 1
                    nbytes += len(data)
        self._out_size, self._out_packets, self._out_payload = size, n, nbytes
        if departed:
            for src in departed:  # written behind the packets, in the same or the next batch
                self.enqueue_peer_gone(src, F.PeerGoneReason.DISCONNECTED)

    def _write_out(self) -> None:
        """Hand the pending batch to the transport as one write (which may pause us)."""
        if not self._out:
            return
        relay = self.relay
        if self.transport is None or self.transport.is_closing():  # lost; connection_lost() is on its way
            relay.drop("gone_disconnected", self._out_packets)
            data = b""
        else:
            data = b"".join(self._out)
            relay.packets_forwarded += self._out_packets
            relay.bytes_forwarded += self._out_payload
        self._out.clear()
        self._out_size = self._out_packets = self._out_payload = 0
        if data:
            self._send(data)  # may call pause_writing() right here

    # ------------------------------------------------------------ introspection

    def queued(self) -> Tuple[int, int]:
        """(packets queued, bytes in the transport's write buffer)."""
        n = len(self._pkts or ()) + len(self._disco or ()) + self._out_packets
        buf = self.transport.get_write_buffer_size() if self.transport is not None and not self.transport.is_closing() else 0
        return n, buf
