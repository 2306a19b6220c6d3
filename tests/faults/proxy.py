"""`FaultProxy`: a DERP-aware TCP proxy on loopback for fault tests (no pytest here).

    with FaultProxy(relay_port) as proxy:                     # 127.0.0.1:proxy.port -> relay
        pc = derpnet.listen_packet(proxy.url)                 # the client talks through it
        proxy.cut()                                           # close both sides (a server-side close)
        proxy.blackhole()                                     # stop forwarding, keep the sockets open
        proxy.set_loss(0.05)                                  # drop 5 % of the client's SendPackets
        proxy.drop_burst(200); proxy.wait_burst_done(10)      # drop the next 200 in a row
        proxy.throttle_down(4 << 20)                          # relay -> client at 4 MB/s (a slow link)

Only plain-HTTP relays (ours or the Go derper): the proxy must see DERP frames. The
client -> relay stream is parsed with the sans-IO modules only: the HTTP upgrade head by
`derpnet.http11.parse_request_head`, the frames after it by
`derpnet.frames.FrameDecoder("server")`; every frame that is not dropped is re-encoded
with the `derpnet.frames` encoders. Nothing here reads a byte layout by hand. That
re-encoding is byte-exact is checked on every batch: the bytes written for a batch plus
the bytes of the frames dropped from it must equal what the decoder consumed (fed minus
still buffered); a mismatch (or a frame the decoder skips, whose payload it discards)
is recorded in `errors` and the connection is cut, never silently altered.
relay -> client bytes are forwarded untouched (optionally rate-limited).

`cut()` and `blackhole()` act on the connections open at that moment; connections made
afterwards (a client reconnecting) are forwarded normally. Loss, bursts and throttling
apply to every connection, current and future.

Threads: "faultproxy-accept-<port>" and, per connection, "faultproxy-up-<port>-<n>"
(client -> relay) and "faultproxy-down-<port>-<n>" (relay -> client). `close()` stops and
joins them all.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable

from derpnet import frames as F
from derpnet.errors import RemoteProtocolError
from derpnet.http11 import parse_request_head

__all__ = ["FaultProxy", "encode_client_frame"]

_RECV = 256 << 10

# Frames a client sends, re-encoded by the frames module's own encoders.
_ENCODERS: dict[type, Callable[[object], bytes]] = {
    F.ClientInfo: lambda f: F.encode_client_info(f.key, f.sealed),
    F.SendPacket: lambda f: F.encode_send_packet(f.dst, f.data),
    F.Ping: lambda f: F.encode_ping(f.data),
    F.Pong: lambda f: F.encode_pong(f.data),
    F.NotePreferred: lambda f: F.encode_note_preferred(f.preferred),
    F.ForwardPacket: lambda f: F.encode_forward_packet(f.src, f.dst, f.data),
    F.WatchConns: lambda f: F.encode_watch_conns(),
    F.ClosePeer: lambda f: F.encode_close_peer(f.key),
}


def encode_client_frame(frame: object) -> bytes:
    """The wire bytes of a client -> relay frame decoded by FrameDecoder("server")."""
    enc = _ENCODERS.get(type(frame))
    if enc is None:
        raise ValueError(f"cannot re-encode {frame!r}")
    return enc(frame)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Link:
    """One proxied connection: the client socket, the relay socket, two pump threads."""

    def __init__(self, proxy: FaultProxy, n: int, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.n = n
        self.client = client
        self.upstream = upstream
        self.black = threading.Event()  # stop forwarding, keep the sockets open
        self.stop = threading.Event()  # cut or proxy closed: the pumps end
        self.threads = [
            threading.Thread(target=self._up, name=f"faultproxy-up-{proxy.port}-{n}", daemon=True),
            threading.Thread(target=self._down, name=f"faultproxy-down-{proxy.port}-{n}", daemon=True),
        ]
        for t in self.threads:
            t.start()

    # -- control (any thread)

    def cut(self) -> None:
        self.stop.set()
        _shut(self.client)
        _shut(self.upstream)

    def blackhole(self) -> None:
        self.black.set()

    def join(self, timeout: float) -> None:
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(timeout)

    def close_sockets(self) -> None:
        self.client.close()
        self.upstream.close()

    @property
    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    # -- pumps

    def _park(self) -> None:
        """Black-holed: read nothing, write nothing, close nothing until cut or close."""
        self.stop.wait()

    def _end(self) -> None:
        # One direction ended (EOF, reset, cut): end both, as a TCP proxy does. While
        # black-holed, an EOF from one side must not reach the other: park instead.
        if self.black.is_set() and not self.stop.is_set():
            self._park()
        self.cut()

    def _up(self) -> None:
        """client -> relay: the HTTP upgrade head verbatim, then frame by frame."""
        proxy = self.proxy
        head = bytearray()
        decoder: F.FrameDecoder | None = None
        raw = False  # not a DERP upgrade: forward untouched
        fed = consumed = 0
        try:
            while not self.stop.is_set():
                data = self.client.recv(_RECV)
                if self.black.is_set():
                    self._park()
                    return
                if not data:
                    break
                if raw:
                    self.upstream.sendall(data)
                    continue
                if decoder is None:
                    head += data
                    parsed = parse_request_head(head)
                    if parsed is None:
                        continue
                    req, n = parsed
                    upgrade = (req.get("Upgrade") or "").lower()
                    self.upstream.sendall(bytes(head[:n]))
                    data, head = bytes(head[n:]), bytearray()
                    if upgrade != "derp":
                        raw = True
                        if data:
                            self.upstream.sendall(data)
                        continue
                    decoder = F.FrameDecoder("server")
                    if not data:
                        continue
                decoder.feed(data)
                fed += len(data)
                out: list[bytes] = []
                dropped = 0
                for frame in decoder.events():
                    if type(frame) is F.UnknownFrame:
                        raise RemoteProtocolError(f"frame type 0x{frame.type:02x} cannot be re-emitted "
                                                  "(the decoder discards its payload)")
                    wire = encode_client_frame(frame)
                    if type(frame) is F.SendPacket and proxy._should_drop(frame.dst):
                        dropped += len(wire)
                        continue
                    out.append(wire)
                written = sum(map(len, out))
                consumed += written + dropped
                if consumed != fed - decoder.buffered:
                    raise AssertionError(f"re-encoding is not byte-exact: {consumed} bytes out (incl. dropped) "
                                         f"for {fed - decoder.buffered} consumed")
                if out:
                    self.upstream.sendall(b"".join(out))
                    with proxy._lock:
                        proxy.bytes_up += written
        except (RemoteProtocolError, AssertionError, ValueError) as e:
            proxy._error(f"connection {self.n}: {e}")
        except OSError:
            pass
        self._end()

    def _down(self) -> None:
        """relay -> client: untouched, optionally at a limited rate."""
        proxy = self.proxy
        budget_t = time.monotonic()
        try:
            while not self.stop.is_set():
                rate = proxy._down_rate
                data = self.upstream.recv(64 << 10 if rate else _RECV)
                if self.black.is_set():
                    self._park()
                    return
                if not data:
                    break
                if rate:
                    # Token bucket without burst credit: each chunk may leave only once the
                    # link has had time to carry it at `rate` bytes/s.
                    now = time.monotonic()
                    budget_t = max(budget_t, now) + len(data) / rate
                    if self.stop.wait(budget_t - now):
                        break
                    if self.black.is_set():
                        self._park()
                        return
                self.client.sendall(data)
                with proxy._lock:
                    proxy.bytes_down += len(data)
        except OSError:
            pass
        self._end()


class FaultProxy:
    """Forwards 127.0.0.1:`port` to `target_host`:`target_port` and injects faults (see module doc)."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", *, seed: int | None = None,
                 sock_buffer: int | None = None, relay_mss: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.relay_mss = relay_mss
        self.sock_buffer = sock_buffer  # SO_RCVBUF/SO_SNDBUF of our sockets (None: the kernel's autotuning)
        # TCP MSS of the relay's side of each connection (None: loopback's 64 KiB). A real
        # link's MSS (~1448) also keeps the relay's kernel send buffer real-sized: Linux
        # sizes it from the congestion window in segments.
        self.seed = random.randrange(1 << 32) if seed is None else seed
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._links: list[_Link] = []
        self._closed = False
        self._loss = 0.0
        self._burst_left = 0
        self._down_rate: float | None = None
        self.connections = 0
        self.packets_seen = 0
        self.packets_dropped = 0
        self.dropped_to: Counter = Counter()  # destination key -> SendPackets dropped
        self.bytes_up = self.bytes_down = 0
        self.errors: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"faultproxy-accept-{self.port}",
                                          daemon=True)
        self._acceptor.start()

    @property
    def url(self) -> str:
        """The relay's URL through the proxy (plain HTTP)."""
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------ faults

    def cut(self) -> int:
        """Close both sides of every open connection (FIN to the client and to the relay);
        returns how many were cut."""
        with self._lock:
            links = [ln for ln in self._links if not ln.stop.is_set()]
        for ln in links:
            ln.cut()
        return len(links)

    def blackhole(self) -> int:
        """Stop forwarding on every open connection, both directions, without FIN or RST:
        the sockets stay open and unread, as behind a dead NAT. Returns how many."""
        with self._lock:
            links = [ln for ln in self._links if not ln.stop.is_set() and not ln.black.is_set()]
        for ln in links:
            ln.blackhole()
        return len(links)

    def set_loss(self, probability: float, seed: int | None = None) -> None:
        """Drop each client SendPacket frame with this probability (0 = none); `seed`
        restarts the random sequence (reproducible drops)."""
        if not 0.0 <= probability <= 1.0:
            raise ValueError("probability must be in [0, 1]")
        with self._lock:
            self._loss = probability
            if seed is not None:
                self.seed = seed
                self._rng = random.Random(seed)

    def drop_burst(self, count: int) -> None:
        """Drop the next `count` client SendPacket frames, consecutively."""
        with self._lock:
            self._burst_left = count

    def wait_burst_done(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._burst_left == 0, timeout)

    def throttle_down(self, bytes_per_second: float | None) -> None:
        """Limit relay -> client bytes to this rate (None: unlimited)."""
        self._down_rate = float(bytes_per_second) if bytes_per_second else None

    def wait_connections(self, count: int, timeout: float) -> bool:
        """Wait until `count` connections have been accepted in all."""
        with self._cond:
            return self._cond.wait_for(lambda: self.connections >= count, timeout)

    def stats(self) -> dict:
        with self._lock:
            return {"connections": self.connections, "packets_seen": self.packets_seen,
                    "packets_dropped": self.packets_dropped, "bytes_up": self.bytes_up,
                    "bytes_down": self.bytes_down, "errors": list(self.errors), "seed": self.seed}

    # ------------------------------------------------------------ internals

    def _should_drop(self, dst) -> bool:
        with self._cond:
            self.packets_seen += 1
            if self._burst_left > 0:
                self._burst_left -= 1
                if self._burst_left == 0:
                    self._cond.notify_all()
            elif not (self._loss and self._rng.random() < self._loss):
                return False
            self.packets_dropped += 1
            self.dropped_to[dst] += 1
            return True

    def _error(self, text: str) -> None:
        with self._lock:
            self.errors.append(text)

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.socket(socket.AF_INET6 if ":" in self.target[0] else socket.AF_INET)
                if self.relay_mss:
                    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, self.relay_mss)
                if self.sock_buffer:  # before connect(), so that the TCP window follows
                    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                        upstream.setsockopt(socket.SOL_SOCKET, opt, self.sock_buffer)
                        client.setsockopt(socket.SOL_SOCKET, opt, self.sock_buffer)
                upstream.settimeout(5)
                upstream.connect(self.target)
                upstream.settimeout(None)
            except OSError:
                upstream.close()
                client.close()  # the relay is down: the client sees EOF and retries
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._cond:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self.connections += 1
                link = _Link(self, self.connections, client, upstream)
                self._links = [ln for ln in self._links if ln.alive or not self._reap(ln)]
                self._links.append(link)
                self._cond.notify_all()

    @staticmethod
    def _reap(link: _Link) -> bool:
        link.join(0)
        link.close_sockets()
        return True

    def close(self) -> None:
        """Stop accepting, cut every connection, join every thread, close every socket."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _shut(self.listener)
        self.listener.close()
        self._acceptor.join(10)
        with self._lock:
            links, self._links = self._links, []
        for ln in links:
            ln.cut()
        for ln in links:
            ln.join(10)
            ln.close_sockets()

    def threads_alive(self) -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("faultproxy-") and
                t.name.split("-")[2] == str(self.port)]

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
