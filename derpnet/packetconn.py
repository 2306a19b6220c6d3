"""`PacketConn`: datagrams addressed by public key through a DERP relay (or several at
once: derpnet.relayset), like Go's net.PacketConn.

    conn = derpnet.listen_packet("derp.example.com")          # TLS on 443
    conn = derpnet.listen_packet("http://127.0.0.1:3340")      # a dev relay
    conn.write_to(b"hello", peer_public_key)
    data, src = conn.read_from()

Wire format (compatible with the Go derpnet): every datagram is sent as
``SendPacket(dst, 0x00 ‖ payload)``; on receive the 0x00 byte is required and stripped.
Received packets with another first byte (or empty) are dropped and counted
(``stats()["drops"]["bad_framing"]``), never fatal. Largest payload: 65,535 bytes
(`MAX_DATAGRAM_SIZE`); larger raises `ValueError` before anything reaches the wire.

Behaviour decisions
-------------------
* **Unreliable, like UDP.** Packets can be dropped by the relay (its per-client queues
  drop the oldest), by us when the receive queue is full (drop-oldest, counted
  ``queue_full``), or while the relay link is down.
* **Writes never wait for a reconnect.** While the relay link is down, `write_to()`
  drops the datagram, counts it (``offline``) and returns ``len(data)`` as if it had been
  sent. It only blocks while the link is up and the relay's TCP window is full, at most
  `write_timeout` seconds (then the link is declared dead and the datagram dropped).
* **Reconnect.** When the link drops, a new one is dialled with Tailscale's backoff
  ``min(n² × 10 ms, 5 s) × uniform[0.5, 1.5)`` (n = consecutive failures; a link that
  lived at least a second resets n). A relay's ``Restarting`` frame replaces the first
  wait by its ``reconnect_in``. The same object keeps working; `wait_connected()` and
  the ``on_event`` callback (`LinkUp`/`LinkDown`) make the state observable. Pass
  ``reconnect=False`` to get Go derpnet's behaviour instead: the conn dies with its link
  (reads and writes then raise `ConnectionResetError`). The *initial* connect is not
  retried: `listen_packet()` raises (see derpnet.client for the error types).
* **Short buffer.** `read_from(bufsize)` with a datagram larger than `bufsize` raises
  `ShortBufferError` (an `OSError` with errno EMSGSIZE, `.size` = the datagram's size)
  and **keeps** the datagram queued: call again with a larger bufsize to get it. (Go
  drops it with io.ErrShortBuffer; Python's recvfrom truncates silently; neither loses
  nothing.) The default bufsize, 65,536, fits every datagram.
* **Closed.** After `close()`, `read_from()`/`write_to()` raise
  ``OSError(errno.EBADF, "PacketConn is closed")``, as a closed socket does.
* **Deadlines.** `set_read_deadline(t)` (absolute `time.time()` seconds, None clears)
  wakes blocked readers so they re-evaluate at once. Expired: `TimeoutError`.
  `settimeout(s)` is a per-call bound combined with the deadline (0 = non-blocking:
  `BlockingIOError` when nothing is queued). The write deadline is checked before each
  write and bounds the wait for other writers; it never cuts a frame in half.

Direct paths (``direct=True``, the default): between two derpnet peers, datagrams take
a direct UDP path when one is found (hole punching, see derpnet.paths), and the relay
otherwise; receiving from either path delivers the same ``(data, PublicKey)``. Discovery
only starts with a peer that proved it is one of ours (`note_peer_verified`, called by
derpquic after the key proof) or that sent us a valid disco message: a Go derpnet peer
never receives anything but 0x00-framed datagrams. `paths()` shows each peer's path,
`path_mtu(peer)` its packet size, and `PathChanged` events report every change.

Throughput: `write_batch([(data, addr), ...])` sends several datagrams in one write (one
syscall, one TLS pass). `stats()` counts packets/bytes in/out, drops by reason
(queue_full, bad_framing, offline), reconnects and PeerGone frames.

Threads: the relay link's reader (see derpnet.relaylink) and, with direct paths, one UDP
reader ("derpnet-udp-<key>"). `close()` joins them all.
"""

from __future__ import annotations

