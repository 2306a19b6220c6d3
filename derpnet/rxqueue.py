"""`ReceiveQueue`: PacketConn's bounded queue of received datagrams, with Go-style deadlines.

Layer: datagrams. Reader threads `put()` (never blocking: drop-oldest when full, counted);
callers `take()` with a read deadline (absolute `time.time()`), a per-call timeout
(`settimeout`, 0 = non-blocking) or both. The write deadline lives here too, so that one
place answers "how long may this call wait".
"""

from __future__ import annotations

import errno
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .keys import PublicKey

__all__ = ["ReceiveQueue", "ShortBufferError", "closed_error"]


class ShortBufferError(OSError):
    """A datagram does not fit in the `bufsize` given to read_from(); it stays queued."""

    def __init__(self, size: int, bufsize: int) -> None:
        super().__init__(errno.EMSGSIZE, f"datagram of {size} bytes does not fit in bufsize {bufsize} "
                                         "(it stays queued: read again with a larger bufsize)")
        self.size = size
        self.bufsize = bufsize


def closed_error() -> OSError:
    return OSError(errno.EBADF, "PacketConn is closed")


class ReceiveQueue:
    """Received (data, sender) pairs, at most `size`; deadlines and receive counters."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("queue_size must be at least 1")
        self.size = size
        self.cond = threading.Condition(threading.Lock())
        self.items: deque[tuple[bytes, PublicKey]] = deque()
        self.closed = False
        self.read_deadline: float | None = None
        self.write_deadline: float | None = None
        self.timeout: float | None = None
        self.packets_in = self.bytes_in = 0
        self.drop_queue_full = self.drop_bad_framing = 0

    def put(self, data: bytes, src: PublicKey) -> None:
        """Queue a datagram (a reader thread; never blocks): drop the oldest when full."""
        with self.cond:
            q = self.items
            if len(q) >= self.size:
                q.popleft()
                self.drop_queue_full += 1
            q.append((data, src))
            self.packets_in += 1
            self.bytes_in += len(data)
            self.cond.notify()

    def count(self, nbytes: int) -> None:
        """A datagram handed to an on_packet callback instead of the queue."""
        with self.cond:
            self.packets_in += 1
            self.bytes_in += nbytes

    def take(self, bufsize: int, dead: Callable[[], BaseException | None]) -> tuple[bytes, PublicKey]:
        """The next datagram; TimeoutError, BlockingIOError, ShortBufferError, EBADF, or
        ConnectionResetError when `dead()` says the link is gone for good."""
        start = time.monotonic()
        with self.cond:
            while True:
                if self.closed:
                    raise closed_error()
                q = self.items
                if q:
                    item = q[0]
                    size = len(item[0])
                    if size > bufsize:
                        raise ShortBufferError(size, bufsize)
                    q.popleft()
                    return item
                err = dead()
                if err is not None:
                    raise ConnectionResetError(errno.ECONNRESET, f"relay link is down: {err}")
                timeout = self.timeout
                left = self._time_left(self.read_deadline, timeout, start)
                if left is not None and left <= 0:
                    if timeout == 0.0 and self.read_deadline is None:
                        raise BlockingIOError(errno.EAGAIN, "no datagram queued")
                    raise TimeoutError(errno.ETIMEDOUT, "read deadline exceeded")
                self.cond.wait(left)

    def take_batch(self, limit: int, dead: Callable[[], BaseException | None]) -> list[tuple[bytes, PublicKey]]:
        """The next datagram (waiting as `take`, whatever its size) and every other one already
        queued, up to `limit` in all: a reader that processes packets in batches wakes up
        once per batch rather than once per packet."""
        batch = [self.take(1 << 30, dead)]
        with self.cond:
            q = self.items
            for _ in range(min(limit - 1, len(q))):
                batch.append(q.popleft())
        return batch

    def counters(self) -> dict[str, Any]:
        with self.cond:
            return {"packets_in": self.packets_in, "bytes_in": self.bytes_in, "queued": len(self.items),
                    "drops": {"queue_full": self.drop_queue_full, "bad_framing": self.drop_bad_framing}}

    def close(self) -> bool:
        """Close and wake every reader; False if it was already closed."""
        with self.cond:
            if self.closed:
                return False
            self.closed = True
            self.items.clear()
            self.cond.notify_all()
            return True

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def set_read_deadline(self, t: float | None) -> None:
        with self.cond:
            self.read_deadline = None if t is None else float(t)
            self.cond.notify_all()

    def settimeout(self, seconds: float | None) -> None:
        if seconds is not None:
            seconds = float(seconds)
            if seconds < 0:
                raise ValueError("timeout must be non-negative or None")
        with self.cond:
            self.timeout = seconds
            self.cond.notify_all()

    def write_wait(self) -> float | None:
        """How long a write may wait for other writers (None: no bound); TimeoutError if
        the write deadline passed."""
        wd, to = self.write_deadline, self.timeout
        if wd is None and to is None:
            return None
        lock_timeout = None
        if wd is not None:
            lock_timeout = wd - time.time()
            if lock_timeout <= 0:
                raise TimeoutError(errno.ETIMEDOUT, "write deadline exceeded")
        if to is not None:
            lock_timeout = to if lock_timeout is None else min(lock_timeout, to)
        return lock_timeout

    @staticmethod
    def _time_left(deadline: float | None, timeout: float | None, start: float) -> float | None:
        left = None
        if deadline is not None:
            left = deadline - time.time()
        if timeout is not None:
            t = timeout - (time.monotonic() - start)
            left = t if left is None else min(left, t)
        return left
