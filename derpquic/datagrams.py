"""QUIC DATAGRAM frames (RFC 9221) between derpnet peers: unreliable, unordered, never
retransmitted, but encrypted and authenticated like the streams of the same connection.

Both sides ask for them with `datagrams=True` (the max_datagram_frame_size transport
parameter); a Go derpquic peer never does, so a channel to it is refused. A Dialer opens
a `DatagramChannel` to a peer (`Dialer.datagram_channel`); a Listener gets one with each
datagram a peer sends. `recv_datagram()` on either returns (data, channel), answers go
out with `channel.send()`.

Limits: a datagram larger than `channel.max_size` (what a packet of the connection
carries, minus the framing) raises ValueError; at most `datagram_queue` datagrams wait for
room in the congestion window (more are dropped and counted, `send()` returns False);
at most `datagram_queue` received datagrams wait for `recv_datagram()` (the oldest is
dropped).
"""

from __future__ import annotations

import errno
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from derpnet.keys import PublicKey

if TYPE_CHECKING:
    from .conn import Conn

__all__ = ["DatagramChannel", "DatagramInbox", "channel_for"]


class DatagramChannel:
    """One connection's DATAGRAM frames: `send(data)`, the peer's key, `max_size`."""

    def __init__(self, conn: Conn) -> None:
        self._conn = conn
        self.sent = 0
        self.dropped = 0  # the send queue was full

    def remote_addr(self) -> PublicKey:
        return self._conn.peer

    @property
    def peer_key(self) -> PublicKey | None:
        """The peer's key if it proved it (always, for a channel: Go peers have none)."""
        return self._conn.peer if self._conn.authenticated else None

    @property
    def closed(self) -> bool:
        return self._conn.closed

    @property
    def max_size(self) -> int:
        """The largest datagram send() takes now."""
        with self._conn.lock:
            return self._conn.quic.datagram_room

    def _check_open(self) -> None:
        conn = self._conn
        if conn.closed:
            why = conn.error or ConnectionResetError(errno.ECONNRESET, "connection closed")
            raise ConnectionResetError(errno.ECONNRESET, str(why))

    def send(self, data: bytes) -> bool:
        """Queue one datagram for the peer; False if it was dropped (the queue was full).
        Raises ValueError (too big), ConnectionError (the connection ended)."""
        conn = self._conn
        with conn.lock:
            self._check_open()
            room = conn.quic.datagram_room
            if len(data) > room:
                raise ValueError(f"datagram of {len(data)} bytes exceeds the {room} this connection carries")
            if not conn.quic.queue_datagram(bytes(data), conn.opts.datagram_queue):
                self.dropped += 1
                return False
            self.sent += 1
            conn.flush()
        return True

    def send_many(self, datagrams: list[bytes]) -> int:
        """Queue several datagrams with one flush (they share packets); returns how many were
        queued: those too big or beyond a full queue are dropped and counted. Raises
        ConnectionError (the connection ended)."""
        conn = self._conn
        queued = 0
        with conn.lock:
            self._check_open()
            room, limit = conn.quic.datagram_room, conn.opts.datagram_queue
            for data in datagrams:
                if len(data) <= room and conn.quic.queue_datagram(bytes(data), limit):
                    queued += 1
            self.sent += queued
            self.dropped += len(datagrams) - queued
            if queued:
                conn.flush()
        return queued

    def __repr__(self) -> str:
        return f"<derpquic.DatagramChannel to {self._conn.peer.b64()}{' closed' if self.closed else ''}>"


def channel_for(conn: Conn, channels: dict[Conn, DatagramChannel]) -> DatagramChannel:
    """The channel of a ready connection (lock held), made once; OSError EPROTONOSUPPORT
    when the peer takes no datagrams."""
    channel = channels.get(conn)
    if channel is not None:
        return channel
    if not conn.ours:
        raise OSError(errno.EPROTONOSUPPORT, f"peer {conn.peer.b64()} takes no datagrams: it is not a derpnet "
                                             f"peer (the Go derpconnect has no datagrams)")
    if not conn.quic.datagram_room:
        raise OSError(errno.EPROTONOSUPPORT, f"peer {conn.peer.b64()} takes no datagrams (its listener does not "
                                             f"have them enabled)")
    channel = channels[conn] = DatagramChannel(conn)
    return channel


class DatagramInbox:
    """Received datagrams waiting for recv_datagram(), bounded (drop-oldest); the
    condition is on the driver's lock."""

    def __init__(self, lock: threading.Lock, limit: int) -> None:
        self._cond = threading.Condition(lock)
        self._queue: deque[tuple[bytes, DatagramChannel]] = deque()
        self.limit = limit
        self.dropped = 0
        self.closed = False
        self.channels: dict[Conn, DatagramChannel] = {}

    def put(self, conn: Conn, data: bytes) -> None:
        """A datagram from `conn` (lock held, the driver's thread)."""
        channel = self.channels.get(conn)
        if channel is None:
            channel = self.channels[conn] = DatagramChannel(conn)
        if len(self._queue) >= self.limit:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append((data, channel))
        self._cond.notify()

    def forget(self, conn: Conn) -> None:
        """`conn` ended (lock held): its channel is not handed out again."""
        self.channels.pop(conn, None)

    def get(self, timeout: float | None) -> tuple[bytes, DatagramChannel]:
        """The next datagram (lock NOT held). TimeoutError, or OSError EBADF once closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._queue:
                if self.closed:
                    raise OSError(errno.EBADF, "closed")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("no datagram")
                self._cond.wait(left)
            return self._queue.popleft()

    def close(self) -> None:
        """Wake every waiter (lock held)."""
        self.closed = True
        self._queue.clear()
        self._cond.notify_all()
