"""The event contract shared by every layer: `Event`, and the connection events.

Layer: protocol (sans-IO). A sans-IO connection turns received bytes into a list of
`Event`s (`receive_data`) and events to send into bytes (`send`), as h11 and wsproto do.
Decoded frames (`derpnet.frames.Frame`), the connection events below and the link
events of the layers above (LinkUp, LinkDown, PathChanged) all derive from `Event`, so
one `match` statement can dispatch any of them.

Received by a client: `Connected` (and frames). Received by a relay: `HttpRequest`,
`UpgradeRequest`, `ClientHello` (and frames). Sent by a client: `Upgrade`, `Hello`
(and frames). Sent by a relay: `AcceptUpgrade`, `Reject`, `AcceptClient` (and frames).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .http11 import Request
from .keys import PublicKey

__all__ = ["Event", "Connected", "UpgradeRequest", "HttpRequest", "ClientHello", "Upgrade", "Hello",
           "AcceptUpgrade", "Reject", "AcceptClient"]


class Event:
    """Base class of every event: no fields, no state; subclasses are (frozen) dataclasses."""

    __slots__ = ()


# ---------------------------------------------------------------- received

@dataclass(frozen=True)
class Connected(Event):
    """Client: the relay's ServerInfo opened; the connection is up."""

    server_key: PublicKey
    server_info: dict[str, Any]


@dataclass(frozen=True)
class UpgradeRequest(Event):
    """Relay: a `GET /derp` asking to switch to DERP; send `AcceptUpgrade()` or `Reject(...)`."""

    request: Request
    fast_start: bool


@dataclass(frozen=True)
class HttpRequest(Event):
    """Relay: any other HTTP request (probes, /generate_204, a browser); answer and close."""

    request: Request


@dataclass(frozen=True)
class ClientHello(Event):
    """Relay: a client proved its key (its ClientInfo box opened); send `AcceptClient()` or close."""

    key: PublicKey
    info: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- sent

@dataclass(frozen=True)
class Upgrade(Event):
    """Client: the HTTP upgrade request (with `Derp-Fast-Start: 1`, the relay skips the 101)."""

    fast_start: bool = False


@dataclass(frozen=True)
class Hello(Event):
    """Client: the ClientInfo frame, sealed to the relay's key (send it after the ServerKey frame)."""


@dataclass(frozen=True)
class AcceptUpgrade(Event):
    """Relay: switch to DERP: the 101 (none for a fast-start request) and the ServerKey frame."""


@dataclass(frozen=True)
class Reject(Event):
    """Relay: refuse the upgrade with an HTTP error response; the connection is then finished."""

    status: int
    body: str = ""


@dataclass(frozen=True)
class AcceptClient(Event):
    """Relay: admit the client that sent `ClientHello`: the ServerInfo frame."""
