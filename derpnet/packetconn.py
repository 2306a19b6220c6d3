"""`PacketConn`: datagrams addressed by public key through one DERP relay, like Go's net.PacketConn.

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

Throughput: `write_batch([(data, addr), ...])` sends several datagrams in one write (one
syscall, one TLS pass): use it when several are ready (a QUIC flush). `stats()` counts
packets/bytes in/out, drops by reason (queue_full, bad_framing, offline), reconnects and
PeerGone frames.

Threads: none of its own. Each relay link has one reader thread
("derpnet-reader-<key>"); after a link dies, that same thread runs the reconnect loop
and exits once the new link (with its own reader) is up. `close()` joins them all.
"""

from __future__ import annotations

import errno
import logging
import random
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from . import frames as F
from .client import (DEFAULT_CONNECT_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_PING_AFTER, DEFAULT_PING_TIMEOUT,
                     DEFAULT_WRITE_TIMEOUT, DerpClient, RelayAddress, parse_relay)
from .keys import PrivateKey, PrivateKeyLike, PublicKey, PublicKeyLike

__all__ = ["listen_packet", "PacketConn", "ShortBufferError", "LinkUp", "LinkDown", "MAX_DATAGRAM_SIZE",
           "DEFAULT_QUEUE_SIZE", "backoff_delay"]

log = logging.getLogger(__name__)

MAX_DATAGRAM_SIZE = F.MAX_PACKET_SIZE - 1  # 65,535: one byte goes to the 0x00 framing
DEFAULT_QUEUE_SIZE = 512
_FRAMING = b"\x00"
_RESET_AFTER = 1.0  # a link that lived this long resets the backoff


class ShortBufferError(OSError):
    """A datagram does not fit in the `bufsize` given to read_from(); it stays queued."""

    def __init__(self, size: int, bufsize: int) -> None:
        super().__init__(errno.EMSGSIZE, f"datagram of {size} bytes does not fit in bufsize {bufsize} "
                                         "(it stays queued: read again with a larger bufsize)")
        self.size = size
        self.bufsize = bufsize


@dataclass(frozen=True)
class LinkUp:
    """on_event: a relay link is up (generation 1 = the first connect)."""

    server_key: PublicKey
    generation: int


@dataclass(frozen=True)
class LinkDown:
    """on_event: the relay link ended; a reconnect follows unless the conn is closed."""

    error: Optional[BaseException]


def backoff_delay(failures: int, rng: Callable[[], float] = random.random) -> float:
    """Tailscale's reconnect delay: min(n² × 10 ms, 5 s) × uniform[0.5, 1.5)."""
    base = min(failures * failures * 0.010, 5.0)
    return base * (0.5 + rng())


def _closed_error() -> OSError:
    return OSError(errno.EBADF, "PacketConn is closed")


def listen_packet(relay: "str | RelayAddress", key: Optional[PrivateKeyLike] = None, **options: Any) -> "PacketConn":
    """Connect to `relay` with `key` (None: a fresh key) and return a `PacketConn`.

    `relay`: a hostname (TLS on 443, as the Go tool), ``https://host:port`` or
    ``http://host:port``. Options: see `PacketConn`. Raises if the first connect fails.
    """
    return PacketConn(relay, key, **options)


