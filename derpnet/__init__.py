"""derpnet: datagrams between machines through Tailscale DERP relays, addressed by public key.

`listen_packet(relay, key)` returns a `PacketConn` (`read_from`/`write_to`, like Go's
`net.PacketConn`); keys are `PrivateKey`/`PublicKey`; every error derpnet raises is a
`DerpError`. Layers and modules: DEVELOPERS.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    AuthenticationError,
    DerpError,
    HandshakeError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    UpgradeError,
)
from .keys import PrivateKey, PublicKey

if TYPE_CHECKING:  # pragma: no cover
    from .packetconn import PacketConn, listen_packet

__version__ = "0.1.0"

__all__ = [
    "PrivateKey", "PublicKey", "DerpError", "ProtocolError", "LocalProtocolError", "RemoteProtocolError",
    "HandshakeError", "UpgradeError", "AuthenticationError", "listen_packet", "PacketConn", "__version__",
]

# The I/O layers (sockets, TLS, threads) are imported on first use: `import derpnet`
# then takes ~15 ms instead of ~130 ms, and the sans-IO protocol modules stay usable
# without them.
_LAZY = ("listen_packet", "PacketConn")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import packetconn
        return getattr(packetconn, name)
    raise AttributeError(f"module 'derpnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
