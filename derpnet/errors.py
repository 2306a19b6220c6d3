"""The exception hierarchy shared by every layer of derpnet and derpquic.

    DerpError
    ├── ProtocolError
    │   ├── RemoteProtocolError
    │   │   └── HandshakeError
    │   │       └── UpgradeError
    │   └── LocalProtocolError
    └── AuthenticationError
"""

from __future__ import annotations

__all__ = [
    "DerpError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "HandshakeError",
    "UpgradeError",
    "AuthenticationError",
    "PeerNotConnected",
]


class DerpError(Exception):
    """Base class of every error raised by derpnet itself."""


class ProtocolError(DerpError):
    """The DERP byte stream broke the protocol (malformed, oversized, out of order)."""


class RemoteProtocolError(ProtocolError):
    """The peer (relay or client) sent bytes that break the protocol."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol does not allow."""


class HandshakeError(RemoteProtocolError):
    """The DERP handshake failed: the peer broke the upgrade or the hello (ServerKey,
    ClientInfo, ServerInfo), or its box did not open. Both sides raise it the same way."""


class UpgradeError(HandshakeError):
    """The relay did not switch to DERP (wrong status, not HTTP, an error page)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AuthenticationError(DerpError):
    """A peer could not prove that it holds the private key it claims."""


class PeerNotConnected(ConnectionRefusedError):
    """The relay says the peer is not connected to it (it left, or was never there), and
    the peer has not been heard from since: a dial to it fails fast instead of timing out.
    A ConnectionRefusedError (errno ECONNREFUSED), like a TCP connect to nobody."""
