"""`Heartbeat`: when a connection PINGs a silent peer, and when it gives up on a peer
the relay says has left. Sans-IO: every call takes `now` (monotonic seconds)."""

from __future__ import annotations

import itertools

__all__ = ["Heartbeat", "GONE_GRACE"]

#: How long a connection whose peer the relay says has left (PeerGone) waits to hear from it
#: before failing, when that means the end: a dial (the peer is offline), or a connection to
#: a Go derpconnect (the Go derpnet never reconnects, so its connections died with its relay
#: link). A connection to one of ours only probes: ours reconnect, and if not, the idle
#: timeout ends it.
GONE_GRACE = 2.0


class Heartbeat:
    """The liveness clock of one connection: when the peer was last heard from, when we
    last pinged it, and the deadline to hear from it after the relay said it left."""

    def __init__(self, interval: float, now: float) -> None:
        self.interval = interval  # PING a silent peer this often while the connection is in use
        self.created = self.last_rx = self.last_ping = now
        self.keep_idle = False    # PING even without open streams (a spare kept for the next dial)
        self.gone_deadline: float | None = None
        self._seq = itertools.count(1)

    def heard(self, now: float) -> None:
        """A datagram came from the peer: it is there."""
        self.last_rx = now
        self.gone_deadline = None

    def ping_at(self, in_use: bool) -> float | None:
        """When to PING next: only while the connection is `in_use` (streams open, ready)
        or kept idle on purpose; None: not at all."""
        if in_use or self.keep_idle:
            return max(self.last_rx, self.last_ping) + self.interval
        return None

    def ping_due(self, now: float, in_use: bool) -> int | None:
        """The PING id to send now, if one is due (and note that it went)."""
        at = self.ping_at(in_use)
        if at is None or now < at:
            return None
        self.last_ping = now
        return next(self._seq)

    def next_ping_id(self) -> int:
        """An id for a PING sent for another reason (a probe)."""
        return next(self._seq)

    def peer_left(self, now: float, grace: float = GONE_GRACE) -> None:
        """The relay said the peer left: it has `grace` seconds to be heard from (an
        earlier deadline stands)."""
        if self.gone_deadline is None:
            self.gone_deadline = now + grace

    def gone_due(self, now: float) -> bool:
        """The peer left and was not heard from in time (reported once)."""
        if self.gone_deadline is not None and now >= self.gone_deadline:
            self.gone_deadline = None
            return True
        return False

    def heard_recently(self, now: float, within: float) -> bool:
        return now - self.last_rx < within