import errno
import logging
import ssl
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from . import frames as F
from .client import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_PING_AFTER,
    DEFAULT_PING_TIMEOUT,
    DEFAULT_WRITE_TIMEOUT,
    RelayAddress,
    parse_relay,
)
from .disco import looks_like_disco
from .keys import PrivateKey, PrivateKeyLike, PublicKey, PublicKeyLike
from .paths import RELAY_PATH_MTU, PathChanged
from .relaylink import LinkDown, LinkUp, RelayLink, backoff_delay
from .relayset import RelaySet, RelaySpec, RelayViews, open_link, parse_relays
from .rxqueue import ReceiveQueue, ShortBufferError, closed_error

if TYPE_CHECKING:
    from .direct import DirectPaths

__all__ = ["listen_packet", "PacketConn", "ShortBufferError", "LinkUp", "LinkDown", "PathChanged",
           "MAX_DATAGRAM_SIZE", "DEFAULT_QUEUE_SIZE", "backoff_delay"]

log = logging.getLogger(__name__)

MAX_DATAGRAM_SIZE = F.MAX_PACKET_SIZE - 1  # 65,535: one byte goes to the 0x00 framing
DEFAULT_QUEUE_SIZE = 512
_FRAMING = b"\x00"


def _size(data: Any) -> int:
    return len(data) if type(data) is bytes else memoryview(data).nbytes


def listen_packet(relay: RelaySpec, key: PrivateKeyLike | None = None,
                  **options: Any) -> PacketConn:
    """Connect to `relay` with `key` (None: a fresh key) and return a `PacketConn`.

    `relay`: a hostname (TLS on 443, as the Go tool), ``https://host:port``,
    ``http://host:port``, or ``wss://``/``ws://`` for DERP over WebSocket; or several (a
    list, or one string with commas): the conn is then reachable through all of them and
    sends to each peer through the relay it was last heard on (derpnet.relayset). HTTP
    proxies come from HTTPS_PROXY/HTTP_PROXY/NO_PROXY. Options: see `PacketConn`. Raises
    if the first connect fails (with several relays: if none answers; the others are
    retried in the background).
    """
    return PacketConn(relay, key, **options)


