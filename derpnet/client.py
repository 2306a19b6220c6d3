"""The relay link: one blocking DERP connection to one relay, with its reader thread.

`DerpClient` does the I/O around the sans-IO `ClientConnection`: DNS, TCP, TLS
(`ssl.SSLObject` over `MemoryBIO`, never `SSLSocket`), the HTTP upgrade and the DERP
hello, then one background reader thread that keeps draining the relay.

Threads and locks
-----------------
* Exactly one reader thread per connected link, named ``derpnet-reader-<key>``,
  daemonic. It receives, decrypts, decodes and hands packets to `on_packet` (which must
  not block: derper drops a client it cannot write to for 2 s). It answers server pings.
* Writers may call `send_packet()` from any thread. Writes are serialised by a send lock
  and bounded by `write_timeout`: a relay that stops reading makes the write fail, and
  the link is then dead.
* OpenSSL objects are not safe for a concurrent SSL_read and SSL_write, so the TLS
  object is only touched under a short TLS lock; raw socket recv/send happen outside it.
  TLS records produced while reading (e.g. a KeyUpdate answer) are flushed in order by
  whoever holds the send lock.

Errors (consistent rule)
------------------------
* Transport failures keep their standard Python type and gain the relay URL in the
  message: `socket.gaierror` (name does not resolve), `ConnectionRefusedError` and other
  `OSError`s, `TimeoutError` (the whole connect, DNS+TCP+TLS+HTTP+hello, is bounded by
  `connect_timeout`), `ssl.SSLError` / `ssl.SSLCertVerificationError` (their
  verify_code/verify_message/reason are kept), `ConnectionAbortedError` if `close()` is
  called while connecting.
* DERP failures are `DerpError`s, also with the URL: `UpgradeError` (the server answered
  HTTP but not 101: 200, 404, an HTML page; `.status` is set), `HandshakeError`
  (EOF or a malformed/truncated frame during the handshake, a box that does not open).
* Once connected, a dead link (EOF, reset, 120 s of silence, a write that timed out, a
  failed liveness ping, a protocol error) is reported once through
  `on_close(client, error)` from the reader thread; `send_packet()` on a dead link raises
  `ConnectionResetError`.

Liveness
--------
A relay path that silently stops forwarding (a dead NAT mapping, a black-holing
middlebox: no FIN, no RST) would otherwise only be noticed after `idle_timeout` (120 s,
the relay's keep-alives being 60 s apart) or, for a heavy sender, once the TCP window
fills for `write_timeout`. So while the link is in use it is probed: when we have written
something since the last byte we received and the relay has then been silent for
`ping_after` seconds (5 s), the reader sends a DERP Ping; if nothing at all (the Pong or
any other frame) arrives within `ping_timeout` seconds (5 s, Tailscale's ping wait), the
link is dead (`TimeoutError`) and the owner reconnects. An idle link is never pinged.
Worst case from the last byte received to the verdict: ``ping_after + ping_timeout``
plus a quarter of the smaller of the two (the reader's wake-up period). ``ping_after=None``
disables it.

Frames of unknown type are skipped; KeepAlive, Ping and RecvPacket are handled here;
every other frame (PeerGone, PeerPresent, Health, Restarting, Pong, ...) goes to
`on_event`.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import select
import socket
import ssl
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from . import frames as F
from .connection import ClientConnection, Connected
from .errors import DerpError, HandshakeError, RemoteProtocolError, UpgradeError
from .keys import PrivateKey, PrivateKeyLike, PublicKey, PublicKeyLike

__all__ = ["DerpClient", "RelayAddress", "parse_relay", "DEFAULT_CONNECT_TIMEOUT", "DEFAULT_WRITE_TIMEOUT",
           "DEFAULT_IDLE_TIMEOUT", "DEFAULT_PING_AFTER", "DEFAULT_PING_TIMEOUT"]

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_WRITE_TIMEOUT = 5.0
DEFAULT_IDLE_TIMEOUT = 120.0  # 2 x the relay's keep-alive period, as the Go client
DEFAULT_PING_AFTER = 5.0  # relay silent this long while we send: probe it with a Ping
DEFAULT_PING_TIMEOUT = 5.0  # no frame within this long after the Ping: the link is dead
_RECV_SIZE = 256 << 10
_TLS_READ_SIZE = 64 << 10

PacketCallback = Callable[[PublicKey, bytes], None]
EventCallback = Callable[[object], None]
CloseCallback = Callable[["DerpClient", Optional[BaseException]], None]


# ---------------------------------------------------------------- relay addresses

@dataclass(frozen=True)
class RelayAddress:
    """Where a relay is: `parse_relay()` turns user input into one of these."""

    scheme: str  # "https" or "http"
    host: str  # DNS name or IP literal (no brackets)
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
            return True
        except ValueError:
            return False

    @property
    def _host_for_url(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def host_header(self) -> str:
        default = 443 if self.tls else 80
        return self._host_for_url if self.port == default else f"{self._host_for_url}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self._host_for_url}:{self.port}"

    def __str__(self) -> str:
        return self.url


def parse_relay(relay: "str | RelayAddress") -> RelayAddress:
    """Accept `HOST` (TLS on 443, like the Go tool), `HOST:PORT` (TLS), `https://HOST[:PORT]`
    and `http://HOST[:PORT]` (plain HTTP, dev relays). A path, if any, must be `/derp`."""
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
    if scheme not in ("https", "http"):
        raise ValueError(f"relay {relay!r}: unsupported scheme {parts.scheme!r} (use https:// or http://)")
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
    return RelayAddress(scheme, host, port if port is not None else (443 if scheme == "https" else 80))


# ---------------------------------------------------------------- error helpers

def _with_url(e: BaseException, url: str) -> BaseException:
    """The same kind of error with the relay URL in its message (cause chained by the caller)."""
    if isinstance(e, UpgradeError):
        return UpgradeError(f"relay {url}: {e}", status=e.status)
    if isinstance(e, RemoteProtocolError):
        return HandshakeError(f"relay {url}: protocol error during the handshake: {e}")
    if isinstance(e, DerpError):
        try:
            return type(e)(f"relay {url}: {e}")
        except Exception:
            return HandshakeError(f"relay {url}: {e}")
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


class _Aborted(Exception):
    """close() was called while connecting."""


class _Deadline(Exception):
    """The connect deadline passed."""


# ---------------------------------------------------------------- the link

class DerpClient:
    """One DERP connection to one relay.

    ``DerpClient(relay, key, on_packet=..., ...).connect()`` blocks until the relay's
    ServerInfo has been opened, then starts the reader thread. Callbacks run in the
    reader thread and must not block:

    * ``on_packet(src: PublicKey, data: bytes)`` for every RecvPacket;
    * ``on_event(frame)`` for other frames (PeerGone, Health, Restarting, PeerPresent, Pong, ...);
    * ``on_close(client, error)`` once when the link ends (`error` is None after `close()`).
    """

    def __init__(
        self,
        relay: "str | RelayAddress",
        key: PrivateKeyLike,
        *,
        ssl_context: Optional[ssl.SSLContext] = None,
        connect_timeout: Optional[float] = DEFAULT_CONNECT_TIMEOUT,
        write_timeout: Optional[float] = DEFAULT_WRITE_TIMEOUT,
        idle_timeout: Optional[float] = DEFAULT_IDLE_TIMEOUT,
        ping_after: Optional[float] = DEFAULT_PING_AFTER,
        ping_timeout: float = DEFAULT_PING_TIMEOUT,
        on_packet: Optional[PacketCallback] = None,
        on_event: Optional[EventCallback] = None,
        on_close: Optional[CloseCallback] = None,
        user_agent: str = "derpnet-python",
    ) -> None:
        self.relay = parse_relay(relay)
        self.key = PrivateKey.coerce(key)
        self.public_key = self.key.public_key
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        self.write_timeout = write_timeout
        self.idle_timeout = idle_timeout
        if ping_after is not None and (ping_after <= 0 or ping_timeout <= 0):
            raise ValueError("ping_after and ping_timeout must be positive (ping_after=None disables pings)")
        self.ping_after = ping_after
        self.ping_timeout = ping_timeout
        self.pings_sent = 0  # liveness pings (see the module docstring)
        self._last_tx = 0.0  # time.monotonic() of the last write (liveness)
        self.on_packet = on_packet
        self.on_event = on_event
        self.on_close = on_close
        self._conn = ClientConnection(self.key, self.relay.host_header, user_agent=user_agent)
        self.server_key: Optional[PublicKey] = None
        self.server_info: Dict[str, Any] = {}
        self.restarting: Optional[F.Restarting] = None  # last Restarting frame seen
        self.error: Optional[BaseException] = None  # why the link ended
        self.connected_at: Optional[float] = None  # time.monotonic() of the handshake's end
        self.frames_skipped = 0
        self._sock: Optional[socket.socket] = None
        self._sslobj: Optional[ssl.SSLObject] = None
        self._incoming: Optional[ssl.MemoryBIO] = None
        self._outgoing: Optional[ssl.MemoryBIO] = None
        self._tls_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._tls_out_flag = False  # the reader left TLS records in the outgoing BIO
        self._dead = False
        self._closing = False
        self._started = False
        self._early: List[object] = []  # events that came with the ServerInfo
        self._wake_r: Optional[socket.socket] = None  # interrupts a connect in progress
        self._wake_w: Optional[socket.socket] = None
        self._resolved = threading.Event()
        self._reader: Optional[threading.Thread] = None

    # ------------------------------------------------------------ public

    @property
    def url(self) -> str:
        return self.relay.url

    @property
    def connected(self) -> bool:
        return self._started and not self._dead

    @property
    def reader_thread(self) -> Optional[threading.Thread]:
        return self._reader

    @property
    def uptime(self) -> float:
        return 0.0 if self.connected_at is None else time.monotonic() - self.connected_at

    def __repr__(self) -> str:
        state = "closed" if self._dead else ("connected" if self._started else "new")
        return f"<DerpClient {self.public_key} via {self.url} {state}>"

    def __enter__(self) -> "DerpClient":
        if not self._started:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self, *, start: bool = True) -> "DerpClient":
        """Connect and do the DERP handshake within `connect_timeout`; then start the reader
        (unless `start=False`: call `start()` later; frames wait in the kernel meanwhile)."""
        if self._sock is not None or self._dead:
            raise RuntimeError("DerpClient.connect() can only be called once")
        timeout = self.connect_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        phase = "resolving the name"
        try:
            addrs = self._resolve(deadline)
            phase = "connecting"
            self._tcp_connect(addrs, deadline)
            if self.relay.tls:
                phase = "in the TLS handshake"
                self._tls_handshake(deadline)
            phase = "in the DERP handshake"
            self._derp_handshake(deadline)
        except _Aborted:
            self._abandon()
            raise ConnectionAbortedError(errno.ECONNABORTED, f"relay {self.url}: connect aborted (client closed)") from None
        except _Deadline:
            self._abandon()
            raise TimeoutError(errno.ETIMEDOUT, f"relay {self.url}: timed out after {timeout:g}s {phase}") from None
        except (OSError, DerpError) as e:
            self._abandon()
            raise _with_url(e, self.url) from e
        except BaseException:
            self._abandon()
            raise
        finally:
            self._close_wake()
        with self._state_lock:
            aborted = self._closing
            if not aborted:
                sock = self._sock
                assert sock is not None
                _set_io_timeouts(sock, self._recv_tick(), self.write_timeout)
        if aborted:
            self._abandon()
            raise ConnectionAbortedError(errno.ECONNABORTED, f"relay {self.url}: connect aborted (client closed)")
        self.connected_at = time.monotonic()
        log.debug("connected to relay %s as %s (server key %s)", self.url, self.public_key, self.server_key)
        if start:
            self.start()
        return self

    def start(self) -> bool:
        """Start the reader thread (after `connect(start=False)`); False if close() came first."""
        with self._state_lock:
            if self._closing:
                return False
            if self._started or self._sock is None:
                raise RuntimeError("start() needs a connected, not yet started client")
            self._started = True
            t = threading.Thread(target=self._run, name=f"derpnet-reader-{self.public_key.b64()[:8]}", daemon=True)
            t.start()
            self._reader = t
        return True

    def send_packet(self, dst: PublicKeyLike, *parts: bytes, lock_timeout: Optional[float] = None) -> None:
        """Send one SendPacket frame; `parts` are concatenated (at most 65,536 bytes in all).

        Blocks at most `lock_timeout` for other writers (then `TimeoutError`, nothing sent)
        and `write_timeout` for the relay to take the bytes. `ConnectionResetError` if the
        link is (or becomes) dead.
        """
        if type(dst) is not PublicKey:
            dst = PublicKey.coerce(dst)
        self._write(F.encode_send_packet(dst, *parts), lock_timeout)

    def send_packets(self, packets: Sequence[Tuple[PublicKey, Sequence[bytes]]],
                     lock_timeout: Optional[float] = None) -> None:
        """Send several SendPacket frames in one write (one syscall): [(dst, parts), ...]."""
        encode = F.encode_send_packet
        frames = [encode(dst, *parts) for dst, parts in packets]
        if frames:
            self._write(frames[0] if len(frames) == 1 else b"".join(frames), lock_timeout)

    def send_ping(self, data: bytes) -> None:
        """Send a Ping (8 bytes); the relay's Pong arrives through `on_event`."""
        self._write(F.encode_ping(data), None)

    def note_preferred(self, preferred: bool) -> None:
        self._write(F.encode_note_preferred(preferred), None)

    def close(self) -> None:
        """Close the link (idempotent). Aborts a connect in progress; joins the reader thread
        unless called from it."""
        with self._state_lock:
            self._closing = True
            wake = self._wake_w
        self._resolved.set()
        if wake is not None:  # connecting: connect() sees _closing and cleans up itself
            try:
                wake.send(b"x")
            except OSError:
                pass
            return
        self._shutdown(None)
        with self._state_lock:
            t = self._reader
        if t is not None and t is not threading.current_thread():
            t.join()
        elif t is None:
            self._final_close()

    # ------------------------------------------------------------ connect steps

    def _check_abort(self) -> None:
        if self._closing:
            raise _Aborted()

    def _remaining(self, deadline: Optional[float]) -> Optional[float]:
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Deadline()
        return left

    def _wait(self, sock: socket.socket, write: bool, deadline: Optional[float]) -> None:
        """Wait until `sock` is ready, the deadline passes (_Deadline) or close() is called (_Aborted)."""
        assert self._wake_r is not None
        while True:
            self._check_abort()
            left = self._remaining(deadline)
            if write:
                r, w, _ = select.select([self._wake_r], [sock], [], left)
            else:
                r, w, _ = select.select([sock, self._wake_r], [], [], left)
            self._check_abort()
            if w or (r and self._wake_r not in r):
                return

    def _resolve(self, deadline: Optional[float]) -> Sequence[Tuple[Any, ...]]:
        host, port = self.relay.host, self.relay.port
        if self.relay.is_ip:
            return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        # getaddrinfo() has no timeout: run it aside so the connect timeout covers DNS.
        result: List[Any] = []
        done = threading.Event()

        def resolve() -> None:
            try:
                result.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
            except BaseException as e:  # handed to the waiting thread
                result.append(e)
            done.set()
            self._resolved.set()

        threading.Thread(target=resolve, name="derpnet-resolve", daemon=True).start()
        self._resolved.wait(self._remaining(deadline))
        self._check_abort()
        if not done.is_set():
            raise _Deadline()
        if isinstance(result[0], BaseException):
            e = result[0]
            if isinstance(e, socket.gaierror):
                raise socket.gaierror(e.errno, f"cannot resolve {host!r}: {e.strerror}")
            raise e
        return result[0]

    def _tcp_connect(self, addrs: Sequence[Tuple[Any, ...]], deadline: Optional[float]) -> None:
        last: Optional[OSError] = None
        for i, (family, stype, proto, _, sockaddr) in enumerate(addrs):
            self._check_abort()
            sock = socket.socket(family, stype, proto)
            try:
                sock.setblocking(False)
                with self._state_lock:
                    self._sock = sock
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
                    except _Deadline:
                        if deadline is not None and time.monotonic() >= deadline:
                            raise
                        raise TimeoutError(errno.ETIMEDOUT, f"TCP connect to {sockaddr[0]} timed out") from None
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, os.strerror(err))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return
            except OSError as e:
                last = e
                with self._state_lock:
                    self._sock = None
                sock.close()
            except BaseException:
                with self._state_lock:
                    self._sock = None
                sock.close()
                raise
        if last is None:
            raise OSError(errno.EHOSTUNREACH, "no addresses to connect to")
        raise last

    def _tls_handshake(self, deadline: Optional[float]) -> None:
        ctx = self.ssl_context
        if ctx is None:
            ctx = ssl.create_default_context()  # system roots, no ALPN (as Go's client)
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._sslobj = ctx.wrap_bio(self._incoming, self._outgoing, server_side=False,
                                    server_hostname=self.relay.host)
        while True:
            try:
                self._sslobj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._send_connect(self._outgoing.read(), deadline)
                data = self._recv_connect(deadline)
                if not data:
                    raise ConnectionResetError(errno.ECONNRESET, "relay closed the connection during the TLS handshake")
                self._incoming.write(data)
        self._send_connect(self._outgoing.read(), deadline)
        if self._sslobj.selected_alpn_protocol() == "h2":
            raise UpgradeError("TLS negotiated HTTP/2 (ALPN h2); DERP needs HTTP/1.1: "
                               "do not offer h2 in the ssl_context")

    def _send_connect(self, data: bytes, deadline: Optional[float]) -> None:
        sock = self._sock
        assert sock is not None
        view = memoryview(data)
        while view:
            self._wait(sock, True, deadline)
            try:
                n = sock.send(view)
            except (BlockingIOError, InterruptedError):
                continue
            view = view[n:]

    def _recv_connect(self, deadline: Optional[float]) -> bytes:
        sock = self._sock
        assert sock is not None
        while True:
            self._wait(sock, False, deadline)
            try:
                return sock.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                continue

    def _read_plain_connect(self, deadline: Optional[float]) -> bytes:
        if self._sslobj is None:
            return self._recv_connect(deadline)
        assert self._incoming is not None
        while True:
            try:
                return self._sslobj.read(_TLS_READ_SIZE)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                return b""
            data = self._recv_connect(deadline)
            if not data:
                self._incoming.write_eof()
                try:
                    return self._sslobj.read(_TLS_READ_SIZE)
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError, ssl.SSLWantReadError):
                    return b""
            self._incoming.write(data)

    def _write_connect(self, plain: bytes, deadline: Optional[float]) -> None:
        if self._sslobj is None:
            self._send_connect(plain, deadline)
            return
        assert self._outgoing is not None
        self._sslobj.write(plain)
        self._send_connect(self._outgoing.read(), deadline)

    def _derp_handshake(self, deadline: Optional[float]) -> None:
        conn = self._conn
        self._write_connect(conn.initiate(), deadline)
        while True:
            data = self._read_plain_connect(deadline)
            if not data:
                conn.receive_eof()  # raises HandshakeError
                raise HandshakeError("relay closed the connection during the handshake")
            events = conn.receive_data(data)
            out = conn.data_to_send()
            if out:
                self._write_connect(out, deadline)
            for i, ev in enumerate(events):
                if isinstance(ev, Connected):
                    self.server_key = ev.server_key
                    self.server_info = ev.server_info
                    self._early = list(events[i + 1:])
                    return

    def _close_wake(self) -> None:
        with self._state_lock:
            r, w = self._wake_r, self._wake_w
            self._wake_r = self._wake_w = None
        for s in (r, w):
            if s is not None:
                s.close()

    def _abandon(self) -> None:
        with self._state_lock:
            self._dead = True
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    # ------------------------------------------------------------ steady state

    def _dead_error(self) -> ConnectionResetError:
        cause = self.error
        why = f": {cause}" if cause is not None else " (closed)"
        return ConnectionResetError(errno.ECONNRESET, f"relay link to {self.url} is down{why}")

    def _write(self, data: bytes, lock_timeout: Optional[float]) -> None:
        if self._dead or self._sock is None:
            raise self._dead_error()
        lock = self._send_lock
        if lock_timeout is None:
            lock.acquire()
        elif not lock.acquire(timeout=max(lock_timeout, 0.0)):
            raise TimeoutError(errno.ETIMEDOUT, "timed out waiting for other writers on the relay link")
        try:
            if self._dead:
                raise self._dead_error()
            sock = self._sock
            assert sock is not None
            self._last_tx = time.monotonic()
            if self._sslobj is not None:
                with self._tls_lock:
                    self._sslobj.write(data)
                    data = self._outgoing.read()  # type: ignore[union-attr]
                    self._tls_out_flag = False
            try:
                sock.sendall(data)
            except (BlockingIOError, socket.timeout):  # SO_SNDTIMEO, or the settimeout() fallback
                err = TimeoutError(errno.ETIMEDOUT, f"relay {self.url} did not take {len(data)} bytes within "
                                   f"{self.write_timeout}s (it stopped reading)")
                self._shutdown(err)
                raise self._dead_error() from err
            except OSError as e:
                self._shutdown(e)
                raise self._dead_error() from e
        finally:
            lock.release()
        if self._tls_out_flag:
            self._flush_tls()

    def _flush_tls(self) -> None:
        """Send TLS records the reader produced, if no writer is doing it right now (the
        writer holding the send lock checks the flag again after releasing it)."""
        while self._tls_out_flag and self._send_lock.acquire(blocking=False):
            try:
                with self._tls_lock:
                    out = self._outgoing.read()  # type: ignore[union-attr]
                    self._tls_out_flag = False
                if out and not self._dead:
                    try:
                        self._sock.sendall(out)  # type: ignore[union-attr]
                    except OSError as e:
                        self._shutdown(e)
                        return
            finally:
                self._send_lock.release()

    def _shutdown(self, err: Optional[BaseException]) -> None:
        """Mark the link dead and wake the reader (the reader closes the socket)."""
        with self._state_lock:
            if not self._dead:
                self._dead = True
                if err is not None and self.error is None:
                    self.error = err
            sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _final_close(self) -> None:
        with self._send_lock:
            with self._state_lock:
                sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _decrypt(self, data: bytes) -> Tuple[List[bytes], bool]:
        chunks: List[bytes] = []
        eof = False
        sslobj = self._sslobj
        assert sslobj is not None and self._incoming is not None and self._outgoing is not None
        with self._tls_lock:
            self._incoming.write(data)
            while True:
                try:
                    chunk = sslobj.read(_TLS_READ_SIZE)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    eof = True
                    break
                if not chunk:
                    eof = True
                    break
                chunks.append(chunk)
            if self._outgoing.pending:
                self._tls_out_flag = True
        if self._tls_out_flag:
            self._flush_tls()
        return chunks, eof

    def _run(self) -> None:
        err: Optional[BaseException] = None
        try:
            if self._early and not self._dead:
                early, self._early = self._early, []
                self._dispatch(early)
            self._loop()
        except BaseException as e:  # the link is dead either way; report why
            err = e
        with self._state_lock:
            closing = self._closing
            if err is not None and not closing and self.error is None:
                self.error = err
            err = None if closing else self.error
        self._shutdown(err)
        self._final_close()
        if err is not None:
            log.info("relay link %s ended: %s", self.url, err)
        cb = self.on_close
        if cb is not None:
            try:
                cb(self, err)
            except Exception:
                log.exception("on_close callback failed")

    def _recv_tick(self) -> Optional[float]:
        """The reader's recv timeout: how often a silent link is checked (idle, liveness)."""
        bounds = [t for t in (self.idle_timeout,) if t]
        if self.ping_after:
            bounds.append(min(self.ping_after, self.ping_timeout) / 4)
        return min(bounds) if bounds else None

    def _loop(self) -> None:
        sock = self._sock
        if sock is None:  # closed between connect() and start()
            return
        conn = self._conn
        tls = self._sslobj is not None
        idle = self.idle_timeout
        ping_after, ping_timeout = self.ping_after, self.ping_timeout
        ping_sent: Optional[float] = None  # an unanswered liveness ping
        last_rx = time.monotonic()
        recv = sock.recv
        while not self._dead:
            try:
                data = recv(_RECV_SIZE)
            except (BlockingIOError, socket.timeout):  # SO_RCVTIMEO, or the settimeout() fallback
                now = time.monotonic()
                if idle and now - last_rx >= idle:
                    raise TimeoutError(errno.ETIMEDOUT, f"no frames from relay {self.url} for {idle:g}s") from None
                if ping_after:
                    if ping_sent is not None:
                        if now - ping_sent >= ping_timeout:
                            raise TimeoutError(errno.ETIMEDOUT, f"relay {self.url} did not answer a ping within "
                                               f"{ping_timeout:g}s (silent for {now - last_rx:.1f}s while we "
                                               "were sending)") from None
                    elif self._last_tx > last_rx and now - last_rx >= ping_after:
                        ping_sent = now
                        self.pings_sent += 1
                        log.debug("relay %s silent for %.1fs while we send: pinging it", self.url, now - last_rx)
                        self._write(self._conn.ping(os.urandom(8)), None)
                continue
            if not data:
                if self._dead:
                    return
                raise ConnectionResetError(errno.ECONNRESET, f"relay {self.url} closed the connection")
            last_rx = time.monotonic()
            ping_sent = None  # any frame proves the path (the Pong, or anything else)
            if tls:
                chunks, eof = self._decrypt(data)
                for chunk in chunks:
                    self._dispatch(conn.receive_data(chunk))
                if eof:
                    if self._dead:
                        return
                    raise ConnectionResetError(errno.ECONNRESET, f"relay {self.url} closed the TLS session")
            else:
                self._dispatch(conn.receive_data(data))
            out = conn.data_to_send()  # pongs
            if out:
                self._write(out, None)

    def _dispatch(self, events: List[object]) -> None:
        on_packet = self.on_packet
        for ev in events:
            t = type(ev)
            if t is F.RecvPacket:
                if on_packet is not None:
                    try:
                        on_packet(ev.src, ev.data)  # type: ignore[attr-defined]
                    except Exception:
                        log.exception("on_packet callback failed")
                continue
            if t is F.KeepAlive or t is F.Ping:
                continue  # pongs are queued by ClientConnection and flushed by the loop
            if t is F.UnknownFrame:
                self.frames_skipped += 1
                log.debug("skipped unknown frame type 0x%02x (%d bytes)", ev.type, ev.length)  # type: ignore[attr-defined]
                continue
            if t is F.Restarting:
                self.restarting = ev  # type: ignore[assignment]
            cb = self.on_event
            if cb is not None:
                try:
                    cb(ev)
                except Exception:
                    log.exception("on_event callback failed")


def _set_io_timeouts(sock: socket.socket, recv_timeout: Optional[float], send_timeout: Optional[float]) -> None:
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
