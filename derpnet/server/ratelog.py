"""`RateLimitedLog`: log lines that a client can provoke, at a bounded rate.

Layer: relay server. A failed handshake or a protocol error is worth a line, but a client
that reconnects in a loop could otherwise write one per connection (and a traceback per
connection before the RecursionError fix, issue 9 item 2). A token bucket lets `burst`
lines through at once and `rate` per second after that; the others are counted, and the
next line that gets through says how many were left out. Time is an argument (`clock`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from .outbox import TokenBucket

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """At most `burst` lines at once and `rate` lines per second on average."""

    def __init__(self, logger: logging.Logger, *, rate: float = 1.0, burst: int = 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.clock = clock
        self.bucket = TokenBucket(rate, burst, clock())
        self.suppressed = 0        # lines left out since the last one logged
        self.suppressed_total = 0

    def log(self, level: int, msg: str, *args: Any, exc_info: bool = False) -> bool:
        """Log `msg % args` at `level` if the bucket allows; True if it was logged."""
        if not self.logger.isEnabledFor(level):
            return False
        if not self.bucket.take(self.clock()):
            self.suppressed += 1
            self.suppressed_total += 1
            return False
        if self.suppressed:
            msg += " (%d similar lines left out)"
            args = (*args, self.suppressed)
            self.suppressed = 0
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True