class PacketConn:
    """A datagram endpoint whose address is our public key (Go's net.PacketConn).

    Options: ``ssl_context`` (custom CAs), ``connect_timeout`` (10 s, DNS to DERP hello),
    ``write_timeout`` (5 s; a relay that takes no bytes for that long is dead),
    ``idle_timeout`` (120 s of silence = dead), ``ping_after``/``ping_timeout`` (5 s/5 s: a
    relay silent for ping_after while we send gets a DERP Ping, and no answer within
    ping_timeout = dead, so a black-holed path is left after ~10 s, not 120; None
    disables; see derpnet.client "Liveness"), ``queue_size`` (512 received datagrams,
    drop-oldest), ``reconnect`` (True), ``on_event(event)`` (LinkUp, LinkDown and relay
    frames: frames.PeerGone, frames.Health, frames.Restarting, frames.PeerPresent...;
    runs in the reader thread, must not block), ``on_packet(data, src)`` (instead of the
    queue: every datagram is handed to it in the reader thread; must not block).
    """

    def __init__(
        self,
        relay: "str | RelayAddress",
        key: Optional[PrivateKeyLike] = None,
        *,
        ssl_context: Optional[ssl.SSLContext] = None,
        connect_timeout: Optional[float] = DEFAULT_CONNECT_TIMEOUT,
        write_timeout: Optional[float] = DEFAULT_WRITE_TIMEOUT,
        idle_timeout: Optional[float] = DEFAULT_IDLE_TIMEOUT,
        ping_after: Optional[float] = DEFAULT_PING_AFTER,
        ping_timeout: float = DEFAULT_PING_TIMEOUT,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        reconnect: bool = True,
        on_event: Optional[Callable[[object], None]] = None,
        on_packet: Optional[Callable[[bytes, PublicKey], None]] = None,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self._relay = parse_relay(relay)
        self._key = PrivateKey.generate() if key is None else PrivateKey.coerce(key)
        self._addr = self._key.public_key
        self._client_opts: Dict[str, Any] = dict(ssl_context=ssl_context, connect_timeout=connect_timeout,
                                                 write_timeout=write_timeout, idle_timeout=idle_timeout,
                                                 ping_after=ping_after, ping_timeout=ping_timeout)
        self._queue_size = queue_size
        self._reconnect = reconnect
        self._on_event = on_event
        self._listeners: Tuple[Callable[[object], None], ...] = ()  # add_event_listener()
        self._on_packet_cb = on_packet

        self._cond = threading.Condition(threading.Lock())  # queue, state, deadlines, receive counters
        self._queue: "deque[Tuple[bytes, PublicKey]]" = deque()
        self._closed = False
        self._dead: Optional[BaseException] = None  # reconnect=False and the link died
        self._link: Optional[DerpClient] = None
        self._pending: Optional[DerpClient] = None  # a reconnect attempt in progress
        self._old_readers: List[threading.Thread] = []  # readers of dead links (reconnecting, or ending)
        self._closing = threading.Event()
        self._generation = 0
        self._failures = 0
        self._read_deadline: Optional[float] = None
        self._write_deadline: Optional[float] = None
        self._timeout: Optional[float] = None
        self._health = ""

        self._stats_lock = threading.Lock()  # send-side counters (writers run in any thread)
        self._packets_in = self._bytes_in = 0
        self._packets_out = self._bytes_out = 0
        self._drop_queue_full = self._drop_bad_framing = self._drop_offline = 0
        self._reconnects = 0
        self._peer_gone = 0

        client = self._new_client()
        client.connect(start=False)  # raises: no silent retry at start
        self._install(client)

    # ------------------------------------------------------------ net.PacketConn

    def local_addr(self) -> PublicKey:
        """Our address: the public key of our private key."""
        return self._addr

    @property
    def relay_url(self) -> str:
        return self._relay.url

    def write_to(self, data: bytes, addr: PublicKeyLike) -> int:
        """Send one datagram (≤ 65,535 bytes) to `addr` (PublicKey, 32 bytes or any text form).

        Returns len(data). Dropped silently (counted) while the relay link is down; see the
        module docstring. Raises ValueError (too big), TimeoutError (write deadline),
        OSError EBADF (closed), ConnectionResetError (reconnect=False and the link died).
        """
        n = len(data) if type(data) is bytes else memoryview(data).nbytes
        if n > MAX_DATAGRAM_SIZE:
            raise ValueError(f"datagram of {n} bytes exceeds the maximum of {MAX_DATAGRAM_SIZE}")
        if self._closed:
            raise _closed_error()
        dst = addr if type(addr) is PublicKey else PublicKey.coerce(addr)
        lock_timeout = self._write_lock_timeout() if (self._write_deadline is not None
                                                      or self._timeout is not None) else None
        link = self._link
        if link is not None:
            try:
                link.send_packet(dst, _FRAMING, data, lock_timeout=lock_timeout)
            except ConnectionError:
                link = None  # died under us: the reader reconnects; this datagram is lost
            except TimeoutError:
                raise TimeoutError(errno.ETIMEDOUT, "write timed out waiting for other writers") from None
            else:
                with self._stats_lock:
                    self._packets_out += 1
                    self._bytes_out += n
                return n
        self._offline_drop(1)
        return n

    def _write_lock_timeout(self) -> Optional[float]:
        """How long a write may wait for other writers; TimeoutError if the write deadline passed."""
        lock_timeout = None
        wd, to = self._write_deadline, self._timeout
        if wd is not None:
            lock_timeout = wd - time.time()
            if lock_timeout <= 0:
                raise TimeoutError(errno.ETIMEDOUT, "write deadline exceeded")
        if to is not None:
            lock_timeout = to if lock_timeout is None else min(lock_timeout, to)
        return lock_timeout

    def _offline_drop(self, count: int) -> int:
        if self._closed:
            raise _closed_error()
        if self._dead is not None:
            raise ConnectionResetError(errno.ECONNRESET, f"relay link is down: {self._dead}")
        with self._stats_lock:
            self._drop_offline += count
        return count

    def write_batch(self, datagrams: Iterable[Tuple[bytes, PublicKeyLike]]) -> int:
        """Send several datagrams [(data, addr), ...] in one write to the relay (one syscall,
        one TLS record run): much cheaper per datagram than write_to() in a loop. Same
        rules as write_to(); all are checked before any is sent. Returns the number sent
        (or dropped while offline)."""
        items: List[Tuple[PublicKey, Tuple[bytes, bytes]]] = []
        total = 0
        for data, addr in datagrams:
            n = len(data) if type(data) is bytes else memoryview(data).nbytes
            if n > MAX_DATAGRAM_SIZE:
                raise ValueError(f"datagram of {n} bytes exceeds the maximum of {MAX_DATAGRAM_SIZE}")
            items.append((addr if type(addr) is PublicKey else PublicKey.coerce(addr), (_FRAMING, data)))
            total += n
        if self._closed:
            raise _closed_error()
        if not items:
            return 0
        lock_timeout = self._write_lock_timeout()
        link = self._link
        if link is not None:
            try:
                link.send_packets(items, lock_timeout=lock_timeout)
            except ConnectionError:
                link = None
            except TimeoutError:
                raise TimeoutError(errno.ETIMEDOUT, "write timed out waiting for other writers") from None
            else:
                with self._stats_lock:
                    self._packets_out += len(items)
                    self._bytes_out += total
                return len(items)
        return self._offline_drop(len(items))

    def read_from(self, bufsize: int = 65536) -> Tuple[bytes, PublicKey]:
        """Block for the next datagram: (payload, sender's PublicKey).

        Raises TimeoutError at the read deadline / timeout, ShortBufferError if the datagram
        is larger than `bufsize` (it stays queued), OSError EBADF once closed.
        """
        data, src = self._take(bufsize)
        return data[1:], src

    def read_from_into(self, buffer: Any) -> Tuple[int, PublicKey]:
        """Like read_from(), into a writable buffer: (nbytes, sender). ShortBufferError if too small."""
        view = memoryview(buffer).cast("B")
        data, src = self._take(len(view))
        n = len(data) - 1
        view[:n] = memoryview(data)[1:]
        return n, src

    def close(self) -> None:
        """Close (idempotent): wakes blocked readers, closes the relay link, joins its threads."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            link, pending = self._link, self._pending
            self._link = None
            self._queue.clear()
            self._cond.notify_all()
        self._closing.set()
        if pending is not None:
            pending.close()
        if link is not None:
            link.close()
        with self._cond:
            threads = list(self._old_readers)
        for t in threads:
            if t is not threading.current_thread():
                t.join()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "PacketConn":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        elif self._link is not None:
            state = "connected"
        elif self._dead is not None:
            state = "dead"
        else:
            state = "reconnecting"
        return f"<PacketConn {self._addr} via {self._relay.url} {state}>"

    # ------------------------------------------------------------ deadlines

    def set_deadline(self, t: Optional[float]) -> None:
        """Read and write deadline: absolute time.time() seconds, or None for none."""
        self.set_read_deadline(t)
        self.set_write_deadline(t)

    def set_read_deadline(self, t: Optional[float]) -> None:
        """Read deadline (absolute time.time() seconds, None clears); wakes blocked readers."""
        with self._cond:
            self._read_deadline = None if t is None else float(t)
            self._cond.notify_all()

    def set_write_deadline(self, t: Optional[float]) -> None:
        self._write_deadline = None if t is None else float(t)

    def settimeout(self, seconds: Optional[float]) -> None:
        """Per-call timeout for read_from/write_to, as socket.settimeout (None = block)."""
        if seconds is not None:
            seconds = float(seconds)
            if seconds < 0:
                raise ValueError("timeout must be non-negative or None")
        with self._cond:
            self._timeout = seconds
            self._cond.notify_all()

    def gettimeout(self) -> Optional[float]:
        return self._timeout

    # ------------------------------------------------------------ observation

    @property
    def connected(self) -> bool:
        return self._link is not None

    @property
    def generation(self) -> int:
        """Number of successful relay connections so far (1 after listen_packet)."""
        return self._generation

    def wait_connected(self, timeout: Optional[float] = None, *, min_generation: int = 1) -> bool:
        """Wait until a relay link of generation ≥ `min_generation` is up; False on timeout or close."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not (self._link is not None and self._generation >= min_generation):
                if self._closed or self._dead is not None:
                    return False
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return True

    @property
    def health(self) -> str:
        """The relay's last Health problem text ("" = healthy)."""
        return self._health

    @property
    def server_key(self) -> Optional[PublicKey]:
        link = self._link
        return link.server_key if link is not None else None

    def stats(self) -> Dict[str, Any]:
        with self._cond:
            d: Dict[str, Any] = {
                "packets_in": self._packets_in, "bytes_in": self._bytes_in, "queued": len(self._queue),
                "reconnects": self._reconnects, "peer_gone": self._peer_gone, "connected": self._link is not None,
            }
            bad = self._drop_bad_framing
            qfull = self._drop_queue_full
        with self._stats_lock:
            d["packets_out"] = self._packets_out
            d["bytes_out"] = self._bytes_out
            d["drops"] = {"queue_full": qfull, "bad_framing": bad, "offline": self._drop_offline}
        return d

    # ------------------------------------------------------------ internals

    @staticmethod
    def _time_left(deadline: Optional[float], timeout: Optional[float], start: float) -> Optional[float]:
        left = None
        if deadline is not None:
            left = deadline - time.time()
        if timeout is not None:
            t = timeout - (time.monotonic() - start)
            left = t if left is None else min(left, t)
        return left

    def _take(self, bufsize: int) -> Tuple[bytes, PublicKey]:
        start = time.monotonic()
        with self._cond:
            while True:
                if self._closed:
                    raise _closed_error()
                q = self._queue
                if q:
                    item = q[0]
                    size = len(item[0]) - 1
                    if size > bufsize:
                        raise ShortBufferError(size, bufsize)
                    q.popleft()
                    return item
                if self._dead is not None:
                    raise ConnectionResetError(errno.ECONNRESET, f"relay link is down: {self._dead}")
                timeout = self._timeout
                left = self._time_left(self._read_deadline, timeout, start)
                if left is not None and left <= 0:
                    if timeout == 0.0 and self._read_deadline is None:
                        raise BlockingIOError(errno.EAGAIN, "no datagram queued")
                    raise TimeoutError(errno.ETIMEDOUT, "read deadline exceeded")
                self._cond.wait(left)

    def _new_client(self) -> DerpClient:
        return DerpClient(self._relay, self._key, on_packet=self._on_packet, on_event=self._on_frame,
                          on_close=self._on_link_closed, **self._client_opts)

    def _install(self, client: DerpClient) -> bool:
        """Make a connected client the current link and start its reader; False if closed."""
        with self._cond:
            if self._closed:
                ok = False
            else:
                ok = True
                self._link = client
                self._generation += 1
                gen = self._generation
                self._cond.notify_all()
        if not ok or not client.start():  # close() came first
            client.close()
            return False
        assert client.server_key is not None
        self._emit(LinkUp(client.server_key, gen))
        return True

    def add_event_listener(self, callback: Callable[[object], None]) -> None:
        """Also deliver link and relay events (LinkUp, LinkDown, PeerGone, Health, ...) to
        `callback`, besides the `on_event` option; layers above (the QUIC driver) use it.
        Callbacks run on a relay reader thread and must not block."""
        with self._cond:
            self._listeners += (callback,)

    def remove_event_listener(self, callback: Callable[[object], None]) -> None:
        with self._cond:
            self._listeners = tuple(cb for cb in self._listeners if cb is not callback)

    def _emit(self, event: object) -> None:
        for cb in (self._on_event, *self._listeners):
            if cb is None:
                continue
            try:
                cb(event)
            except Exception:
                log.exception("on_event callback failed")

    def _on_packet(self, src: PublicKey, data: bytes) -> None:
        # The reader thread's hot path: never blocks, never raises.
        if not data or data[0] != 0:
            with self._cond:
                self._drop_bad_framing += 1
            log.debug("dropped a packet from %s without the 0x00 framing byte (%d bytes)", src, len(data))
            return
        cb = self._on_packet_cb
        if cb is not None:
            with self._cond:
                self._packets_in += 1
                self._bytes_in += len(data) - 1
            try:
                cb(data[1:], src)
            except Exception:
                log.exception("on_packet callback failed")
            return
        with self._cond:
            q = self._queue
            if len(q) >= self._queue_size:
                q.popleft()
                self._drop_queue_full += 1
            q.append((data, src))
            self._packets_in += 1
            self._bytes_in += len(data) - 1
            self._cond.notify()

    def _on_frame(self, ev: object) -> None:
        t = type(ev)
        if t is F.PeerGone:
            with self._cond:
                self._peer_gone += 1
            log.debug("relay: peer %s gone (reason %d)", ev.key, ev.reason)  # type: ignore[attr-defined]
        elif t is F.Health:
            problem = ev.problem  # type: ignore[attr-defined]
            if problem:
                log.warning("relay %s health problem: %s", self._relay.url, problem)
            elif self._health:
                log.info("relay %s healthy again", self._relay.url)
            self._health = problem
        elif t is F.Restarting:
            log.info("relay %s is restarting: reconnect in %.3gs, try for %.3gs", self._relay.url,
                     ev.reconnect_in, ev.try_for)  # type: ignore[attr-defined]
        self._emit(ev)

    def _on_link_closed(self, client: DerpClient, err: Optional[BaseException]) -> None:
        # Runs in the dead link's reader thread, which then runs the reconnect loop.
        with self._cond:
            if client is not self._link:
                return
            self._link = None
            closed = self._closed
            if not closed and not self._reconnect:
                self._dead = err or ConnectionResetError(errno.ECONNRESET, "relay link closed")
            self._cond.notify_all()
            if not closed:  # close() joins it: it runs the reconnect loop, or just ends
                self._old_readers = [t for t in self._old_readers if t.is_alive()]
                self._old_readers.append(threading.current_thread())
        self._emit(LinkDown(err))
        if closed or not self._reconnect:
            if not closed:
                log.warning("relay link to %s lost: %s (reconnect disabled)", self._relay.url, err)
            return
        if client.uptime >= _RESET_AFTER:
            self._failures = 0
        self._failures += 1
        restarting = client.restarting
        delay = restarting.reconnect_in if restarting is not None else backoff_delay(self._failures)
        log.warning("relay link to %s lost: %s; reconnecting in %.3fs", self._relay.url, err, delay)
        self._reconnect_loop(delay)  # close() joins this thread (self._old_readers)

    def _reconnect_loop(self, delay: float) -> None:
        while True:
            if self._closing.wait(delay):
                return
            client = self._new_client()
            with self._cond:
                if self._closed:
                    return
                self._pending = client
            try:
                client.connect(start=False)
            except Exception as e:
                with self._cond:
                    self._pending = None
                    if self._closed:
                        return
                self._failures += 1
                delay = backoff_delay(self._failures)
                log.warning("reconnecting to relay %s failed: %s; next try in %.3fs", self._relay.url, e, delay)
                continue
            with self._cond:
                self._pending = None
                self._reconnects += 1
            if self._install(client):
                log.info("reconnected to relay %s", self._relay.url)
            return
