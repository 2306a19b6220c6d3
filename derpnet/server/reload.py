"""The operator's files of a running relay: loaded at start, reloaded on SIGHUP.

Layer: relay server. `Policy` names the allow file (`--allow-clients`) and the rate
config (`--rate-config`); `load()` reads and checks both (ConfigError with the file and
line), `apply()` installs them in a RelayServer on its loop. A reload that fails keeps
the configuration in force and logs why; one that succeeds disconnects the clients whose
keys left the allow list (counted as refused, "removed") and gives every connected
client its new rate limit. Clients still allowed stay connected.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..keys import PublicKey
from .access import parse_allow_list
from .configfile import ConfigError
from .ratelimit import RateConfig, parse_rate_config

if TYPE_CHECKING:  # pragma: no cover
    from .server import RelayServer

__all__ = ["Policy", "Loaded", "read_text"]

log = logging.getLogger(__name__)


def read_text(path: str) -> str:
    """A config file's text; ConfigError (line 0) when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(path, 0, f"cannot read it: {getattr(e, 'strerror', None) or e}") from None


@dataclass(frozen=True)
class Loaded:
    """What the files said: the allowed keys (None: everyone) and the rate limits."""

    allowed: frozenset[PublicKey] | None
    rates: RateConfig


@dataclass(frozen=True)
class Policy:
    """Where the relay's access and rate configuration come from."""

    allow_file: str | None = None
    rate_file: str | None = None

    @property
    def reloadable(self) -> bool:
        return bool(self.allow_file or self.rate_file)

    def load(self) -> Loaded:
        """Read and check both files (raises ConfigError)."""
        allowed = parse_allow_list(read_text(self.allow_file), self.allow_file) if self.allow_file else None
        rates = parse_rate_config(read_text(self.rate_file), self.rate_file) if self.rate_file else RateConfig()
        return Loaded(allowed, rates)

    def reload(self, server: RelayServer) -> bool:
        """SIGHUP: load and apply; on a bad file keep what is in force (logged). True if applied."""
        try:
            loaded = self.load()
        except ConfigError as e:
            log.error("relay: reload failed, keeping the previous configuration: %s", e)
            return False
        apply(server, loaded)
        return True


def apply(server: RelayServer, loaded: Loaded) -> None:
    """Install `loaded` in `server` (on its loop): drop clients no longer allowed, re-limit the rest."""
    access = server.access
    access.allowed = loaded.allowed
    server.rate_config = loaded.rates
    now = server.loop.time() if server.loop is not None else 0.0
    removed = 0
    for c in server.connections():
        if not c.registered or c.key is None:
            continue
        if not c.can_mesh and not access.permits(c.key):
            removed += 1
            access.refuse(c, "removed", f"key {c.key.short()} was removed from the relay's allow list")
            continue
        if not c.can_mesh:
            c.limiter = loaded.rates.limit_for(c.key).limiter(now)
    allowed = "everyone" if loaded.allowed is None else f"{len(loaded.allowed)} key(s)"
    if loaded.allowed is not None and not loaded.allowed:
        log.warning("relay: the allow list is empty: no client can connect")
    log.info("relay: configuration applied: allowed %s; rate limits: %s; %d client(s) disconnected",
             allowed, loaded.rates.describe(), removed)
