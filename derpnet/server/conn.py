"""One relay connection as an asyncio Protocol: (TLS,) HTTP request head, DERP hello, frames.

Layer: relay server, the I/O edge. Byte layouts come from the sans-IO modules
(`ServerConnection`, `frames`, `TLSSession`); the handshake phase is an `Admission`, the
outgoing side a `Sender` (on a sans-IO `Outbox`). This class takes asyncio's callbacks,
does TLS, dispatches the client's frames and closes. Batching, flow control and the
write timeout: DEVELOPERS.md, "The relay server".
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import TYPE_CHECKING, Any, cast

from .. import frames as F
from ..connection import ServerConnection
from ..errors import DerpError, LocalProtocolError
from ..events import ClientHello, Event
from ..keys import PublicKey
from ..tlsbio import TLSSession
from . import connio
from .admission import Admission
from .connhooks import pace
from .mesh import MESH_WRITE_TIMEOUT
from .ratelimit import ReadLimiter
from .relay import Endpoint
from .sender import Sender

if TYPE_CHECKING:  # pragma: no cover
    from .server import RelayOptions, RelayServer
    from .wsserve import ServerWebSocket

__all__ = ["ClientProtocol"]

log = logging.getLogger(__name__)


class ClientProtocol(asyncio.BufferedProtocol):
    """Serves one accepted TCP/TLS connection for a RelayServer (reads and writes: connio.py)."""

    __slots__ = ("server", "relay", "options", "loop", "conn_id", "transport", "peer", "key", "info", "is_dup",
                 "preferred", "ideal_node", "fast_start", "closed", "registered", "paused", "_proto", "tls",
                 "_admission", "_sender", "_write_timer", "preauth_held", "unauthenticated",
                 "limiter", "draining", "can_mesh", "ws", "__weakref__")

    def __init__(self, server: RelayServer) -> None:
        self.server = server
        self.relay = server.relay
        self.options: RelayOptions = server.options
        self.loop = server.loop
        self.conn_id = server.next_conn_id()
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.key: PublicKey | None = None
        self.info: dict[str, Any] = {}
        self.is_dup = False
        self.preferred = False
        self.ideal_node: str | None = None
        self.fast_start = False
        self.closed = False
        self.registered = False
        self.paused = False  # flow control: the transport's buffer is above its high-water mark
        # Created on the first bytes and at registration, so abandoned sockets stay small.
        self._proto: ServerConnection | None = None
        self.tls: TLSSession | None = None
        self._admission: Admission | None = None  # until registered
        self._sender: Sender | None = None  # once registered
        self._write_timer: asyncio.TimerHandle | None = None
        self.preauth_held = 0  # bytes held before the hello, charged to the server's budget
        self.unauthenticated = False  # counted in the server's unauthenticated connections
        self.limiter: ReadLimiter | None = None  # the client's receive rate limit (ratelimit.py), once registered
        self.draining = False  # the relay is restarting: packets from this client are no longer forwarded
        self.can_mesh = False  # presented our mesh key: may watch, forward and close peers
        self.ws: ServerWebSocket | None = None  # DERP in WebSocket messages (set by the admission after its 101)

    def __repr__(self) -> str:
        who = self.key.short() if self.key else "-"
        return f"<ClientProtocol #{self.conn_id} {who} from {self.peer}>"

    @property
    def endpoint(self) -> Endpoint:
        """This connection as the relay sees it (once registered its key is set)."""
        return cast(Endpoint, self)

    @property
    def sender(self) -> Sender | None:
        """The outgoing side, once registered."""
        return self._sender

    @property
    def name(self) -> str:
        """Key and address for log lines."""
        return f"{self.key.short()} ({self.peer})" if self.key else self.peer

    # ------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass
        self.transport = transport
        self.peer = _fmt_addr(transport.get_extra_info("peername"))
        _tune_socket(transport.get_extra_info("socket"))
        transport.set_write_buffer_limits(high=self.options.write_buffer_limit)
        if not self.server.connection_opened(self):
            self.closed = True  # refused (accept rate, unauthenticated limit): closed at once
            _reset_on_close(transport)
            transport.abort()
            return
        self._admission = Admission(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.rx_view

    def buffer_updated(self, nbytes: int) -> None:
        connio.receive(self, self.server.rx_view[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        connio.receive(self, data)

    def eof_received(self) -> bool | None:
        return False  # half-close ends the connection, as in derper

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed and self.registered:
            log.debug("relay: client %s disconnected%s", self.name, f": {exc}" if exc else "")
        self._shutdown()
        if self._write_timer is not None:  # armed by finish()
            self._write_timer.cancel()
            self._write_timer = None
        self.server.connection_closed(self)

    def pause_writing(self) -> None:
        self.paused = True
        t = MESH_WRITE_TIMEOUT if self.can_mesh else self.options.write_timeout
        if t and self._write_timer is None and not self.closed:
            self._write_timer = self.loop.call_later(t, self._write_timed_out)

    def resume_writing(self) -> None:
        self.paused = False
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        if self._sender is not None:
            self._sender.schedule_flush()

    # ------------------------------------------------------------ closing

    def abort(self, reason: str, level: int = logging.INFO, *, rate_limited: bool = False) -> None:
        """Drop the connection now (protocol error, timeout, server shutdown). `rate_limited`:
        the reason is something a client can provoke at will (its line may be left out)."""
        if self.closed:
            return
        if rate_limited:
            self.server.error_log.log(level, "relay: closing %s: %s", self.name, reason)
        else:
            log.log(level, "relay: closing %s: %s", self.name, reason)
        self._shutdown()
        if self.transport is not None:
            self.transport.abort()

    def close(self, reason: str) -> None:
        """The relay asks us to go (mesh ClosePeer, server shutdown)."""
        self.abort(reason, level=logging.DEBUG)

    @property
    def tls_handshake_done(self) -> bool:
        return self.tls is not None and self.tls.handshake_done

    def send(self, data: bytes) -> None:
        """Write protocol bytes (in WebSocket messages when upgraded so, encrypted when serving TLS)."""
        if self.ws is not None:
            data = self.ws.wrap(data)
        self.send_raw(data)

    def send_raw(self, data: bytes) -> None:
        """Write bytes below the WebSocket layer (HTTP heads, WebSocket control frames)."""
        self.send_parts([data], raw=True)

    def send_parts(self, parts: list[bytes], *, raw: bool = False) -> None:
        """Write bytes given as pieces, in order (in WebSocket messages unless `raw`; connio.py)."""
        connio.write(self, parts, raw)

    def finish(self) -> None:
        """Close after the pending bytes (an HTTP response) are written; abort if they never are."""
        self._shutdown()
        self._write_timer = connio.finish(self)

    def _shutdown(self) -> None:
        """Leave the relay and stop the timers (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self._proto = None
        self.server.preauth_release(self)
        if self._admission is not None:
            self._admission.stop()
            self._admission = None
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        sender, self._sender = self._sender, None
        if self.registered and sender is not None:
            self.registered = False
            self.relay.unregister(self.endpoint)
            sender.stop()

    def _write_timed_out(self) -> None:
        self._write_timer = None
        self.server.write_timeouts += 1
        _reset_on_close(self.transport)
        self.abort(f"write timeout ({self.options.write_timeout:g}s): client is not reading")

    # ------------------------------------------------------------ incoming events

    def on_plaintext(self, data: bytes | memoryview) -> None:
        """Bytes received (decrypted; maybe a view of a shared buffer, valid during this call);
        unwrapped from WebSocket messages when upgraded so."""
        end = False
        if self.ws is not None:
            data, end = self.ws.unwrap(bytes(data))
        if not self.closed:
            self._on_stream(data)  # (also when a WebSocket frame is incomplete: its bytes count)
        if end and not self.closed:
            self.finish()

    def _on_stream(self, data: bytes | memoryview) -> None:
        proto = self._proto
        if proto is None:
            proto = self._proto = ServerConnection(self.server.private_key)
        try:
            self.dispatch_all(proto.receive_data(data))
            if self.limiter is not None:
                pace(self, len(data))
            held = proto.buffered + (self.ws.ws.buffered if self.ws is not None else 0)
            if not self.registered and not self.closed and not self.server.preauth_hold(self, held):
                self.abort(f"holds {held} bytes before its hello while the relay's pre-hello buffer "
                           f"budget is spent", rate_limited=True)
        except LocalProtocolError:
            pass  # data after we finished (e.g. behind an HTTP request): ignore
        except DerpError as e:
            self.server.protocol_errors += 1
            if not self.registered:
                self.server.handshake_failures += 1
            self.abort(f"{'protocol error' if self.registered else 'handshake failed'}: {e}", rate_limited=True)
        except Exception:  # a bug here, not client misbehaviour: keep the traceback (rate-limited too)
            self.server.error_log.log(logging.WARNING, "relay: internal error serving %s; closing it", self.name,
                                      exc_info=True)
            self.abort("internal error", level=logging.DEBUG)

    def dispatch_all(self, events: list[Event]) -> None:
        send_packet = F.SendPacket
        for ev in events:
            if type(ev) is send_packet and self.registered and not self.is_dup:
                self._forward(ev.dst, ev.data)  # the hot path; _dispatch does the same, slower
            else:
                self._dispatch(ev)
            if self.closed:
                return

    def _dispatch(self, ev: Event) -> None:
        if self.registered:
            if self.is_dup:
                self.relay.note_activity(self.endpoint)
            match ev:
                case F.SendPacket(dst=dst, data=data):
                    self._forward(dst, data)
                case F.Ping(data=data):
                    self.relay.pings += 1
                    if self._sender is not None:
                        self._sender.pong(data)
                case F.NotePreferred(preferred=preferred):
                    self.preferred = preferred
                case F.ForwardPacket() | F.WatchConns() | F.ClosePeer():
                    if self.can_mesh and self.server.mesh is not None:
                        self.server.mesh.handle(self, ev)
                        return
                    self.abort(f"{type(ev).__name__} frame from a non-mesh client: insufficient permissions",
                               rate_limited=True)
                # Pong and unknown frames are skipped.
            return
        if self._admission is not None and self._proto is not None:
            self._admission.handle(self._proto, ev)

    def admit(self, hello: ClientHello) -> None:
        """Register the client whose ClientInfo opened (ServerInfo already sent)."""
        self._admission = None
        self.server.connection_authenticated(self)
        self.key = hello.key
        self.info = hello.info
        if not self.can_mesh:  # mesh peers are not rate limited, as in derper
            self.limiter = self.server.rate_config.limit_for(hello.key).limiter(self.loop.time())
        self._sender = Sender(self)
        self.registered = True
        self.relay.register(self.endpoint)
        log.debug("relay: client %s connected (%s)%s", self.name, "fast start" if self.fast_start else "101",
                  " [duplicate key]" if self.is_dup else "")

    def _forward(self, dst_key: PublicKey, data: bytes) -> None:
        relay = self.relay
        if self.draining:
            relay.drop("restarting")
            return
        relay.packets_received += 1
        relay.bytes_received += len(data)
        dst, n = relay.lookup(dst_key)
        if dst is not None:
            assert self.key is not None
            dst.enqueue_packet(self.key, data)
        elif n > 1:
            relay.drop("dup_client")
        elif (mesh := self.server.mesh) is not None and self.key is not None and mesh.forward(self.key, dst_key, data):
            pass  # connected to another member of the mesh
        else:
            relay.drop("unknown_dest")
            if self._sender is not None:  # derper answers disco packets only; we answer every one
                self._sender.maybe_not_here(dst_key)

    # ------------------------------------------------------------ outgoing (Endpoint interface)

    def enqueue_packet(self, src: PublicKey, data: bytes) -> None:
        """Queue a RecvPacket for this client; never blocks, drops the oldest when full."""
        if self.closed or self._sender is None:
            self.relay.drop("gone_disconnected")
        else:
            self._sender.packet(src, data)

    def enqueue_peer_gone(self, key: PublicKey, reason: int) -> None:
        """Queue PeerGone(key, reason) as a control frame (bounded)."""
        if not self.closed and self._sender is not None:
            self._sender.peer_gone(key, reason)

    # ------------------------------------------------------------ introspection

    def queued(self) -> tuple[int, int]:
        """(packets queued, bytes in the transport's write buffer)."""
        n = self._sender.outbox.queued_packets if self._sender is not None else 0
        t = self.transport
        return n, (t.get_write_buffer_size() if t is not None and not t.is_closing() else 0)


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


def _reset_on_close(transport: asyncio.BaseTransport | None) -> None:
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
