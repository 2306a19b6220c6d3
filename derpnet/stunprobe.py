"""`StunProbe`: when to ask a STUN server for our public address, and what its answer means.

Layer: paths (pure; time is an argument). The edge (derpnet.direct) sends the requests
`poll()` hands out and passes every STUN packet to `on_response()`. A round is `tries`
requests `interval` apart; an answer ends it, and the next round starts `refresh`
seconds later (or at `restart()`, e.g. when the relay link comes back). Only an answer
from the server we asked, carrying a transaction id of ours, counts.
"""

from __future__ import annotations

from . import stun

__all__ = ["StunProbe"]

Addr = tuple[str, int]
_MAX_PENDING = 8


class StunProbe:
    """STUN Binding requests towards `server` (None: no server, never asks)."""

    def __init__(self, server: Addr | None, *, tries: int = 3, interval: float = 0.5,
                 refresh: float = 60.0) -> None:
        self.server = server
        self.tries, self.interval, self.refresh = tries, interval, refresh
        self.mapped: Addr | None = None  # the last answer: our address as the server sees it
        self._pending: list[bytes] = []
        self._left = 0
        self._next: float | None = None

    def restart(self, now: float) -> None:
        """Start a round now."""
        self._left = self.tries
        self._next = now

    def poll(self, now: float) -> bytes | None:
        """The request to send now, if one is due."""
        if self.server is None or self._next is None or now < self._next:
            return None
        if self._left <= 0:  # a round without answer: try again at the next refresh
            self.restart(now)
        self._left -= 1
        self._next = now + (self.interval if self._left > 0 else self.refresh)
        tx = stun.new_tx_id()
        self._pending = [*self._pending[-(_MAX_PENDING - 1):], tx]
        return stun.binding_request(tx)

    def on_response(self, data: bytes, src: Addr, now: float) -> Addr | None:
        """Our mapped address if `data` answers one of our requests from the server, else None
        (raises stun.StunError for a malformed packet)."""
        tx, mapped = stun.parse_response(data)
        if src != self.server or tx not in self._pending:
            return None
        self._pending.clear()
        self._left = 0
        self._next = now + self.refresh
        self.mapped = mapped
        return mapped

    def next_deadline(self) -> float | None:
        return self._next if self.server is not None else None
