"""Reaching a relay: its address, DNS, TCP and TLS within one deadline, abortable.

Layer: relay link (what Tailscale's derphttp does in dialURL/dialNode and tlsClient).
`parse_relay()` turns user input into a `RelayAddress`; a `Dialer` resolves the name,
connects (Go's per-address share of the deadline), runs the TLS handshake on a
`TLSSession` and then moves the DERP handshake's plaintext, every wait bounded by the
one deadline and cut short by `abort()` from another thread. Errors keep their standard
type; `with_relay_url()` puts the relay URL in their message.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import selectors
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .errors import DerpError, UpgradeError
from .http11 import parse_response_head
from .proxy import check_connect_response, connect_request, proxy_for
from .tlsbio import TLSSession

__all__ = ["RelayAddress", "parse_relay", "Dialer", "with_relay_url", "set_io_timeouts", "RECV_SIZE"]

RECV_SIZE = 256 << 10
AddrInfo = tuple[Any, ...]
_T = TypeVar("_T")


@dataclass(frozen=True)
class RelayAddress:
    """Where a relay is: `parse_relay()` turns user input into one of these."""

    scheme: str  # "https" or "http"
    host: str  # DNS name or IP literal (no brackets)
    port: int
    websocket: bool = False  # DERP over WebSocket (a wss:// or ws:// URL)

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def is_ip(self) -> bool:
        return _is_ip(self.host)

    @property
    def host_in_url(self) -> str:
        """The host as written in a URL or a Host header (IPv6 literals bracketed)."""
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def host_header(self) -> str:
        default = 443 if self.tls else 80
        return self.host_in_url if self.port == default else f"{self.host_in_url}:{self.port}"

    @property
    def url(self) -> str:
        scheme = ("wss" if self.tls else "ws") if self.websocket else self.scheme
        return f"{scheme}://{self.host_in_url}:{self.port}"

    def __str__(self) -> str:
        return self.url


def parse_relay(relay: str | RelayAddress) -> RelayAddress:
    """Accept `HOST` (TLS on 443, like the Go tool), `HOST:PORT` (TLS), `https://HOST[:PORT]`
    and `http://HOST[:PORT]` (plain HTTP, dev relays), `wss://` and `ws://` for DERP over
    WebSocket. A path, if any, must be `/derp`."""
    if isinstance(relay, RelayAddress):
        return relay
    if not isinstance(relay, str):
        raise TypeError(f"relay must be a hostname or URL string, not {type(relay).__name__}")
    text = relay.strip()
    if not text:
        raise ValueError("relay: empty hostname")
    if "://" not in text:
        if text.count(":") > 1 and not text.startswith("["):
            text = f"[{text}]"  # a bare IPv6 literal
        text = "https://" + text
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    websocket = scheme in ("wss", "ws")
    scheme = {"wss": "https", "ws": "http"}.get(scheme, scheme)
    if scheme not in ("https", "http"):
        raise ValueError(f"relay {relay!r}: unsupported scheme {parts.scheme!r} "
                         "(use https://, http://, or wss:// / ws:// for DERP over WebSocket)")
    if parts.path not in ("", "/", "/derp") or parts.query or parts.fragment:
        raise ValueError(f"relay {relay!r}: only the path /derp is supported")
    if parts.username or parts.password:
        raise ValueError(f"relay {relay!r}: credentials in the URL are not supported")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"relay {relay!r}: invalid port") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"relay {relay!r}: no hostname")
    return RelayAddress(scheme, host, port if port is not None else (443 if scheme == "https" else 80), websocket)


def with_relay_url(e: BaseException, url: str) -> BaseException:
    """The same kind of error with the relay URL in its message (cause chained by the caller)."""
    if isinstance(e, UpgradeError):
        return UpgradeError(f"relay {url}: {e}", status=e.status)
    if isinstance(e, DerpError):
        try:
            return type(e)(f"relay {url}: {e}")
        except Exception:
            return e
    if isinstance(e, OSError):
        text = e.strerror if e.strerror else (str(e) or type(e).__name__)
        if isinstance(e, ssl.SSLCertVerificationError) and getattr(e, "verify_message", None):
            text = f"certificate verify failed: {e.verify_message} ({e.reason or 'SSL'})"
        msg = f"relay {url}: {text}"
        try:
            new = type(e)(e.errno, msg) if e.errno is not None else type(e)(msg)
        except Exception:
            return OSError(e.errno, msg)
        for k, v in getattr(e, "__dict__", {}).items():  # ssl: library, reason, verify_code, ...
            try:
                setattr(new, k, v)
            except Exception:
                pass
        return new
    return e


class _DeadlinePassed(Exception):
    """The overall deadline passed (turned into TimeoutError at the public methods)."""


class Dialer:
    """One attempt to reach a relay: every step waits at most until `deadline`
    (time.monotonic(), None for no limit) and ends with ConnectionAbortedError once
    `abort()` is called from another thread. Use it from one thread; `close()` it."""

    def __init__(self, relay: RelayAddress, timeout: float | None) -> None:
        self.relay = relay
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.phase = "resolving the name"  # for the timeout message
        self.sock: socket.socket | None = None
        self.tls: TLSSession | None = None
        self.aborted = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._resolved = threading.Event()
        self._lock = threading.Lock()
        #: The HTTP proxy the environment names for this relay (proxy.py), None: direct.
        self.proxy = proxy_for(relay.scheme, relay.host, relay.port)

    def abort(self) -> None:
        """Make the step in progress (and every later one) fail at once; any thread."""
        with self._lock:
            self.aborted = True
            if self._wake_w.fileno() >= 0:
                try:
                    self._wake_w.send(b"x")
                except OSError:
                    pass
        self._resolved.set()

    def close(self) -> None:
        """Close the wake-up pair (the socket, if any, now belongs to the caller)."""
        with self._lock:
            self._wake_r.close()
            self._wake_w.close()

    def take(self) -> tuple[socket.socket, TLSSession | None]:
        """The connected socket and its TLS session, now the caller's."""
        sock, self.sock = self.sock, None
        assert sock is not None
        return sock, self.tls

    def close_socket(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()

    # ------------------------------------------------------------ steps

    def connect(self) -> socket.socket:
        """Resolve and connect (TCP_NODELAY set); the socket stays in `self.sock`."""
        return self._guard(self._connect)

    def start_tls(self, context: ssl.SSLContext | None) -> None:
        """The client side of a TLS handshake on the connected socket; `send` and `read`
        then go through it."""
        self.phase = "in the TLS handshake"
        self.tls = self._guard(self._start_tls, context)

    def send(self, data: bytes) -> None:
        """Send plaintext (encrypted after `start_tls`)."""
        self._guard(self._send_all, data if self.tls is None else self.tls.encrypt(data))

    def read(self) -> bytes:
        """The next plaintext bytes, b"" at the end (answering TLS as needed)."""
        return self._guard(self._read)

    # ------------------------------------------------------------ inside

    def _guard(self, fn: Callable[..., _T], *args: Any) -> _T:
        try:
            return fn(*args)
        except _DeadlinePassed:
            raise TimeoutError(errno.ETIMEDOUT, f"timed out after {self.timeout:g}s {self.phase}") from None

    def _check_abort(self) -> None:
        if self.aborted:
            raise ConnectionAbortedError(errno.ECONNABORTED, "connect aborted (client closed)")

    def _remaining(self, deadline: float | None) -> float | None:
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise _DeadlinePassed()
        return left

    def _wait(self, sock: socket.socket, write: bool, deadline: float | None) -> None:
        """Wait until `sock` is ready, the deadline passes or abort() is called."""
        # A selector (epoll/poll), not select(): select() fails on descriptors above 1023,
        # which a busy process (a relay client among many sockets) easily has.
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ)
            sel.register(sock, selectors.EVENT_WRITE if write else selectors.EVENT_READ)
            while True:
                self._check_abort()
                ready = sel.select(self._remaining(deadline))
                self._check_abort()
                if any(key.fileobj is sock for key, _ in ready):
                    return

    def _resolve(self, host: str, port: int) -> list[AddrInfo]:
        if _is_ip(host):
            return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        # getaddrinfo() has no timeout: run it aside so the deadline covers DNS.
        result: list[Any] = []
        done = threading.Event()

        def resolve() -> None:
            try:
                result.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
            except BaseException as e:  # handed to the waiting thread
                result.append(e)
            done.set()
            self._resolved.set()

        threading.Thread(target=resolve, name="derpnet-resolve", daemon=True).start()
        self._resolved.wait(self._remaining(self.deadline))
        self._check_abort()
        if not done.is_set():
            raise _DeadlinePassed()
        if isinstance(result[0], BaseException):
            e = result[0]
            if isinstance(e, socket.gaierror):
                raise socket.gaierror(e.errno, f"cannot resolve {host!r}: {e.strerror}")
            raise e
        addrs: list[AddrInfo] = result[0]
        return addrs

    def _connect(self) -> socket.socket:
        proxy = self.proxy
        if proxy is None:
            return self._connect_to(self.relay.host, self.relay.port)
        sock = self._connect_to(proxy.host, proxy.port)
        self.phase = f"in the CONNECT through HTTP proxy {proxy.url}"
        host, port = self.relay.host, self.relay.port
        self._send_all(connect_request(host, port, proxy))
        buf = bytearray()
        while (parsed := parse_response_head(buf)) is None:
            data = self._recv()
            if not data:
                raise ConnectionResetError(errno.ECONNRESET, f"HTTP proxy {proxy.url} closed the connection "
                                           f"before answering CONNECT to {host}:{port}")
            buf += data
        resp, used = parsed
        check_connect_response(resp, proxy, host, port)
        if used != len(buf):
            raise ConnectionError(errno.EPROTO, f"HTTP proxy {proxy.url} sent bytes behind its CONNECT answer")
        return sock

    def _connect_to(self, host: str, port: int) -> socket.socket:
        addrs = self._resolve(host, port)
        self.phase = "connecting"
        deadline = self.deadline
        last: OSError | None = None
        for i, (family, stype, proto, _, sockaddr) in enumerate(addrs):
            self._check_abort()
            sock = self.sock = socket.socket(family, stype, proto)
            try:
                sock.setblocking(False)
                rc = sock.connect_ex(sockaddr)
                if rc not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
                    raise OSError(rc, os.strerror(rc))  # OSError picks the subclass (ConnectionRefusedError...)
                if rc != 0:
                    per_addr = deadline
                    left = len(addrs) - i
                    if deadline is not None and left > 1:
                        # leave time for the other addresses, but at least 1.5 s each (as Go)
                        per_addr = min(deadline, time.monotonic() + max(1.5, (deadline - time.monotonic()) / left))
                    try:
                        self._wait(sock, True, per_addr)
                    except _DeadlinePassed:
                        if deadline is not None and time.monotonic() >= deadline:
                            raise
                        raise TimeoutError(errno.ETIMEDOUT, f"TCP connect to {sockaddr[0]} timed out") from None
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, os.strerror(err))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except OSError as e:
                last = e
                self.close_socket()
            except BaseException:
                self.close_socket()
                raise
        if last is None:
            raise OSError(errno.EHOSTUNREACH, "no addresses to connect to")
        raise last

    def _start_tls(self, context: ssl.SSLContext | None) -> TLSSession:
        if context is None:
            context = ssl.create_default_context()  # system roots, no ALPN (as Go's client)
        tls = TLSSession(context, server_side=False, server_hostname=self.relay.host)
        while not tls.start():
            self._send_all(tls.pending())
            data = self._recv()
            if not data:
                raise ConnectionResetError(errno.ECONNRESET, "relay closed the connection during the TLS handshake")
            tls.receive(data)
        self._send_all(tls.pending())
        if tls.alpn_protocol == "h2":
            raise UpgradeError("TLS negotiated HTTP/2 (ALPN h2); DERP needs HTTP/1.1: "
                               "do not offer h2 in the ssl_context")
        return tls

    def _read(self) -> bytes:
        tls = self.tls
        if tls is None:
            return self._recv()
        data = b""  # first, whatever the TLS handshake left decrypted
        while True:
            plain = tls.receive(data)
            if tls.has_pending:
                self._send_all(tls.pending())
            if plain or tls.closed_by_peer:
                return plain
            data = self._recv()
            if not data:
                return b""

    def _send_all(self, data: bytes) -> None:
        sock = self.sock
        assert sock is not None
        view = memoryview(data)
        while view:
            self._wait(sock, True, self.deadline)
            try:
                n = sock.send(view)
            except (BlockingIOError, InterruptedError):
                continue
            view = view[n:]

    def _recv(self) -> bytes:
        sock = self.sock
        assert sock is not None
        while True:
            self._wait(sock, False, self.deadline)
            try:
                return sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                continue


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def set_io_timeouts(sock: socket.socket, recv_timeout: float | None, send_timeout: float | None) -> None:
    """Bound the steady-state recv (idleness) and send (a relay that stops reading).

    Where the OS has SO_RCVTIMEO/SO_SNDTIMEO the socket stays in blocking mode and the
    kernel enforces them (a timeout shows as BlockingIOError): one syscall per recv/send
    instead of poll()+recv. SO_SNDTIMEO bounds the time without progress of each send().
    Elsewhere, settimeout() (poll-based; TimeoutError) is the fallback.
    """
    sock.setblocking(True)
    if sys.platform.startswith(("linux", "darwin", "freebsd")):
        try:
            for opt, t in ((socket.SO_RCVTIMEO, recv_timeout), (socket.SO_SNDTIMEO, send_timeout)):
                t = t or 0.0
                sec = int(t)
                sock.setsockopt(socket.SOL_SOCKET, opt, struct.pack("@ll", sec, int((t - sec) * 1e6)))
            return
        except OSError:
            pass
    bound = [t for t in (recv_timeout, send_timeout) if t]
    sock.settimeout(min(bound) if bound else None)
