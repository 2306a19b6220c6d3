"""An in-memory relay and PacketConn with the same interface as derpnet's, for
unit tests of derpquic that should not depend on sockets, and for fault injection
(loss, outages, a man in the middle rewriting addresses)."""

from __future__ import annotations

import errno
import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from derpnet.keys import PrivateKey, PublicKey
from derpnet.paths import RELAY_PATH_MTU, PathChanged

MAX_DATAGRAM = 65535


class FakeRelay:
    """Delivers datagrams between FakePacketConns by destination key.

    `latency`: one-way delay in seconds (delivered by one scheduler thread).
    `drop(src, dst, data) -> bool`: drop a datagram when it is sent (loss, outage).
    `lose(src, dst, data) -> bool`: drop a datagram when it would be delivered (in flight).
    `rewrite(src, dst) -> (deliver_to, as_src) | None`: a malicious relay's routing.
    """

    def __init__(self, *, latency: float = 0.0, queue_size: int = 512) -> None:
        self.latency = latency
        self.queue_size = queue_size
        self.drop: Callable[[PublicKey, PublicKey, bytes], bool] | None = None
        self.lose: Callable[[PublicKey, PublicKey, bytes], bool] | None = None
        self.rewrite: Callable[[PublicKey, PublicKey], tuple | None] | None = None
        self.down = False
        self._lock = threading.Lock()
        self._conns: dict[PublicKey, FakePacketConn] = {}
        self._sched: list = []
        self._seq = itertools.count()
        self._sched_cond = threading.Condition(self._lock)
        self._closed = False
        self._thread: threading.Thread | None = None
        self.delivered = 0
        self.dropped = 0

    def listen_packet(self, key=None) -> FakePacketConn:
        priv = PrivateKey.generate() if key is None else PrivateKey.coerce(key)
        pc = FakePacketConn(self, priv)
        with self._lock:
            self._conns[pc.local_addr()] = pc
        return pc

    def _unregister(self, pc: FakePacketConn) -> None:
        with self._lock:
            if self._conns.get(pc.local_addr()) is pc:
                del self._conns[pc.local_addr()]

    def _send(self, src: PublicKey, dst: PublicKey, data: bytes) -> None:
        if self.down or (self.drop is not None and self.drop(src, dst, data)):
            self.dropped += 1
            return
        if self.rewrite is not None:
            r = self.rewrite(src, dst)
            if r is not None:
                dst, src = r
        if self.latency <= 0:
            self._deliver(src, dst, data)
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._scheduler, name="fake-relay-latency", daemon=True)
                self._thread.start()
            heapq.heappush(self._sched, (time.monotonic() + self.latency, next(self._seq), src, dst, data))
            self._sched_cond.notify()

    def _deliver(self, src: PublicKey, dst: PublicKey, data: bytes) -> None:
        with self._lock:
            pc = self._conns.get(dst)
        if pc is None or (self.lose is not None and self.lose(src, dst, data)):
            self.dropped += 1
            return
        self.delivered += 1
        pc._enqueue(data, src)

    def _scheduler(self) -> None:
        with self._lock:
            while not self._closed:
                if not self._sched:
                    self._sched_cond.wait()
                    continue
                t = self._sched[0][0]
                now = time.monotonic()
                if t > now:
                    self._sched_cond.wait(t - now)
                    continue
                _, _, src, dst, data = heapq.heappop(self._sched)
                self._lock.release()
                try:
                    self._deliver(src, dst, data)
                finally:
                    self._lock.acquire()

    @contextmanager
    def frozen(self) -> Iterator[list[int]]:
        """Hold every delivery (and send) while inside; yields the sizes of the datagrams
        in flight (sent, not yet delivered: only with latency)."""
        with self._lock:
            yield [len(item[4]) for item in self._sched]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._sched_cond.notify_all()
            conns = list(self._conns.values())
        for pc in conns:
            pc.close()


