"""derpnet: datagrams between machines through Tailscale DERP relays, addressed by public key."""

from __future__ import annotations

from .errors import (AuthenticationError, DerpError, HandshakeError, LocalProtocolError, ProtocolError,
                     RemoteProtocolError, UpgradeError)
from .keys import PrivateKey, PublicKey

__version__ = "0.1.0"

__all__ = [
    "PrivateKey", "PublicKey", "DerpError", "ProtocolError", "LocalProtocolError", "RemoteProtocolError",
    "HandshakeError", "UpgradeError", "AuthenticationError", "listen_packet", "PacketConn", "__version__",
]


def __getattr__(name: str):
    # The I/O layers are imported on first use so that `import derpnet` stays cheap
    # and the sans-IO protocol can be used without them.
    if name in ("listen_packet", "PacketConn"):
        from . import packetconn
        return getattr(packetconn, name)
    raise AttributeError(f"module 'derpnet' has no attribute {name!r}")
