"""A minimal blocking DERP client for server tests: a raw socket driving our sans-IO
`ClientConnection`. Deliberately independent of derpnet.client (tests the relay, not the client).

Every read has a deadline; nothing here sleeps.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections import deque
from typing import TypeVar
from urllib.parse import urlsplit

from derpnet import frames as F
from derpnet.connection import ClientConnection, Connected, Hello, Upgrade
from derpnet.http11 import build_request
from derpnet.keys import PrivateKey, PublicKey

T = TypeVar("T")


def split_url(url: str) -> tuple[str, int, bool]:
    """(host, port, tls) of an http(s):// relay URL."""
    u = urlsplit(url)
    tls = u.scheme == "https"
    return u.hostname or "127.0.0.1", u.port or (443 if tls else 80), tls


def dial(url: str, *, ssl_context: ssl.SSLContext | None = None, timeout: float = 5.0,
         rcvbuf: int | None = None) -> socket.socket:
    """A connected (and, for https, TLS-wrapped) socket to the relay at `url`.

    `rcvbuf` shrinks the receive buffer (set before connecting) for slow-reader tests.
    """
    host, port, tls = split_url(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1" if host == "localhost" else host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls:
        ctx = ssl_context or ssl.create_default_context()
        sock = ctx.wrap_socket(sock, server_hostname=host)
    return sock


def fast_start_request(host: str) -> bytes:
    """The Go clients' upgrade request with `Derp-Fast-Start: 1`."""
    return build_request("GET", "/derp", [("Host", host), ("User-Agent", "test"), ("Connection", "Upgrade"),
                                          ("Derp-Fast-Start", "1"), ("Upgrade", "DERP")])


def http_get(url: str, path: str, *, method: str = "GET", headers=(), ssl_context=None,
             timeout: float = 5.0) -> bytes:
    """Send one HTTP request (`Connection: close`) and return the whole response."""
    host, _, _ = split_url(url)
    with dial(url, ssl_context=ssl_context, timeout=timeout) as s:
        s.sendall(build_request(method, path, [("Host", host), ("Connection", "close"), *headers]))
        return read_to_eof(s, timeout)


def read_to_eof(s: socket.socket, timeout: float = 5.0, limit: int = 1 << 20) -> bytes:
    """Everything until the peer closes (EOF or reset), within `timeout`."""
    deadline = time.monotonic() + timeout
    out = bytearray()
    while len(out) < limit:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"peer did not close within {timeout}s (got {bytes(out[:200])!r})")
        s.settimeout(left)
        try:
            b = s.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            break
        if not b:
            break
        out += b
    return bytes(out)


def wait_closed(s: socket.socket, timeout: float = 5.0) -> bool:
    """True once the peer has closed the connection (EOF or RST), draining what it sent."""
    read_to_eof(s, timeout, limit=1 << 62)
    return True


class RawDerpClient:
    """One DERP connection: handshake on construction, then blocking frame I/O with deadlines."""

    def __init__(self, url: str, key: PrivateKey | None = None, *, fast_start: bool = False,
                 ssl_context: ssl.SSLContext | None = None, timeout: float = 5.0,
                 rcvbuf: int | None = None, client_info: dict | None = None) -> None:
        self.url = url
        self.key = key or PrivateKey.generate()
        self.timeout = timeout
        host, _, _ = split_url(url)
        self.sock = dial(url, ssl_context=ssl_context, timeout=timeout, rcvbuf=rcvbuf)
        self.conn = ClientConnection(self.key, host, client_info=client_info)  # e.g. with a meshKey
        self.pending: deque[object] = deque()
        self.closed = False
        self.sock.sendall(self.conn.send(Upgrade(fast_start)))
        self.connected: Connected = self._wait_connected()

    @property
    def public_key(self) -> PublicKey:
        """Our own public key."""
        return self.key.public_key

    def _wait_connected(self) -> Connected:
        deadline = time.monotonic() + self.timeout
        while True:
            for i, ev in enumerate(self.pending):
                if isinstance(ev, Connected):
                    del self.pending[i]
                    return ev
            self._read_some(deadline)

    def _read_some(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no frame from the relay in time")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            raise TimeoutError("no frame from the relay in time") from None
        if not data:
            self.closed = True
            raise ConnectionError("relay closed the connection")
        events = self.conn.receive_data(data)
        out = []
        for ev in events:  # answer the ServerKey with our ClientInfo, and the relay's pings
            if isinstance(ev, F.ServerKey):
                out.append(self.conn.send(Hello()))
                events.extend(self.conn.receive_data(b""))
            elif isinstance(ev, F.Ping):
                out.append(self.conn.send(ev.response()))
            if not isinstance(ev, F.ServerKey):
                self.pending.append(ev)
        if out:
            self.sock.sendall(b"".join(out))

    # -- sending
    def send(self, dst: PublicKey, data: bytes) -> None:
        """SendPacket(dst, data)."""
        self.sock.sendall(self.conn.send(F.SendPacket(dst, data)))

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (hand-made frames)."""
        self.sock.sendall(data)

    def ping(self, data: bytes = b"12345678") -> None:
        """Ping the relay."""
        self.sock.sendall(F.encode_ping(data))

    # -- receiving
    def recv_frame(self, timeout: float | None = None) -> object:
        """The next decoded frame (KeepAlives included)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self.pending:
            self._read_some(deadline)
        return self.pending.popleft()

    def recv(self, kind: type[T], timeout: float | None = None) -> T:
        """The next frame of type `kind`, skipping KeepAlives; any other frame is an error."""
        while True:
            ev = self.recv_frame(timeout)
            if isinstance(ev, kind):
                return ev
            if not isinstance(ev, F.KeepAlive):
                raise AssertionError(f"expected {kind.__name__}, got {ev!r}")

    def recv_packet(self, timeout: float | None = None) -> F.RecvPacket:
        """The next RecvPacket (KeepAlives skipped)."""
        return self.recv(F.RecvPacket, timeout)

    def sync(self, data: bytes = b"syncsync", timeout: float | None = None) -> list:
        """Ping and read up to the Pong: returns the frames the relay sent before it (KeepAlives dropped).

        The relay handles a client's frames in order and writes the Pong behind whatever is
        already queued for the client (while that is under its 128 KiB batch), so frames
        sent to us because of anything before the Ping arrive before the Pong.
        """
        self.ping(data)
        before = []
        while True:
            ev = self.recv_frame(timeout)
            if isinstance(ev, F.Pong) and ev.data == data:
                return before
            if not isinstance(ev, F.KeepAlive):
                before.append(ev)

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """True once the relay has closed us."""
        return wait_closed(self.sock, timeout)

    def close(self) -> None:
        """Close the socket."""
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawDerpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_exact(s: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    """Exactly `n` bytes, or raise (EOF or timeout)."""
    deadline = time.monotonic() + timeout
    out = bytearray()
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"got {len(out)} of {n} bytes")
        s.settimeout(left)
        b = s.recv(n - len(out))
        if not b:
            raise ConnectionError(f"EOF after {len(out)} of {n} bytes: {bytes(out[:100])!r}")
        out += b
    return bytes(out)


def wait_until(predicate, timeout: float = 5.0, what: str = "condition"):
    """Poll `predicate` (e.g. on relay stats) until it returns something truthy; raise on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        time.sleep(0.01)
