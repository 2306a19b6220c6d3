"""Misbehaving DERP clients, an honest pair that keeps talking, and relay-process probes.

Plain classes and functions (no pytest), used by the hostile tests against our relay
subprocess and the Go derper. Every wait has a deadline; the only timed waits are the
pacing of deliberate trickles and of the honest pair's send rate (a rate, never a
stand-in for an event).
"""

from __future__ import annotations

import resource
import select
import selectors
import socket
import struct
import threading
import time
from collections import Counter

import derpnet
from derpnet import frames as F
from derpnet.handshake import seal, seal_client_info
from derpnet.keys import PrivateKey, PublicKey
from tests.rawderp import RawDerpClient, read_exact, split_url

UPGRADE = b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
# A request head that never ends within any sane handshake timeout when sent a byte at a time.
TRICKLE_HEAD = b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: DERP\r\n" + b"X-Slow: ." * 2000


# ---------------------------------------------------------------- the relay process

def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(f"{field} not in /proc/{pid}/status")


def rss_mib(pid: int) -> float:
    """Resident set size now (VmRSS), MiB."""
    return _status_kib(pid, "VmRSS") / 1024


def peak_rss_mib(pid: int) -> float:
    """Peak resident set size (VmHWM), MiB."""
    return _status_kib(pid, "VmHWM") / 1024


