"""DERP over WebSocket on the client side: the upgrade, and the framing the `Wire` applies.

Layer: relay link. The framing is `derpnet.websocket.WebSocket` (sans-IO); this moves its
bytes through a `Dialer` during the handshake (`upgrade()`, `WsHandshakeIO`) and gives the
`Wire` `wrap`/`unwrap` for the steady state: our messages are masked and at most 32 KiB
(derper's read limit), Pings from the relay are answered, a Close ends the stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import UpgradeError
from .http11 import parse_response_head
from .websocket import DERP_MAX_MESSAGE, WebSocket, WsClose, WsPing, check_response, client_request, new_key

if TYPE_CHECKING:  # pragma: no cover
    from .dial import Dialer

__all__ = ["ClientWebSocket", "WsHandshakeIO", "upgrade", "CLIENT_MAX_MESSAGE"]

#: The most we accept in one message from a relay (derper writes up to one 64 KiB frame and
#: batches; ours up to 128 KiB).
CLIENT_MAX_MESSAGE = 1 << 20


class ClientWebSocket:
    """`wrap` what we write (called under the wire's send lock), `unwrap` what we read (the reader)."""

    def __init__(self) -> None:
        self.ws = WebSocket(client=True, max_message=CLIENT_MAX_MESSAGE, max_send=DERP_MAX_MESSAGE)

    def wrap(self, data: bytes) -> bytes:
        return self.ws.send_data(data)

    def unwrap(self, data: bytes) -> tuple[bytes, bytes, bool]:
        """(DERP stream bytes, control frames to send back, whether the relay closed the WebSocket).
        WebSocketError (a RemoteProtocolError) when the relay broke the framing rules."""
        payload, controls = self.ws.receive_data(data)
        replies, ended = [], False
        for c in controls:
            if isinstance(c, WsPing):
                replies.append(self.ws.send(c.response()))
            elif isinstance(c, WsClose):
                if not self.ws.closed or not replies:
                    replies.append(self.ws.close(c.code if c.code != 1005 else 1000))
                ended = True
        return payload, b"".join(replies), ended


def upgrade(dialer: Dialer, host: str, user_agent: str) -> tuple[ClientWebSocket, bytes]:
    """The WebSocket upgrade on a connected dialer: the framing, and the bytes read past the 101."""
    key = new_key()
    dialer.send(client_request(host, key, user_agent=user_agent))
    buf = bytearray()
    while (parsed := parse_response_head(buf)) is None:
        data = dialer.read()
        if not data:
            raise UpgradeError("relay closed the connection during the WebSocket upgrade")
        buf += data
    resp, used = parsed
    try:
        check_response(resp, key)
    except UpgradeError as e:
        body = bytes(buf[used:used + 200]).decode("utf-8", "replace").strip()
        raise UpgradeError(f"{e}{': ' + repr(body) if body else ''}", status=e.status) from None
    return ClientWebSocket(), bytes(buf[used:])


class WsHandshakeIO:
    """The DERP handshake's I/O (client.HandshakeIO) through WebSocket messages."""

    def __init__(self, dialer: Dialer, framing: ClientWebSocket, leftover: bytes) -> None:
        self.dialer = dialer
        self.framing = framing
        self.leftover = leftover

    def send(self, data: bytes) -> None:
        self.dialer.send(self.framing.wrap(data))

    def read(self) -> bytes:
        while True:
            raw, self.leftover = self.leftover or self.dialer.read(), b""
            if not raw:
                return b""
            payload, replies, ended = self.framing.unwrap(raw)
            if replies:
                self.dialer.send(replies)
            if payload or ended:
                return payload