class PacketConn(RelayViews):
    """A datagram endpoint whose address is our public key (Go's net.PacketConn).

    Options: ``ssl_context``, ``connect_timeout`` (10 s), ``write_timeout`` (5 s),
    ``idle_timeout`` (120 s), ``ping_after``/``ping_timeout`` (5 s/5 s; see
    derpnet.liveness), ``queue_size`` (512, drop-oldest), ``reconnect`` (True),
    ``on_event(event)`` (LinkUp, LinkDown, PathChanged, relay frames; a reader thread: must
    not block), ``on_packet(data, src)`` (instead of the queue; a reader thread), and for
    direct paths ``direct`` (True), ``stun`` ("host:port"; default the relay's host, port
    3478), ``udp_port`` (0 = any); ``websocket`` (None: raw DERP, WebSocket when the relay
    refuses the plain upgrade; True: WebSocket only; False: never); ``alternates`` (other
    members of the relay's mesh: a reconnect goes there when the relay stays unreachable)."""

    def __init__(
        self,
        relay: RelaySpec,
        key: PrivateKeyLike | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
        write_timeout: float | None = DEFAULT_WRITE_TIMEOUT,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        ping_after: float | None = DEFAULT_PING_AFTER,
        ping_timeout: float = DEFAULT_PING_TIMEOUT,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        reconnect: bool = True,
        on_event: Callable[[object], None] | None = None,
        on_packet: Callable[[bytes, PublicKey], None] | None = None,
        direct: bool = True,
        stun: str | None = None,
        udp_port: int = 0,
        websocket: bool | None = None,
        alternates: Sequence[str | RelayAddress] = (),
    ) -> None:
        self._relay, *self._more_relays = parse_relays(relay)
        self._key = PrivateKey.generate() if key is None else PrivateKey.coerce(key)
        self._addr = self._key.public_key
        stun_server = _parse_host_port(stun, "stun") if stun is not None else None
        self._events = EventHub(on_event)
        self._on_packet_cb = on_packet

        self._rx = ReceiveQueue(queue_size)
        self._cond = self._rx.cond  # also guards the listeners and the counters below

        self._peer_gone = 0

        self._direct: DirectPaths | None = None
        if direct:
            from .direct import DirectPaths  # imported only when used
            self._direct = DirectPaths(self._key, deliver=self._deliver, send_relay=self._send_raw,
                                       emit=self._events.emit, relay_host=self._relay.host, stun_server=stun_server,
                                       port=udp_port)
        client_opts: dict[str, Any] = dict(ssl_context=ssl_context, connect_timeout=connect_timeout,
                                           write_timeout=write_timeout, idle_timeout=idle_timeout,
                                           ping_after=ping_after, ping_timeout=ping_timeout, websocket=websocket)
        try:
            self._link = open_link([self._relay, *self._more_relays], self._key, client_opts=client_opts,
                                   on_packet=self._on_packet, on_event=self._on_frame, reconnect=reconnect,
                                   alternates=[parse_relay(a) for a in alternates])
        except BaseException:
            if self._direct is not None:
                self._direct.close()
            raise
        self._out = Outbound(self._link, self._direct, self._rx)
        if self._direct is not None:
            self._direct.start()

    # ------------------------------------------------------------ net.PacketConn

    def local_addr(self) -> PublicKey:
        """Our address: the public key of our private key."""
        return self._addr

    @property
    def private_key(self) -> PrivateKey:
        """Our identity (layers above, such as derpquic, prove it to peers). Never shown in
        repr() or str()."""
        return self._key

    def write_to(self, data: bytes, addr: PublicKeyLike) -> int:
        """Send one datagram (≤ 65,535 bytes) to `addr` (PublicKey, 32 bytes or any text form).

        Returns len(data). Dropped silently (counted) while the relay link is down and no
        direct path exists; see the module docstring. Raises ValueError (too big),
        TimeoutError (write deadline), OSError EBADF (closed), ConnectionResetError
        (reconnect=False and the link died).
        """
        n = _size(data)
        if n > MAX_DATAGRAM_SIZE:
            raise ValueError(f"datagram of {n} bytes exceeds the maximum of {MAX_DATAGRAM_SIZE}")
        if self._rx.closed:
            raise closed_error()
        dst = addr if type(addr) is PublicKey else PublicKey.coerce(addr)
        self._out.send(dst, data, n)
        return n

    def write_batch(self, datagrams: Iterable[tuple[bytes, PublicKeyLike]]) -> int:
        """Send several datagrams [(data, addr), ...]: those on a direct path go at once, the
        rest in one write to the relay (one syscall, one TLS record run), much cheaper per
        datagram than write_to() in a loop. Same rules as write_to(); all are checked
        before any is sent. Returns the number sent (or dropped while offline)."""
        items: list[tuple[PublicKey, bytes, int]] = []
        for data, addr in datagrams:
            n = _size(data)
            if n > MAX_DATAGRAM_SIZE:
                raise ValueError(f"datagram of {n} bytes exceeds the maximum of {MAX_DATAGRAM_SIZE}")
            items.append((addr if type(addr) is PublicKey else PublicKey.coerce(addr), data, n))
        if self._rx.closed:
            raise closed_error()
        return self._out.send_many(items)

    def read_from(self, bufsize: int = 65536) -> tuple[bytes, PublicKey]:
        """Block for the next datagram: (payload, sender's PublicKey).

        Raises TimeoutError at the read deadline / timeout, ShortBufferError if the datagram
        is larger than `bufsize` (it stays queued), OSError EBADF once closed.
        """
        return self._rx.take(bufsize, self._dead)

    def read_batch(self, limit: int = 256) -> list[tuple[bytes, PublicKey]]:
        """Block for the next datagram as read_from() does, then return it with every datagram
        already queued behind it, at most `limit`: [(payload, sender), ...] (any size)."""
        return self._rx.take_batch(limit, self._dead)

    def read_from_into(self, buffer: Any) -> tuple[int, PublicKey]:
        """Like read_from(), into a writable buffer: (nbytes, sender). ShortBufferError if too small."""
        view = memoryview(buffer).cast("B")
        data, src = self._rx.take(len(view), self._dead)
        n = len(data)
        view[:n] = data
        return n, src

    def close(self) -> None:
        """Close (idempotent): wakes blocked readers, closes the relay link and the UDP
        socket, joins their threads."""
        if not self._rx.close():
            return
        if self._direct is not None:
            self._direct.close()
        self._link.close()

    @property
    def closed(self) -> bool:
        return self._rx.closed

    def __enter__(self) -> PacketConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._rx.closed:
            state = "closed"
        elif self._link.connected:
            state = "connected"
        elif self._link.dead is not None:
            state = "dead"
        else:
            state = "reconnecting"
        return f"<PacketConn {self._addr} via {self._relay.url} {state}>"

    # ------------------------------------------------------------ deadlines

    def set_deadline(self, t: float | None) -> None:
        """Read and write deadline: absolute time.time() seconds, or None for none."""
        self.set_read_deadline(t)
        self.set_write_deadline(t)

    def set_read_deadline(self, t: float | None) -> None:
        """Read deadline (absolute time.time() seconds, None clears); wakes blocked readers."""
        self._rx.set_read_deadline(t)

    def set_write_deadline(self, t: float | None) -> None:
        self._rx.write_deadline = None if t is None else float(t)

    def settimeout(self, seconds: float | None) -> None:
        """Per-call timeout for read_from/write_to, as socket.settimeout (None = block)."""
        self._rx.settimeout(seconds)

    def gettimeout(self) -> float | None:
        return self._rx.timeout

    # ------------------------------------------------------------ direct paths

    def note_peer_verified(self, peer: PublicKeyLike) -> None:
        """`peer` proved (end to end) that it is a derpnet peer: path discovery may start.
        Never call it for a peer that may be a Go derpnet (it would receive disco packets)."""
        if self._direct is not None and not self._rx.closed:
            self._direct.enable(PublicKey.coerce(peer))

    def path_mtu(self, peer: PublicKeyLike) -> int:
        """The largest datagram the current path to `peer` carries (65,535 on the relay)."""
        direct = self._direct
        return RELAY_PATH_MTU if direct is None else direct.table.mtu(PublicKey.coerce(peer))

    def paths(self) -> dict[PublicKey, dict[str, Any]]:
        """Per peer: the current path ("relay" or "ip:port"), its rtt (s), mtu, and bytes per path."""
        return {} if self._direct is None else self._direct.paths()

    def stats(self) -> dict[str, Any]:
        """Counters: packets/bytes in and out (and out direct), drops by reason, reconnects."""
        d: dict[str, Any] = {"reconnects": self._link.reconnects, "peer_gone": self._peer_gone,
                             "connected": self._link.connected, **self._rx.counters()}
        out = self._out.counters()
        d["drops"].update(out.pop("drops"))
        d.update(out)
        if self._direct is not None:
            d["direct"] = self._direct.stats()
        return d

    def add_event_listener(self, callback: Callable[[object], None]) -> None:
        """Also deliver link, path and relay events (LinkUp, LinkDown, PathChanged, PeerGone,
        Health, ...) to `callback`, besides the `on_event` option; layers above (the QUIC
        driver) use it. Callbacks run on a reader thread and must not block."""
        self._events.add(callback)

    def remove_event_listener(self, callback: Callable[[object], None]) -> None:
        self._events.remove(callback)

    # ------------------------------------------------------------ internals

    def _send_raw(self, dst: PublicKey, packet: bytes) -> None:
        """A disco packet over the relay (no 0x00 framing: the relay files it as disco)."""
        try:
            self._link.send(dst, packet)
        except (ConnectionError, TimeoutError) as e:
            log.debug("disco to %s over the relay dropped: %s", dst, e)

    def _dead(self) -> BaseException | None:
        return self._link.dead

    def _on_packet(self, src: PublicKey, data: bytes) -> None:
        # The relay reader thread's hot path: never blocks, never raises.
        if data and data[0] == 0:
            if self._direct is not None:
                self._direct.note_relay_received(src, len(data) - 1)
            self._deliver(data[1:], src)
        elif self._direct is not None and looks_like_disco(data):
            self._direct.on_relay_disco(src, data)
        else:
            with self._cond:
                self._rx.drop_bad_framing += 1
            log.debug("dropped a packet from %s without the 0x00 framing byte (%d bytes)", src, len(data))

    def _deliver(self, data: bytes, src: PublicKey) -> None:
        """A datagram from `src`, from either path (a reader thread; never blocks)."""
        cb = self._on_packet_cb
        if cb is not None:
            self._rx.count(len(data))
            try:
                cb(data, src)
            except Exception:
                log.exception("on_packet callback failed")
            return
        self._rx.put(data, src)

    def _on_frame(self, ev: object) -> None:
        if isinstance(ev, F.PeerGone):
            with self._cond:
                self._peer_gone += 1
            log.debug("relay: peer %s gone (reason %d)", ev.key, ev.reason)
        elif isinstance(ev, LinkDown):
            self._rx.wake()  # readers re-check: the link may be dead for good
        elif isinstance(ev, LinkUp) and ev.generation > 1 and self._direct is not None:
            self._direct.restun()
        self._events.emit(ev)


