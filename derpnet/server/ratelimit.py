"""Per-client receive rate limits, derper style: pace a client's reads, never drop its packets.

Layer: relay server (pure: no sockets, no loop; time is an argument). derper's
`--rate-config` gives every non-mesh client a token bucket of
`PerClientRateLimitBytesPerSec` with depth `PerClientRateBurstBytes` (raised to at least
one full SendPacket, 65,568 bytes) and waits on it before reading each frame, so a client
over its rate is slowed by TCP back-pressure. Here the connection charges each read's
bytes (`ReadLimiter.charge`) and, when the bucket is in debt, stops reading from the
socket for the returned time (conn.py). derper waits before each frame; we settle after
each read, so a client may get ahead by one read (asyncio reads up to 256 KiB) at most,
and the long-run rate is the same (tested side by side with derper). `RateConfig` is
derper's JSON file plus per-key overrides (`parse_rate_config`), reloaded on SIGHUP
(reload.py). Mesh peers are to be exempt, as in derper (the mesh sets no limiter).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..keys import PublicKey
from .configfile import ConfigError, line_of

__all__ = ["ReadLimiter", "RateConfig", "Limit", "parse_rate_config", "MIN_BURST"]

#: derper's minRateLimitTokenBucketSize: a bucket must hold one whole SendPacket frame.
MIN_BURST = 65536 + 32


class ReadLimiter:
    """A token bucket that may go into debt: `charge(n, now)` says how long to stop reading."""

    __slots__ = ("rate", "burst", "tokens", "at", "waits", "waited")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not rate > 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(max(burst, MIN_BURST))
        self.tokens = self.burst
        self.at = now
        self.waits = 0        # reads after which the client had to wait
        self.waited = 0.0     # seconds of waiting, in total

    def charge(self, n: int, now: float) -> float:
        """`n` bytes were read at `now`: the seconds to pause reading before the next read (0: none)."""
        tokens = self.tokens + (now - self.at) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        tokens -= n
        self.tokens = tokens
        self.at = now
        if tokens >= 0:
            return 0.0
        delay = -tokens / self.rate
        self.waits += 1
        self.waited += delay
        return delay


@dataclass(frozen=True)
class Limit:
    """One client's limit: `rate` bytes/s (None: unlimited) with a burst of `burst` bytes."""

    rate: float | None
    burst: float = MIN_BURST

    def limiter(self, now: float) -> ReadLimiter | None:
        return ReadLimiter(self.rate, self.burst, now) if self.rate else None


UNLIMITED = Limit(None)


@dataclass(frozen=True)
class RateConfig:
    """The relay's rate limits: a default for every client and overrides by key."""

    default: Limit = UNLIMITED
    per_key: Mapping[PublicKey, Limit] = field(default_factory=dict)

    def limit_for(self, key: PublicKey) -> Limit:
        return self.per_key.get(key, self.default)

    def describe(self) -> str:
        d = self.default
        text = f"{d.rate:.0f} bytes/s, burst {d.burst:.0f}" if d.rate else "no default limit"
        return f"{text}; {len(self.per_key)} per-key override(s)"


_RATE = "PerClientRateLimitBytesPerSec"
_BURST = "PerClientRateBurstBytes"
_PER_KEY = "PerKey"


def parse_rate_config(text: str, source: str = "rate config") -> RateConfig:
    """Parse derper's rate-config JSON (`PerClientRateLimitBytesPerSec`, `PerClientRateBurstBytes`;
    0 or absent: unlimited) plus `"PerKey": {"<public key>": {the same two fields}}`.
    Raises ConfigError naming the line of the first problem."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(source, e.lineno, f"not valid JSON: {e.msg}") from None
    if not isinstance(doc, dict):
        raise ConfigError(source, 1, "expected a JSON object")
    default = _limit(doc, text, source, "")
    per_key: dict[PublicKey, Limit] = {}
    entries = doc.get(_PER_KEY, {})
    if not isinstance(entries, dict):
        raise ConfigError(source, line_of(text, _PER_KEY), f"{_PER_KEY} must be an object of key -> limits")
    for name, spec in entries.items():
        try:
            key = PublicKey.parse(name)
        except ValueError as e:
            raise ConfigError(source, line_of(text, name), str(e)) from None
        if not isinstance(spec, dict):
            raise ConfigError(source, line_of(text, name), "a key's limits must be an object")
        per_key[key] = _limit(spec, text, source, name)
    return RateConfig(default, per_key)


def _limit(obj: dict[str, Any], text: str, source: str, after: str) -> Limit:
    known = {_RATE, _BURST} | ({_PER_KEY} if not after else set())
    for name in obj:
        if name not in known:
            raise ConfigError(source, line_of(text, name, after), f"unknown field {name!r} "
                              f"(expected {', '.join(sorted(known))})")
    rate, burst = obj.get(_RATE, 0), obj.get(_BURST, 0)
    for name, v in ((_RATE, rate), (_BURST, burst)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or not math.isfinite(v):
            raise ConfigError(source, line_of(text, name, after), f"{name} must be a number >= 0")
    if not rate:
        return UNLIMITED
    return Limit(float(rate), float(max(burst, MIN_BURST)))
