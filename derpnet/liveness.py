"""Is the relay still there? The relay link's liveness rules, sans-IO (time is an argument).

Layer: relay link. A relay path that silently stops forwarding (a dead NAT mapping, a
black-holing middlebox: no FIN, no RST) would otherwise only be noticed after the idle
timeout. So while the link is in use it is probed: when the relay has been silent for
`ping_after` seconds and we wrote a packet during that silence or within `ping_after`
before it began, `poll()` asks for a DERP Ping; if nothing at all (the Pong or any other
frame) arrives within `ping_timeout` seconds, the link is dead. An idle link is never
pinged; a link silent for `idle_timeout` is dead whatever we did.

"In use" reaches back before the silence on purpose: the relay link cannot tell whether
its user still expects something. A QUIC sender waiting for flow-control credit writes
nothing after the last acknowledgement it received: had the rule asked for a write
*after* the last byte received, a path that died at that moment went unprobed until the
user's next write (derpquic's 10 s keep-alive), ~11 s instead of ~2 s in the fault tests.
Our own Pings (and Pongs) are probes, not use: they never count as writes.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from dataclasses import dataclass

from .frames import PING_LEN

__all__ = ["Liveness", "SendPing", "Dead", "DeadReason"]


@dataclass(frozen=True, slots=True)
class SendPing:
    """Send a DERP Ping with this payload now."""

    data: bytes


class DeadReason(enum.Enum):
    IDLE = "idle"  # nothing received for idle_timeout
    PING_UNANSWERED = "ping-unanswered"  # nothing received within ping_timeout of our Ping


@dataclass(frozen=True, slots=True)
class Dead:
    """The link is dead: `reason`, and how long the relay had been silent."""

    reason: DeadReason
    silent_for: float
    limit: float  # the timeout that expired (idle_timeout or ping_timeout)


class Liveness:
    """The liveness state of one relay link.

    Call `on_receive(now)` for every byte received, `on_send(now)` for every packet
    written (any thread: it only stores a float; not for Pings and Pongs), and `poll(now)`
    whenever the reader wakes up (at least every `check_interval` seconds): it returns
    `SendPing`, `Dead` or None.
    `ping_after=None` disables probing; `idle_timeout=None` disables the idle limit.
    """

    def __init__(self, *, idle_timeout: float | None, ping_after: float | None, ping_timeout: float,
                 now: float = 0.0, token: Callable[[int], bytes] = os.urandom) -> None:
        if ping_after is not None and (ping_after <= 0 or ping_timeout <= 0):
            raise ValueError("ping_after and ping_timeout must be positive (ping_after=None disables pings)")
        self.idle_timeout = idle_timeout or None
        self.ping_after = ping_after
        self.ping_timeout = ping_timeout
        self._token = token
        self.last_rx = now
        self.last_tx = float("-inf")
        self.ping_sent_at: float | None = None  # an unanswered ping
        self.ping_data: bytes | None = None
        self.pings_sent = 0

    @property
    def check_interval(self) -> float | None:
        """How often a silent link must be polled (the reader's receive timeout): the idle
        timeout, or a quarter of the smaller ping period; None if nothing is checked."""
        bounds = [t for t in (self.idle_timeout,) if t]
        if self.ping_after:
            bounds.append(min(self.ping_after, self.ping_timeout) / 4)
        return min(bounds) if bounds else None

    def reset(self, now: float) -> None:
        """Start counting silence from `now` (the reader starts); writes so far do not count."""
        self.last_rx = now
        self.last_tx = float("-inf")
        self.ping_sent_at = self.ping_data = None

    @property
    def in_use(self) -> bool:
        """We wrote a packet during the relay's current silence or within `ping_after` before it."""
        return self.ping_after is not None and self.last_tx > self.last_rx - self.ping_after

    def on_send(self, now: float) -> None:
        self.last_tx = now

    def on_receive(self, now: float) -> None:
        """Any frame proves the path (the Pong, or anything else)."""
        self.last_rx = now
        self.ping_sent_at = self.ping_data = None

    def on_pong(self, data: bytes, now: float) -> None:
        """A Pong arrived (it also went through `on_receive`): forget the ping it answers."""
        if data == self.ping_data:
            self.on_receive(now)

    def poll(self, now: float) -> SendPing | Dead | None:
        """What to do now: send a ping, declare the link dead, or nothing."""
        silent = now - self.last_rx
        if self.idle_timeout and silent >= self.idle_timeout:
            return Dead(DeadReason.IDLE, silent, self.idle_timeout)
        if not self.ping_after:
            return None
        if self.ping_sent_at is not None:
            if now - self.ping_sent_at >= self.ping_timeout:
                return Dead(DeadReason.PING_UNANSWERED, silent, self.ping_timeout)
        elif silent >= self.ping_after and self.in_use:
            self.ping_sent_at = now
            self.ping_data = self._token(PING_LEN)
            self.pings_sent += 1
            return SendPing(self.ping_data)
        return None

    def next_deadline(self) -> float | None:
        """The earliest time at which `poll()` may have something to do (None: never, as things stand)."""
        deadlines = []
        if self.idle_timeout:
            deadlines.append(self.last_rx + self.idle_timeout)
        if self.ping_after:
            if self.ping_sent_at is not None:
                deadlines.append(self.ping_sent_at + self.ping_timeout)
            elif self.in_use:
                deadlines.append(self.last_rx + self.ping_after)
        return min(deadlines) if deadlines else None
