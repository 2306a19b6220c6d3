"""What to say about a relay outage, and when: sans-IO (time is an argument).

Layer: relay link. While the relay is unreachable the link retries every few seconds;
a line per retry buries everything else (23 lines in 35 s). `OutageReport` says one line
when the link goes, a reminder at most every `remind_every` seconds while it stays down,
and one line when it is back (with how long it was gone).
"""

from __future__ import annotations

__all__ = ["OutageReport", "REMIND_EVERY"]

#: The least time between two reminders that the relay is still unreachable.
REMIND_EVERY = 60.0


class OutageReport:
    """Decides which outage events deserve a log line. Not thread-safe: one reconnect loop
    calls it at a time."""

    def __init__(self, remind_every: float = REMIND_EVERY) -> None:
        self.remind_every = remind_every
        self.down_since: float | None = None  # when the current outage began
        self.attempts = 0  # failed reconnects in the current outage
        self._last_said = 0.0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def lost(self, now: float) -> bool:
        """The link died. True: say so (the first time in this outage)."""
        if self.down_since is not None:
            return False
        self.down_since = self._last_said = now
        self.attempts = 0
        return True

    def failed(self, now: float) -> bool:
        """A reconnect failed. True: remind that the relay is still unreachable."""
        if self.down_since is None:  # a failure without a loss: the outage starts now
            return self.lost(now)
        self.attempts += 1
        if now - self._last_said < self.remind_every:
            return False
        self._last_said = now
        return True

    def restored(self, now: float) -> float | None:
        """The link is back: how long it was down, or None if no outage was reported."""
        if self.down_since is None:
            return None
        took, self.down_since = now - self.down_since, None
        self.attempts = 0
        return took
