"""What the relay has to write to one client, sans-IO: queues, batches, a rate limit.

Layer: relay server (pure: no sockets, no loop; the connection in `conn.py` moves the
bytes and counts). An `Outbox` holds:

- two bounded queues of (source key, payload), disco packets and the rest, `depth` each
  (32, like derper), drop-oldest when full, so a sender never waits;
- control frames (PeerGone, bounded), one pending Pong and a KeepAlive flag, written
  behind the packets of the same batch (so a Pong also says that everything queued
  before its Ping has been written);
- the batch being built: encoded frames up to `batch_bytes`, handed out in one piece.

It also remembers which source keys this client has been sent packets from (the relay
tells it when they leave). `TokenBucket` paces the relay's NotHere hints.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from .. import frames as F
from ..keys import KEY_LEN, PublicKey

__all__ = ["Outbox", "Batch", "Parts", "TokenBucket", "BATCH_BYTES", "CONTROL_LIMIT", "SPLIT_BYTES"]

BATCH_BYTES = 128 << 10  # frames joined into one transport.write
CONTROL_LIMIT = 1024  # pending control frames per client (bounded like everything else)

Batch = tuple[bytes, int, int]  # (frames, packets in it, payload bytes of those packets)
Parts = tuple[list[bytes], int, int]  # the same with the frames as pieces (Outbox.take_parts)
SPLIT_BYTES = 16 << 10  # payloads this large are written as they are, behind their header


class Outbox:
    """The outgoing frames of one client of the relay (see the module docstring)."""

    __slots__ = ("pkts", "disco", "depth", "ctrl", "pong", "keepalive_due", "seen", "batch_bytes", "control_limit",
                 "_out", "_size", "_packets", "_payload")

    def __init__(self, depth: int, *, batch_bytes: int = BATCH_BYTES, control_limit: int = CONTROL_LIMIT) -> None:
        self.depth = depth  # of each packet queue
        self.pkts: deque[tuple[PublicKey, bytes]] = deque(maxlen=depth)
        self.disco: deque[tuple[PublicKey, bytes]] = deque(maxlen=depth)
        self.ctrl: deque[bytes] = deque()
        self.pong: bytes | None = None
        self.keepalive_due = False
        self.seen: set[PublicKey] = set()  # sources we were sent packets from (watched)
        self.batch_bytes = batch_bytes
        self.control_limit = control_limit
        self._out: list[bytes] = []  # encoded frames of the batch being built
        self._size = self._packets = self._payload = 0

    # ------------------------------------------------------------ filling

    def is_full(self, disco: bool) -> bool:
        q = self.disco if disco else self.pkts
        return len(q) == q.maxlen

    def add_packet(self, src: PublicKey, data: bytes, disco: bool) -> bool:
        """Queue a packet; True if that pushed out the oldest one of its queue."""
        q = self.disco if disco else self.pkts
        full = len(q) == q.maxlen
        q.append((src, data))
        return full

    def add_control(self, frame: bytes) -> bool:
        """Queue an encoded control frame; False (dropped) when `control_limit` are pending."""
        if len(self.ctrl) >= self.control_limit:
            return False
        self.ctrl.append(frame)
        return True

    def add_pong(self, data: bytes) -> bool:
        """Answer a Ping; False if a Pong is already pending (one slot: faster pings are ignored)."""
        if self.pong is not None:
            return False
        self.pong = data
        return True

    # ------------------------------------------------------------ batching

    @property
    def queued_packets(self) -> int:
        """Packets queued or staged, not yet handed out."""
        return len(self.pkts) + len(self.disco) + self._packets

    @property
    def pending(self) -> bool:
        """Anything to write: queued packets, control frames, a Pong, a KeepAlive, a staged batch."""
        return bool(self.pkts or self.disco or self._out or self.control_pending)

    @property
    def control_pending(self) -> bool:
        """Control frames, a Pong or a KeepAlive wait to be staged."""
        return bool(self.ctrl) or self.pong is not None or self.keepalive_due

    @property
    def batch_full(self) -> bool:
        return self._size >= self.batch_bytes

    def stage_packets(self, watch: Callable[[PublicKey], bool]) -> set[PublicKey]:
        """Encode queued packets into the batch, alternating queues, up to `batch_bytes`.

        `watch(src)` is asked once per new source (False: the source has left the relay
        meanwhile); returns those departed sources (each wants a PeerGone)."""
        pkts, disco, seen, out, encode = self.pkts, self.disco, self.seen, self._out, F.encode_recv_packet
        header = F.encode_recv_packet_header
        size, n, nbytes, limit = self._size, self._packets, self._payload, self.batch_bytes
        departed: set[PublicKey] = set()
        queues = (disco, pkts) if disco else (pkts,)  # alternate only when both have packets
        while size < limit and (pkts or disco):
            for q in queues:  # alternate, so neither queue starves the other
                if q:
                    src, data = q.popleft()
                    if src not in seen:
                        if watch(src):
                            seen.add(src)
                        else:
                            departed.add(src)
                    if len(data) < SPLIT_BYTES:
                        frame = encode(src, data)
                        out.append(frame)
                        size += len(frame)
                    else:  # forwarded as it is, behind its header: no copy into a joined frame
                        out.append(header(src, len(data)))
                        out.append(data)
                        size += F.FRAME_HEADER_LEN + KEY_LEN + len(data)
                    n += 1
                    nbytes += len(data)
        self._size, self._packets, self._payload = size, n, nbytes
        return departed

    def stage_control(self) -> tuple[bool, bool]:
        """Move control frames, the Pong and a due KeepAlive into the batch, behind its
        packets; returns (a Pong was staged, a KeepAlive was staged)."""
        out = self._out
        while self.ctrl:
            frame = self.ctrl.popleft()
            out.append(frame)
            self._size += len(frame)
        pong, self.pong = self.pong, None
        if pong is not None:
            out.append(F.encode_pong(pong))
        keepalive, self.keepalive_due = self.keepalive_due, False
        if keepalive:
            out.append(F.encode_keep_alive())
        return pong is not None, keepalive

    def take_batch(self) -> Batch | None:
        """The staged frames as one write, with its packet and payload counts (None if empty)."""
        parts = self.take_parts()
        if parts is None:
            return None
        pieces, packets, payload = parts
        return (pieces[0] if len(pieces) == 1 else b"".join(pieces)), packets, payload

    def take_parts(self) -> Parts | None:
        """The staged frames as pieces to write in order (large payloads are pieces of their
        own, never copied into a joined frame), with the batch's packet and payload counts."""
        if not self._out:
            return None
        parts = (self._out, self._packets, self._payload)
        self._out = []
        self._size = self._packets = self._payload = 0
        return parts

    def clear(self) -> int:
        """Forget everything (the client left); returns how many packets were dropped."""
        dropped = self.queued_packets
        self.pkts.clear()
        self.disco.clear()
        self.ctrl.clear()
        self._out.clear()
        self._size = self._packets = self._payload = 0
        self.pong = None
        self.keepalive_due = False
        return dropped


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; time is an argument."""

    __slots__ = ("rate", "burst", "tokens", "at")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.at = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