class EventHub:
    """The `on_event` callback and the listeners added later; each gets every event."""

    def __init__(self, first: Callable[[object], None] | None) -> None:
        self._lock = threading.Lock()
        self._callbacks: tuple[Callable[[object], None], ...] = (first,) if first is not None else ()

    def add(self, callback: Callable[[object], None]) -> None:
        with self._lock:
            self._callbacks += (callback,)

    def remove(self, callback: Callable[[object], None]) -> None:
        with self._lock:
            self._callbacks = tuple(cb for cb in self._callbacks if cb is not callback)

    def emit(self, event: object) -> None:
        for cb in self._callbacks:
            try:
                cb(event)
            except Exception:
                log.exception("on_event callback failed")


class Outbound:
    """Where each datagram goes: the direct path when the peer has one that fits, else the
    relay (dropped and counted while it is down, like UDP). Writers run in any thread."""

    def __init__(self, link: RelayLink | RelaySet, direct: DirectPaths | None, rx: ReceiveQueue) -> None:
        self.link, self.direct, self.rx = link, direct, rx
        self.lock = threading.Lock()  # the counters
        self.packets = self.bytes = self.direct_packets = self.drop_offline = 0

    def send(self, dst: PublicKey, data: bytes, n: int) -> None:
        direct = self.direct
        if direct is not None and direct.send(dst, data):
            with self.lock:
                self.packets += 1
                self.bytes += n
                self.direct_packets += 1
            return
        try:
            self.link.send(dst, _FRAMING, data, lock_timeout=self.rx.write_wait())
        except ConnectionError:
            self.offline(1)  # down (or died under us): the reader reconnects
            return
        except TimeoutError:
            raise TimeoutError(errno.ETIMEDOUT, "write timed out waiting for other writers") from None
        with self.lock:
            self.packets += 1
            self.bytes += n

    def send_many(self, items: list[tuple[PublicKey, bytes, int]]) -> int:
        direct = self.direct
        relayed: list[tuple[PublicKey, Sequence[bytes]]] = []
        sent_direct = total_direct = total_relay = 0
        for dst, data, n in items:
            if direct is not None and direct.send(dst, data):
                sent_direct += 1
                total_direct += n
            else:
                relayed.append((dst, (_FRAMING, data)))
                total_relay += n
        with self.lock:
            self.packets += sent_direct
            self.bytes += total_direct
            self.direct_packets += sent_direct
        if not relayed:
            return len(items)
        try:
            self.link.send_many(relayed, lock_timeout=self.rx.write_wait())
        except ConnectionError:
            return sent_direct + self.offline(len(relayed))
        except TimeoutError:
            raise TimeoutError(errno.ETIMEDOUT, "write timed out waiting for other writers") from None
        with self.lock:
            self.packets += len(relayed)
            self.bytes += total_relay
        return len(items)

    def counters(self) -> dict[str, Any]:
        with self.lock:
            return {"packets_out": self.packets, "bytes_out": self.bytes, "packets_out_direct": self.direct_packets,
                    "drops": {"offline": self.drop_offline}}

    def offline(self, count: int) -> int:
        if self.rx.closed:
            raise closed_error()
        if self.link.dead is not None:
            raise ConnectionResetError(errno.ECONNRESET, f"relay link is down: {self.link.dead}")
        with self.lock:
            self.drop_offline += count
        return count


def _parse_host_port(text: str, what: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" → (host, port); ValueError with a clear message."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what}: expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)