def raise_nofile(want: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `want` (capped by the hard limit);
    returns the soft limit now in force. Children started afterwards inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connect_plain(url: str, timeout: float = 10.0) -> socket.socket:
    host, port, _ = split_url(url)
    s = socket.create_connection(("127.0.0.1" if host == "localhost" else host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def connect_or_closed(url: str, timeout: float = 10.0) -> socket.socket:
    """`connect_plain`, except that a reset before connect() returned (a relay at its cap or
    over its accept rate closing a newcomer at once, which a loaded machine can show before
    the handshake completes) gives a socket whose peer has already closed: what it stands for."""
    try:
        return connect_plain(url, timeout=timeout)
    except ConnectionResetError:
        s, gone = socket.socketpair()
        gone.close()
        return s


def upgraded_socket(url: str) -> tuple[socket.socket, PublicKey]:
    """A socket past the 101 (ServerKey read), before its ClientInfo; and the server key."""
    s = connect_plain(url)
    s.sendall(UPGRADE)
    head = b""
    while b"\r\n\r\n" not in head:
        b = s.recv(1)
        if not b:
            raise ConnectionError(f"relay closed during the upgrade: {head!r}")
        head += b
    assert head.startswith(b"HTTP/1.1 101 "), head
    frame = read_exact(s, 45)
    assert frame[:5] == b"\x01\x00\x00\x00\x28", frame
    return s, PublicKey(frame[13:45])


def closed_by_peer(s: socket.socket, timeout: float) -> bool:
    """True once the peer has closed `s` (FIN or RST), without reading its data; False on timeout."""
    p = select.poll()
    p.register(s, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    return bool(p.poll(max(0, timeout) * 1000))


def wait_reset_or_eof(s: socket.socket, timeout: float = 10.0) -> None:
    """Read (and discard) until the peer closes; raise TimeoutError if it does not."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("peer did not close the connection")
        s.settimeout(left)
        try:
            if not s.recv(1 << 16):
                return
        except (ConnectionResetError, BrokenPipeError):
            return
        except TimeoutError:
            raise TimeoutError("peer did not close the connection") from None


def server_side_state(server_port: int, client_port: int) -> str | None:
    """The TCP state (hex, as in /proc/net/tcp: "01" = ESTABLISHED, "04" = FIN-WAIT-1...) of
    the relay's end of the loopback connection from `client_port`, or None if the kernel
    holds no such socket: seen from outside the relay, whatever it does with its socket."""
    want_local, want_remote = f":{server_port:04X}", f":{client_port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[1].endswith(want_local) and parts[2].endswith(want_remote):
                return parts[3]
    return None


def server_side_established(server_port: int, client_port: int) -> bool:
    return server_side_state(server_port, client_port) == "01"


def wait_server_dropped(server_port: int, sock: socket.socket, timeout: float) -> float:
    """Poll until the relay no longer holds `sock`'s connection ESTABLISHED; returns the seconds taken."""
    client_port = sock.getsockname()[1]
    t0 = time.monotonic()
    while server_side_established(server_port, client_port):
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"the relay still holds the connection from port {client_port} after {timeout} s")
        time.sleep(0.02)  # polling a state that has no event
    return time.monotonic() - t0


def packet(data: bytes) -> bytes:
    """A PacketConn datagram as it travels inside SendPacket (the 0x00 framing byte first)."""
    return b"\x00" + data


# ---------------------------------------------------------------- honest traffic

class HonestPair:
    """Two PacketConns (no reconnect: a relay that drops them fails the test) sending
    numbered datagrams to each other at `rate` per second each, in their own threads.

    Every datagram received is checked: from the partner it must carry the partner's
    tag with increasing sequence numbers; anything from another source is recorded in
    `foreign[src]` (its real sender key, as the relay stamped it).
    """

    def __init__(self, url: str, *, rate: float = 300.0, ssl_context=None) -> None:
        opts = dict(reconnect=False, ssl_context=ssl_context) if ssl_context else dict(reconnect=False)
        self.a = derpnet.listen_packet(url, **opts)
        self.b = derpnet.listen_packet(url, **opts)
        self.rate = rate
        self.delivered = 0
        self.errors: list[str] = []
        self.foreign: dict[PublicKey, list[bytes]] = {}
        self.last_delivery = time.monotonic()
        self.max_gap = 0.0
        self._gap_from = time.monotonic()
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> HonestPair:
        for me, peer, tag in ((self.a, self.b, b"A"), (self.b, self.a, b"B")):
            self._threads.append(threading.Thread(target=self._send, args=(me, peer.local_addr(), tag),
                                                  name=f"honest-send-{tag.decode()}", daemon=True))
            self._threads.append(threading.Thread(target=self._recv, args=(me, peer.local_addr(),
                                                                           b"B" if tag == b"A" else b"A"),
                                                  name=f"honest-recv-{tag.decode()}", daemon=True))
        for t in self._threads:
            t.start()
        return self

    def _send(self, me, peer: PublicKey, tag: bytes) -> None:
        seq = 0
        period = 1.0 / self.rate
        while not self._stop.is_set():
            seq += 1
            try:
                me.write_to(b"honest:" + tag + struct.pack(">Q", seq) + bytes(100), peer)
            except OSError as e:
                if not self._stop.is_set():
                    self._error(f"{tag.decode()} cannot send: {e!r}")
                return
            self._stop.wait(period)  # the send rate

    def _recv(self, me, peer: PublicKey, tag: bytes) -> None:
        last = 0
        me.settimeout(0.2)
        while not self._stop.is_set():
            try:
                data, src = me.read_from()
            except TimeoutError:
                continue
            except OSError as e:
                if not self._stop.is_set():
                    self._error(f"receiver of {tag.decode()} failed: {e!r}")
                return
            if src != peer:
                with self._lock:
                    self.foreign.setdefault(src, []).append(data)
                continue
            if not data.startswith(b"honest:" + tag) or len(data) != 116:
                self._error(f"bad datagram from the partner: {data[:40]!r}")
                continue
            seq = struct.unpack_from(">Q", data, 8)[0]
            if seq <= last:
                self._error(f"out of order from {tag.decode()}: {seq} after {last}")
            last = seq
            now = time.monotonic()
            with self._lock:
                self.max_gap = max(self.max_gap, now - self._gap_from)
                self._gap_from = now
                self.delivered += 1
                self._lock.notify_all()

    def _error(self, msg: str) -> None:
        with self._lock:
            self.errors.append(msg)
            self._lock.notify_all()

    def reset_gap(self) -> None:
        """Start measuring the longest pause between deliveries from now."""
        with self._lock:
            self.max_gap = 0.0
            self._gap_from = time.monotonic()

    def expect_progress(self, n: int = 50, timeout: float = 10.0, what: str = "") -> int:
        """Wait until `n` more datagrams are delivered (both directions together)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            start = self.delivered
            while self.delivered < start + n:
                if self.errors:
                    raise AssertionError(f"honest pair broke {what}: {self.errors[:3]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"honest pair delivered only {self.delivered - start} of {n} "
                                         f"datagrams in {timeout} s {what}")
                self._lock.wait(left)
            if self.errors:
                raise AssertionError(f"honest pair broke {what}: {self.errors[:3]}")
            return self.delivered

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self.a.close()
        self.b.close()

    def __enter__(self) -> HonestPair:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- abuse

class Slowloris:
    """`n` connections trickling `payload` (default: a never-ending HTTP request head), one
    byte per connection every `interval` seconds, until the relay closes them. Records
    when each was closed."""

    def __init__(self, url: str, n: int, interval: float = 0.05, payload: bytes = TRICKLE_HEAD) -> None:
        self.url, self.n, self.interval, self.payload = url, n, interval, payload
        self.socks: list[socket.socket] = []
        self.opened: list[float] = []
        self.closed_at: dict[int, float] = {}
        self.bytes_sent = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Slowloris:
        for _ in range(self.n):
            s = connect_plain(self.url)
            s.setblocking(False)
            self.socks.append(s)
            self.opened.append(time.monotonic())
        self._thread = threading.Thread(target=self._run, name="slowloris", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        poller = select.poll()
        for s in self.socks:
            poller.register(s, select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLIN)
        by_fd = {s.fileno(): i for i, s in enumerate(self.socks)}
        pos = [0] * len(self.socks)
        while not self._stop.is_set() and len(self.closed_at) < len(self.socks):
            now = time.monotonic()
            for fd, _ in poller.poll(0):
                i = by_fd[fd]
                if i not in self.closed_at:
                    self.closed_at[i] = now
                    poller.unregister(fd)
            for i, s in enumerate(self.socks):
                if i in self.closed_at or pos[i] >= len(self.payload):
                    continue
                try:
                    s.send(self.payload[pos[i]:pos[i] + 1])
                    pos[i] += 1
                    self.bytes_sent[i] += 1
                except BlockingIOError:
                    pass
                except OSError:
                    self.closed_at[i] = now
                    poller.unregister(s)
            self._stop.wait(self.interval)  # the trickle rate

    def wait_all_closed(self, timeout: float) -> list[float]:
        """Seconds from connect to close for every connection; AssertionError if some stay open."""
        assert self._thread is not None
        self._thread.join(timeout)
        if len(self.closed_at) < len(self.socks):
            raise AssertionError(f"{len(self.socks) - len(self.closed_at)} of {len(self.socks)} slowloris "
                                 f"connections still open after {timeout} s")
        return [self.closed_at[i] - self.opened[i] for i in range(len(self.socks))]

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for s in self.socks:
            s.close()


class Flood:
    """A non-reading client (tiny receive buffer) and a properly connected flooder sending it
    60 KB packets as fast as the relay takes them, until stopped."""

    def __init__(self, url: str) -> None:
        self.victim = RawDerpClient(url, rcvbuf=4096)  # never reads again
        self.flooder = RawDerpClient(url)
        self.sent = 0
        self.flooder_error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flood", daemon=True)

    def start(self) -> Flood:
        self._thread.start()
        return self

    def _run(self) -> None:
        chunk = b"".join(F.encode_send_packet(self.victim.public_key, bytes(60000)) for _ in range(16))
        try:
            while not self._stop.is_set():
                self.flooder.send_raw(chunk)
                self.sent += 16
        except OSError as e:
            self.flooder_error = e

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.victim.close()
        self.flooder.close()


def open_abandoned(url: str, n: int) -> list[socket.socket]:
    """`n` connections that go quiet: a third send nothing, a third half a request line, a
    third a whole upgrade request (so they wait in the ClientInfo stage)."""
    socks = []
    for i in range(n):
        s = connect_or_closed(url, timeout=20)
        try:
            if i % 3 == 1:
                s.sendall(b"GET /de")
            elif i % 3 == 2:
                s.sendall(UPGRADE)
        except (ConnectionResetError, BrokenPipeError):
            pass  # a relay at its connection cap closes newcomers at once: still counted below
        socks.append(s)
    return socks


def wait_all_closed_by_peer(socks: list[socket.socket], timeout: float) -> float:
    """Block until the peer has closed (FIN or RST) every socket; returns the seconds taken."""
    t0 = time.monotonic()
    ep = select.epoll(sizehint=len(socks))
    try:
        for s in socks:
            ep.register(s.fileno(), select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR)
        left_fds = {s.fileno() for s in socks}
        deadline = t0 + timeout
        while left_fds:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{len(left_fds)} of {len(socks)} connections not closed by the relay "
                                     f"within {timeout} s")
            for fd, _ in ep.poll(min(left, 1.0), maxevents=4096):
                if fd in left_fds:
                    left_fds.discard(fd)
                    ep.unregister(fd)
        return time.monotonic() - t0
    finally:
        ep.close()


def huge_frame_after_hello(url: str) -> None:
    """A connected client announces a 4 GiB SendPacket; the relay must close it promptly."""
    with RawDerpClient(url) as c:
        c.send_raw(bytes([F.FrameType.SEND_PACKET]) + b"\xff\xff\xff\xff" + bytes(4096))
        wait_reset_or_eof(c.sock, 10)


def huge_client_info(url: str) -> None:
    """A 4 GiB ClientInfo as the first frame."""
    s, _ = upgraded_socket(url)
    with s:
        s.sendall(bytes([F.FrameType.CLIENT_INFO]) + b"\xff\xff\xff\xff" + bytes(4096))
        wait_reset_or_eof(s, 10)


def frames_after_failed_handshake(url: str, target: PublicKey) -> None:
    """A ClientInfo whose box does not open (sealed for another server key), with SendPackets
    to `target` pipelined behind it and written again afterwards: the relay must close,
    and nothing may reach `target`."""
    key = PrivateKey.generate()
    s, _ = upgraded_socket(url)
    with s:
        bad = F.encode_client_info(key.public_key, seal_client_info(key, PrivateKey.generate().public_key))
        smuggled = F.encode_send_packet(target, packet(b"smuggled after a failed hello"))
        s.sendall(bad + smuggled * 20)
        try:
            for _ in range(20):
                s.sendall(smuggled)
        except OSError:
            pass  # already closed: fine
        wait_reset_or_eof(s, 10)


def frames_after_refused_upgrade(url: str, target: PublicKey, wait_close: bool = True) -> None:
    """`GET /derp` without Upgrade (426) followed by DERP frames on the same connection.
    (derper keeps the connection for HTTP keep-alive: pass wait_close=False there.)"""
    s = connect_plain(url)
    with s:
        smuggled = F.encode_send_packet(target, packet(b"smuggled after 426"))
        s.sendall(b"GET /derp HTTP/1.1\r\nHost: x\r\n\r\n" + smuggled * 5)
        head = read_exact(s, 12)
        assert head.startswith(b"HTTP/1.1 426"), head
        if wait_close:
            wait_reset_or_eof(s, 10)


def impersonate(url: str, victim: PublicKey) -> None:
    """ClientInfo claiming `victim`'s key but sealed with the attacker's own private key (the
    box does not open for that key): refused, followed by packets that must go nowhere."""
    attacker = PrivateKey.generate()
    s, server_key = upgraded_socket(url)
    with s:
        forged = F.encode_client_info(victim, seal_client_info(attacker, server_key))
        s.sendall(forged + F.encode_send_packet(victim, packet(b"smuggled by an impostor")))
        wait_reset_or_eof(s, 10)


def honest_impostor(url: str, victim: PublicKey, n: int = 10) -> PublicKey:
    """A properly connected client (its own key) that sends `victim` packets whose bodies
    imitate the honest partner's: they must arrive stamped with the impostor's real key."""
    with RawDerpClient(url) as c:
        for i in range(n):
            c.send(victim, packet(b"honest:A" + struct.pack(">Q", 10**9 + i) + bytes(100)))
        c.sync()
        return c.public_key


def garbage_and_oversized_heads(url: str) -> None:
    """Not HTTP at all; and an HTTP head past the 16 KiB limit: both closed."""
    with connect_plain(url) as s:
        s.sendall(b"\x16\x03\x01\x02\x00" + bytes(500))  # a TLS ClientHello on the plain port
        wait_reset_or_eof(s, 10)
    with connect_plain(url) as s:
        try:
            s.sendall(b"GET /derp HTTP/1.1\r\n" + b"X-Big: " + b"a" * (40 << 10) + b"\r\n")
        except OSError:
            pass
        wait_reset_or_eof(s, 10)


def still_serves(url: str) -> None:
    """A fresh client connects and gets a packet through (to itself and to a second client)."""
    with RawDerpClient(url, timeout=10) as x, RawDerpClient(url, timeout=10) as y:
        x.send(y.public_key, b"fresh")
        got = y.recv_packet(timeout=10)
        assert (got.src, got.data) == (x.public_key, b"fresh")


# ---------------------------------------------------------------- handshake-phase abuse (issue 9)

def scalar_bomb(size: int = 249 << 10) -> bytes:
    """A ClientInfo JSON of about `size` bytes made only of scalar keys (no containers):
    valid, parses, and would be ~15,000 dict entries if the relay kept the JSON."""
    parts, n, i = [b'{"version":2'], 12, 0
    while n < size - 20:
        item = b',"k%d":%d' % (i, i)
        parts.append(item)
        n += len(item)
        i += 1
    return b"".join(parts) + b"}"


def container_bomb(n: int = 85_000) -> bytes:
    """The report's bomb: a ClientInfo holding `n` empty objects (~250 KiB for 85,000)."""
    return b'{"version":2,"x":[' + b"{}," * (n - 1) + b"{}]}"


def deep_nesting(depth: int = 100_000) -> bytes:
    """Nesting that made json.loads raise RecursionError (a traceback per connection)."""
    return b"[" * depth + b"]" * depth


def client_info_with(url: str, info_json: bytes, key: PrivateKey | None = None) -> tuple[socket.socket, bool]:
    """Connect, upgrade and send a ClientInfo sealed (properly, with `key`) around
    `info_json`. Returns the socket and whether the relay accepted it (answered with
    ServerInfo) or closed. The socket is left open either way: the caller holds it."""
    key = key or PrivateKey.generate()
    s, server_key = upgraded_socket(url)
    sealed = seal(key, server_key, info_json)
    s.sendall(F.encode_client_info(key.public_key, sealed))
    s.settimeout(10)
    try:
        head = read_exact(s, 5, timeout=10)
    except (ConnectionError, OSError, EOFError):
        return s, False
    return s, head[0] == F.FrameType.SERVER_INFO


def preauth_frame(url: str, ftype: int, length: int, sent: int | None = None) -> socket.socket:
    """After the upgrade (ServerKey read), a frame of type `ftype` announcing `length` bytes
    instead of the ClientInfo, and `sent` of them (all by default). Returns the socket."""
    s, _ = upgraded_socket(url)
    s.setblocking(False)
    body = bytes([ftype]) + struct.pack(">I", length) + bytes(length if sent is None else sent)
    view = memoryview(body)
    deadline = time.monotonic() + 10
    while view and time.monotonic() < deadline:
        try:
            n = s.send(view)
            view = view[n:]
        except BlockingIOError:
            with selectors.DefaultSelector() as sel:  # not select(): descriptors may be > 1023 here
                sel.register(s, selectors.EVENT_WRITE)
                sel.select(0.1)
        except OSError:
            break  # refused on the header: closed under us
    s.setblocking(True)
    return s
