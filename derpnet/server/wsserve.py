"""The WebSocket layer of one relay connection (DERP in binary messages, as derper serves it).

Layer: relay server, the I/O edge. The framing is `derpnet.websocket.WebSocket` (sans-IO);
this only moves its bytes for a `ClientProtocol`: stream bytes out as messages, messages
in as stream bytes, Pings answered, a Close echoed, a broken rule answered with its
close code. derper's limits: at most 32 KiB per client message.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..websocket import DERP_MAX_MESSAGE, WebSocket, WebSocketError, WsClose, WsPing

if TYPE_CHECKING:  # pragma: no cover
    from .conn import ClientProtocol

__all__ = ["ServerWebSocket", "SERVER_MAX_SEND"]

log = logging.getLogger(__name__)

SERVER_MAX_SEND = 1 << 17  # our messages may be larger than the client's (a batch of frames)


class ServerWebSocket:
    """Wraps what a relay connection writes, unwraps what it reads."""

    __slots__ = ("conn", "ws")

    def __init__(self, conn: ClientProtocol) -> None:
        self.conn = conn
        self.ws = WebSocket(client=False, max_message=DERP_MAX_MESSAGE, max_send=SERVER_MAX_SEND)

    def wrap(self, data: bytes) -> bytes:
        return self.ws.send_data(data)

    def unwrap(self, data: bytes) -> tuple[bytes, bool]:
        """(DERP stream bytes, whether the connection must now end)."""
        conn, ws = self.conn, self.ws
        try:
            payload, controls = ws.receive_data(data)
        except WebSocketError as e:
            conn.server.protocol_errors += 1
            conn.server.error_log.log(logging.INFO, "relay: closing %s: WebSocket: %s", conn.name, e)
            conn.send_raw(ws.close(e.code))
            return b"", True
        end = False
        for c in controls:
            if isinstance(c, WsPing):
                conn.send_raw(ws.send(c.response()))
            elif isinstance(c, WsClose):
                conn.send_raw(ws.close(c.code if c.code != 1005 else 1000))
                end = True
        return payload, end