class FakePacketConn:
    """derpnet.PacketConn's interface: write_to, read_from, set_read_deadline, local_addr, close,
    add/remove_event_listener; and the direct-path hooks path_mtu / note_peer_verified
    (`set_path` plays the path layer: it changes a peer's MTU and emits PathChanged)."""

    def __init__(self, relay: FakeRelay, key: PrivateKey) -> None:
        self._relay = relay
        self._key = key
        self._addr = key.public_key
        self._cond = threading.Condition()
        self._queue: deque = deque()
        self._deadline: float | None = None
        self._closed = False
        self._listeners: list[Callable[[object], None]] = []
        self._mtus: dict[PublicKey, int] = {}
        self.verified: list[PublicKey] = []  # note_peer_verified() calls, in order

    def add_event_listener(self, callback: Callable[[object], None]) -> None:
        self._listeners.append(callback)

    def remove_event_listener(self, callback: Callable[[object], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def emit(self, event: object) -> None:
        for cb in list(self._listeners):
            cb(event)

    def path_mtu(self, peer: PublicKey) -> int:
        return self._mtus.get(PublicKey.coerce(peer), RELAY_PATH_MTU)

    def set_path(self, peer: PublicKey, mtu: int, addr: tuple[str, int] | None = ("192.0.2.1", 41641)) -> None:
        """The path to `peer` changed: now carries `mtu`-byte datagrams (emits PathChanged)."""
        peer = PublicKey.coerce(peer)
        self._mtus[peer] = mtu
        self.emit(PathChanged(peer, None if mtu == RELAY_PATH_MTU else addr, mtu))

    def note_peer_verified(self, peer: PublicKey) -> None:
        self.verified.append(peer)

    @property
    def private_key(self) -> PrivateKey:
        return self._key

    def local_addr(self) -> PublicKey:
        return self._addr

    def write_to(self, data: bytes, addr) -> int:
        if len(data) > MAX_DATAGRAM:
            raise ValueError("datagram too large")
        if self._closed:
            raise OSError(errno.EBADF, "closed")
        self._relay._send(self._addr, PublicKey.coerce(addr), bytes(data))
        return len(data)

    def _enqueue(self, data: bytes, src: PublicKey) -> None:
        with self._cond:
            if self._closed:
                return
            if len(self._queue) >= self._relay.queue_size:
                self._queue.popleft()
            self._queue.append((data, src))
            self._cond.notify()

    def read_from(self, bufsize: int = 65536):
        with self._cond:
            while True:
                if self._closed:
                    raise OSError(errno.EBADF, "closed")
                if self._queue:
                    return self._queue.popleft()
                if self._deadline is not None:
                    left = self._deadline - time.time()
                    if left <= 0:
                        raise TimeoutError(errno.ETIMEDOUT, "read deadline exceeded")
                    self._cond.wait(left)
                else:
                    self._cond.wait()

    def set_read_deadline(self, t: float | None) -> None:
        with self._cond:
            self._deadline = t
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._relay._unregister(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AddressRewriter:
    """Wraps a PacketConn so that it talks to `impostor` whenever it thinks it talks to
    `victim` (outgoing to victim -> to impostor; incoming from impostor -> from victim):
    exactly what a malicious relay can do to one client. Works on a real PacketConn."""

    def __init__(self, inner, victim: PublicKey, impostor: PublicKey) -> None:
        self._inner = inner
        self._victim = PublicKey.coerce(victim)
        self._impostor = PublicKey.coerce(impostor)

    def write_to(self, data, addr):
        addr = PublicKey.coerce(addr)
        return self._inner.write_to(data, self._impostor if addr == self._victim else addr)

    def read_from(self, bufsize: int = 65536):
        data, src = self._inner.read_from(bufsize)
        return data, (self._victim if src == self._impostor else src)

    def set_read_deadline(self, t):
        self._inner.set_read_deadline(t)

    def local_addr(self):
        return self._inner.local_addr()

    def close(self):
        self._inner.close()

    @property
    def private_key(self):
        return getattr(self._inner, "private_key", None) or getattr(self._inner, "_key", None)
